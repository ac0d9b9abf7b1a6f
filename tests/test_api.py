"""The OpenAI-compatible API and /metrics on a real agent, driven by the official `openai`
package: two agents on loopback serve halves of a tiny llama, the first one with the API on
(bearer key, one generation at a time). Outputs are compared with `shardmesh generate`
through the same agent, for the same prompt and settings.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agentproc import Agent, cli, free_port, start_many, stop_all, wait_for
from prometheus_client.parser import text_string_to_metric_families

from agent.model.tiny import ensure_tiny_model

pytestmark = pytest.mark.procs

KEY = "sk-shardmesh-test-0123456789"
MODEL = "tiny-llama"
UNCOVERED = "tiny-llama-l6-h64-s9"  # a local checkpoint nobody serves
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Every machine runs one agent"},
]


class Mesh:
    def __init__(self, root: Path, model: Path, api: Agent, other: Agent, url: str) -> None:
        self.root = root
        self.model = model
        self.api = api
        self.other = other
        self.url = url

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def generate(self, *args: str) -> dict[str, Any]:
        """`shardmesh generate ARGS --json` through the API agent's control socket."""
        out = cli("generate", "--control", str(self.api.control), "--model", MODEL, *args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("api")
    model = ensure_tiny_model("llama", root / "models")
    uncovered = ensure_tiny_model("llama", root / "models", seed=9)
    keys = root / "keys"
    keys.write_text(f"# test key\n{KEY}\n")
    os.chmod(keys, 0o600)
    port = free_port()
    config = root / "api.toml"
    config.write_text(
        "[api]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f'key_file = "{keys}"\n'
        f'model_dirs = ["{uncovered}"]\n'
        "max_concurrent = 1\n"
    )
    # The API agent's identity and port are fixed beforehand, so both agents start at once.
    p2p_port, peer_id = free_port(), _make_identity(root / "a0")
    common = ["--model", str(model), "--threads", "1"]
    listen = ["--listen", f"/ip4/127.0.0.1/tcp/{p2p_port}"]
    api = Agent(root / "a0", ["--config", str(config), *common, "--blocks", "0:3", *listen])
    bootstrap = f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{peer_id}"
    other = Agent(root / "a1", [*common, "--blocks", "3:6", "--bootstrap", bootstrap])
    agents = [api, other]
    try:
        start_many(agents, ready_timeout=120)
        m = Mesh(root, model, api, other, f"http://127.0.0.1:{port}")
        client = m.client()
        wait_for(lambda: [x.id for x in client.models.list().data], 60, "the model to be listed")
        yield m
    finally:
        stop_all(agents)


def _make_identity(state_dir: Path) -> str:
    from libp2p.peer.id import ID

    from agent.net.identity import load_or_create_identity

    key_pair = load_or_create_identity(state_dir / "identity.key")
    return ID.from_pubkey(key_pair.public_key).to_base58()


def _chat_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_models_lists_what_the_mesh_covers(mesh: Mesh) -> None:
    client = mesh.client()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]  # the uncovered checkpoint is not offered
    assert models[0].owned_by == "shardmesh"
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_equals_generate(mesh: Mesh) -> None:
    ids = _chat_ids(mesh.model)
    want = mesh.generate("--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "12")
    got = mesh.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want["text"]
    assert got.model == MODEL and got.object == "chat.completion"
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert choice.finish_reason == ("length" if len(want["token_ids"]) == 12 else "stop")


def test_streamed_chat_sends_one_chunk_per_token(mesh: Mesh) -> None:
    client = mesh.client()
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    *tokens, last, used = chunks
    assert len(tokens) == whole.usage.completion_tokens
    assert tokens[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in tokens)
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join((c.choices[0].delta.content or "") for c in [*tokens, last])
    assert text == whole.choices[0].message.content
    assert used.choices == [] and used.usage == whole.usage


def test_sampled_completion_equals_generate(mesh: Mesh) -> None:
    prompt = "The quick brown fox"
    settings = {"temperature": 0.9, "top_p": 0.8, "seed": 11}
    want = mesh.generate(
        "--prompt", prompt, "--max-new-tokens", "10",
        "--temperature", "0.9", "--top-p", "0.8", "--seed", "11",
    )  # fmt: skip
    got = mesh.client().completions.create(model=MODEL, prompt=prompt, max_tokens=10, **settings)
    assert got.object == "text_completion"
    assert got.choices[0].text == want["text"]
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.usage.prompt_tokens == len(want["prompt_ids"])
    # The same seed gives the same text again; the API's sampling is not greedy in disguise.
    again = mesh.client().completions.create(model=MODEL, prompt=prompt, max_tokens=10, **settings)
    assert again.choices[0].text == got.choices[0].text
    greedy = mesh.generate("--prompt", prompt, "--max-new-tokens", "10")
    assert greedy["token_ids"] != want["token_ids"]


def test_stop_sequence_cuts_the_text(mesh: Mesh) -> None:
    client = mesh.client()
    prompt = "The quick brown fox"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    # A two-character stop whose first occurrence is past the start.
    i = next(i for i in range(1, len(text) - 1) if text.find(text[i : i + 2]) == i)
    stop = text[i : i + 2]
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never seen"]
    )
    assert cut.choices[0].text == text[:i]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[:i]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("kwargs", "error", "status", "code"),
    [
        ({"model": "no-such-model"}, openai.NotFoundError, 404, "model_not_found"),
        ({"model": UNCOVERED}, openai.InternalServerError, 503, "model_not_covered"),
        ({"temperature": 5}, openai.BadRequestError, 400, None),
        ({"max_tokens": 100_000}, openai.BadRequestError, 400, "context_length_exceeded"),
        ({"n": 2}, openai.BadRequestError, 400, None),
    ],
)
def test_errors_in_openai_format(
    mesh: Mesh, kwargs: dict[str, Any], error: type[Exception], status: int, code: str | None
) -> None:
    args = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        mesh.client().chat.completions.create(**args)
    exc = info.value
    assert isinstance(exc, openai.APIStatusError)
    assert exc.status_code == status
    assert exc.body["message"]  # the client unwraps {"error": {...}}
    if code is not None:
        assert exc.code == code


def test_api_key_is_required(mesh: Mesh) -> None:
    with pytest.raises(openai.AuthenticationError):
        mesh.client(key="sk-wrong").models.list()
    assert httpx.get(f"{mesh.url}/metrics").status_code == 401


def _scrape(mesh: Mesh) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{mesh.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_scrape_parses_and_tells_the_truth(mesh: Mesh) -> None:
    mesh.client().completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    got = _scrape(mesh)
    status = mesh.api.status()
    labels = (("model", status["model"]), ("model_name", MODEL))
    assert got[("shardmesh_served_span_start", labels)] == status["span"][0] == 0
    assert got[("shardmesh_served_span_end", labels)] == status["span"][1] == 3
    assert got[("shardmesh_peers", (("state", "online"),))] == 1
    assert got[("shardmesh_state", (("state", "online"),))] == 1
    assert got[("shardmesh_model_min_replicas", labels)] == 1
    assert got[("shardmesh_tokens_served_total", ())] == status["tokens_served"] > 0
    assert got[("shardmesh_sessions", ())] == 0
    assert got[("shardmesh_step_seconds_count", ())] > 0
    # Continuous batching: every forward observed, with its sequences and tokens.
    assert got[("shardmesh_batch_rows_count", ())] == status["batch"]["forwards"] > 0
    assert got[("shardmesh_batch_tokens_count", ())] == status["batch"]["forwards"]
    assert got[("shardmesh_batch_tokens_sum", ())] >= got[("shardmesh_batch_rows_sum", ())]
    assert got[("shardmesh_failovers_total", ())] == 0
    for direction in ("in", "out"):
        for kind in ("gossip", "forward"):
            assert got[("shardmesh_bytes_total", (("direction", direction), ("kind", kind)))] > 0
    assert got[("shardmesh_api_tokens_total", (("kind", "completion"),))] >= 3
    ok = (("endpoint", "/v1/completions"), ("status", "200"))
    assert got[("shardmesh_api_requests_total", ok)] >= 1
    assert got[("shardmesh_api_generations_in_flight", ())] == 0


def test_disconnect_mid_stream_frees_sessions_at_once(mesh: Mesh) -> None:
    client = mesh.client()
    served_before = mesh.other.status()["tokens_served"]
    max_tokens = 400
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True
    )
    for n, _ in enumerate(stream, start=1):
        if n == 3:
            break
    # Mid-generation: both halves hold a session, and the one slot (max_concurrent) is taken.
    assert mesh.api.status()["sessions"] == 1 and mesh.other.status()["sessions"] == 1
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    t0 = time.monotonic()
    stream.close()
    wait_for(
        lambda: mesh.api.status()["sessions"] == 0 and mesh.other.status()["sessions"] == 0,
        2.0,
        "sessions to close after the client left",
        interval=0.02,
    )
    freed_s = time.monotonic() - t0
    served = mesh.other.status()["tokens_served"] - served_before
    assert served < max_tokens // 2, (
        f"the generation ran on ({served} tokens) after the client left"
    )
    assert freed_s < 2.0
    # The slot is free again.
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


def test_public_bind_without_keys_is_refused(tmp_path: Path) -> None:
    out = cli("up", "--state-dir", str(tmp_path / "s"), "--api", "0.0.0.0:8080", timeout=30)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs bearer keys" in lines[0]


def test_agent_with_api_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM with the API running, a client's connection still open, exits 0. An agent of
    its own (API only, no model: it starts in about two seconds), so the module's mesh stays
    up for the other tests whatever their order."""
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    os.chmod(keys, 0o600)
    port = free_port()
    agent = Agent(tmp_path / "solo", ["--api", f"127.0.0.1:{port}", "--api-key-file", str(keys)])
    try:
        agent.start()
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            assert http.get("/v1/models").status_code == 200  # kept alive through the SIGTERM
            assert agent.stop() == 0, agent.log()
    finally:
        agent.kill()


# --- hostile web pages and other local users (docs/SECURITY.md, "The HTTP API") ----------------
def _served(mesh: Mesh) -> tuple[int, int, float]:
    tokens = _scrape(mesh).get(("shardmesh_api_tokens_total", (("kind", "completion"),)), 0.0)
    return mesh.api.status()["tokens_served"], mesh.other.status()["tokens_served"], tokens


def test_a_form_post_is_refused_and_starts_no_generation(mesh: Mesh) -> None:
    """A cross-site page can make the browser POST a form, or `text/plain` that reads as
    JSON, without asking: both get 415 in OpenAI's format, and nothing is generated."""
    auth = {"Authorization": f"Bearer {KEY}"}  # past the key check, to reach the body's
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    before = _served(mesh)
    labels = (("endpoint", "/v1/completions"), ("status", "415"))
    requests_415 = ("shardmesh_api_requests_total", labels)
    counted = _scrape(mesh).get(requests_415, 0.0)
    form = httpx.post(f"{mesh.url}/v1/completions", data=body, headers=auth)
    plain = httpx.post(
        f"{mesh.url}/v1/completions",
        content=json.dumps(body),
        headers={**auth, "Content-Type": "text/plain"},
    )
    chat = httpx.post(
        f"{mesh.url}/v1/chat/completions",
        content=json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 4}),
        headers=auth,  # no Content-Type at all
    )
    for r in (form, plain, chat):
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    assert _served(mesh) == before
    assert _scrape(mesh)[requests_415] == counted + 2
    # The same request as JSON runs.
    ok = httpx.post(f"{mesh.url}/v1/completions", json=body, headers=auth, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_a_foreign_host_is_refused_and_the_listen_names_pass(mesh: Mesh) -> None:
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 still sends its own name."""
    port = mesh.url.rpartition(":")[2]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1", f"localhost:{int(port) + 1}"):
        client = openai.OpenAI(
            base_url=f"{mesh.url}/v1", api_key=KEY, max_retries=0, default_headers={"Host": host}
        )
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert info.value.status_code == 421, host
        assert info.value.code == "misdirected_request"
        # Before the key check: a rebound page learns nothing from it, key or no key.
        assert httpx.get(f"{mesh.url}/metrics", headers={"Host": host}).status_code == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost:{port}"):
        client = openai.OpenAI(
            base_url=f"{mesh.url}/v1", api_key=KEY, max_retries=0, default_headers={"Host": host}
        )
        assert [m.id for m in client.models.list().data] == [MODEL], host


def test_require_key_without_a_key_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "api.toml"
    cfg.write_text(f'[api]\nlisten = "127.0.0.1:{free_port()}"\nrequire_key = true\n')
    out = cli("up", "--state-dir", str(tmp_path / "s"), "--config", str(cfg), timeout=30)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "api.require_key" in lines[0] and "api.key_file" in lines[0]


def test_require_key_on_loopback_wants_the_key_everywhere(tmp_path: Path) -> None:
    """An agent of its own (API only, no model), so the module's mesh is not touched."""
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    os.chmod(keys, 0o600)
    port = free_port()
    cfg = tmp_path / "api.toml"
    cfg.write_text(f'[api]\nlisten = "127.0.0.1:{port}"\nkey_file = "{keys}"\nrequire_key = true\n')
    agent = Agent(tmp_path / "solo", ["--config", str(cfg)])
    try:
        agent.start()
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        authed = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/metrics", headers=authed).status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert good.models.list().data == []  # no model here: an empty list, not a 401
        assert agent.stop() == 0, agent.log()
    finally:
        agent.kill()
