"""The HTTP API's pure parts, without sockets: OpenAI request parsing and response shapes
(checked against the official package's own types), stop sequences, API keys, the listen
address rules, model listing, and the metrics collector."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

from agent.api.apikeys import ApiKeyError, check_bearer, load_api_keys
from agent.api.apimodels import ApiModels, Checkpoint
from agent.api.metrics import ApiMetrics
from agent.api.openai_format import (
    ApiError,
    Reply,
    StopText,
    completion_budget,
    finish_reason,
    parse_chat,
    parse_completion,
    sse,
    usage,
)
from agent.config import ConfigError, api_address, is_loopback, load_config
from agent.model.modelinfo import ModelInfo

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# --- requests --------------------------------------------------------------------------------
def test_chat_defaults_follow_openai() -> None:
    req = parse_chat(CHAT)
    s = req.settings
    assert (s.model, s.max_tokens, s.temperature, s.top_p, s.seed) == ("m", None, 1.0, 1.0, None)
    assert (s.stop, s.stream, s.include_usage) == ((), False, False)
    assert req.messages == ({"role": "user", "content": "hi"},)


def test_chat_options_and_content_parts() -> None:
    req = parse_chat(
        {
            **CHAT,
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "ignored",
            "presence_penalty": 0,
        }
    )
    s = req.settings
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop) == (7, 0.0, 0.5, 3, ("\n",))
    assert s.stream and s.include_usage
    assert req.messages[1]["content"] == "a\nb"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": "1"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_chat_bad_requests_name_the_parameter(change: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat({**CHAT, **change})
    err = info.value
    assert err.status == 400 and err.param == param
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_body_must_be_an_object() -> None:
    with pytest.raises(ApiError, match="JSON object"):
        parse_chat(["not", "a", "dict"])


@pytest.mark.parametrize(
    ("prompt", "want"),
    [("abc", "abc"), (["abc"], "abc"), ([1, 2, 3], (1, 2, 3)), ([[4, 5]], (4, 5))],
)
def test_completion_prompt_shapes(prompt: Any, want: Any) -> None:
    assert parse_completion({"model": "m", "prompt": prompt}).prompt == want


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "prompt": ["a", "b"]},
        {"model": "m", "prompt": [1, "b"]},
        {"model": "m", "prompt": "a", "echo": True},
        {"model": "m", "prompt": "a", "logprobs": 2},
        {"model": "m", "prompt": "a", "suffix": "z"},
        {"model": "m", "prompt": "a", "best_of": 3},
    ],
)
def test_completion_bad_requests(body: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        parse_completion(body)
    assert info.value.status == 400


def test_completion_budget() -> None:
    assert completion_budget(None, False, 10, 100) == 16  # OpenAI's completion default
    assert completion_budget(None, True, 10, 100) == 90  # chat: what the context leaves
    assert completion_budget(None, True, 10, 10_000) == 2048  # ... up to a cap
    assert completion_budget(None, False, 95, 100) == 5
    assert completion_budget(50, False, 10, 100) == 50
    assert completion_budget(50, False, 10, None) == 50
    with pytest.raises(ApiError) as info:
        completion_budget(91, False, 10, 100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(ApiError, match="more than the 100-token context"):
        completion_budget(None, True, 100, 100)


# --- stop sequences -------------------------------------------------------------------------
def _feed(stop: StopText, deltas: list[str]) -> str:
    return "".join(stop.add(d) for d in deltas)


def test_stop_across_tokens_holds_back_a_possible_start() -> None:
    s = StopText(["\n\nUser:"])
    assert s.add("Hello") == "Hello"
    assert s.add("\n") == ""  # might start the stop sequence
    assert s.add("\n") == ""
    assert s.add("Us") == ""
    assert s.add("er:") == "" and s.hit
    assert s.text == "Hello"
    assert s.add("more") == ""  # nothing after a hit


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    s = StopText(["ab"])
    assert s.add("xa") == "x"
    assert s.add("c") == "ac" and not s.hit
    assert s.add("b") == "b"


def test_earliest_of_several_stops_wins() -> None:
    s = StopText(["cd", "b"])
    assert _feed(s, ["abcd"]) == "a" and s.text == "a" and s.hit


def test_no_stops_passes_everything() -> None:
    s = StopText([])
    assert _feed(s, ["a", "", "bc"]) == "abc" and not s.hit


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="ab\n", max_size=4), max_size=12),
    st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), max_size=3),
)
def test_stop_text_equals_cutting_the_whole_text(deltas: list[str], stops: list[str]) -> None:
    s = StopText(stops)
    shown = _feed(s, deltas)
    # Generation stops after the first delta that completes a stop (later text is never
    # generated); the answer is that text cut at the earliest stop it holds.
    whole = ""
    cuts: list[int] = []
    for delta in deltas:
        whole += delta
        cuts = [whole.find(x) for x in stops if x in whole]
        if cuts:
            break
    want = whole[: min(cuts)] if cuts else whole
    assert s.hit == bool(cuts)
    assert s.text == want
    # What was shown is a prefix of the answer; the held-back rest is at most a stop's length.
    assert want.startswith(shown)
    if not s.hit:
        assert len(want) - len(shown) < max((len(x) for x in stops), default=1)


def test_finish_reason() -> None:
    assert finish_reason([5, 2], {2}, False, 10) == "stop"  # end-of-sequence token
    assert finish_reason([5, 6], {2}, True, 10) == "stop"  # stop sequence
    assert finish_reason([5, 6], {2}, False, 2) == "length"
    assert finish_reason([5, 2], {2}, False, 2) == "stop"  # eos as the last allowed token


# --- responses (validated by the official client's types) ------------------------------------
def _reply(chat: bool) -> Reply:
    return Reply(chat=chat, id="x-1", created=1, model="tiny", fingerprint="shardmesh-ab")


def test_chat_bodies_parse_as_openai_types() -> None:
    r = _reply(True)
    full = ChatCompletion.model_validate(r.full("hi", "stop", usage(3, 2)))
    assert full.choices[0].message.content == "hi" and full.usage.total_tokens == 5
    first = ChatCompletionChunk.model_validate(r.chunk("h", first=True))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == "h"
    nxt = ChatCompletionChunk.model_validate(r.chunk("i"))
    assert nxt.choices[0].delta.role is None and nxt.choices[0].finish_reason is None
    last = ChatCompletionChunk.model_validate(r.chunk("", finish="length"))
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    tail = ChatCompletionChunk.model_validate(r.chunk("!", finish="stop"))
    assert tail.choices[0].delta.content == "!"
    used = ChatCompletionChunk.model_validate(r.usage_chunk(usage(3, 2)))
    assert used.choices == [] and used.usage.completion_tokens == 2


def test_completion_bodies_parse_as_openai_types() -> None:
    r = _reply(False)
    full = Completion.model_validate(r.full("abc", "length", usage(1, 3)))
    assert full.choices[0].text == "abc" and full.choices[0].finish_reason == "length"
    last = Completion.model_validate(r.chunk("a", finish="stop"))
    assert last.choices[0].text == "a" and last.choices[0].finish_reason == "stop"
    # Mid-stream chunks carry finish_reason null, as OpenAI's own stream does (the package's
    # Completion type, made for whole responses, insists on a reason).
    assert r.chunk("b")["choices"][0] == {
        "text": "b",
        "index": 0,
        "finish_reason": None,
        "logprobs": None,
    }


def test_sse_and_error_body() -> None:
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    err = ApiError(404, "no such model", code="model_not_found", param="model")
    assert err.body() == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


# --- API keys and the listen address -----------------------------------------------------------
def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_api_keys_load_and_check(tmp_path: Path) -> None:
    keys = load_api_keys(_key_file(tmp_path, "# ops\nsk-one\n\n  sk-two  \n"))
    assert keys == {"sk-one", "sk-two"}
    assert check_bearer("Bearer sk-two", keys)
    assert check_bearer("bearer sk-one", keys)
    assert not check_bearer("Bearer sk-three", keys)
    assert not check_bearer("Basic sk-one", keys)
    assert not check_bearer("Bearer ", keys)
    assert not check_bearer(None, keys)


@pytest.mark.parametrize(
    ("text", "mode", "needle"),
    [
        ("sk-one\n", 0o644, "chmod 600"),
        ("# only a comment\n", 0o600, "holds no key"),
        ("sk one\n", 0o600, "line 1"),
    ],
)
def test_bad_key_files_are_refused(tmp_path: Path, text: str, mode: int, needle: str) -> None:
    with pytest.raises(ApiKeyError, match=needle):
        load_api_keys(_key_file(tmp_path, text, mode))
    with pytest.raises(ApiKeyError, match="does not exist"):
        load_api_keys(tmp_path / "missing")


def test_listen_address_rules(tmp_path: Path) -> None:
    assert api_address(load_config(None, {"api.listen": "8080"}).api) == ("127.0.0.1", 8080)
    assert api_address(load_config(None, {"api.listen": ":81"}).api) == ("127.0.0.1", 81)
    assert api_address(load_config(None, {"api.listen": "[::1]:82"}).api) == ("::1", 82)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "example.com"))
    with pytest.raises(ConfigError, match="needs bearer keys"):
        load_config(None, {"api.listen": "0.0.0.0:8080"})
    cfg = load_config(None, {"api.listen": "0.0.0.0:8080", "api.key_file": str(tmp_path / "k")})
    assert cfg.api.key_file == tmp_path / "k"


# --- models offered ---------------------------------------------------------------------------
def _ck(name: str, digest: str, n_blocks: int = 4) -> Checkpoint:
    info = ModelInfo(
        name=name,
        model_id=f"{name}@{digest}",
        model_type="llama",
        n_blocks=n_blocks,
        hidden_size=8,
        vocab_size=16,
        torch_dtype=None,
        path=Path("/nonexistent"),
    )
    return Checkpoint(info)


def test_models_listed_when_covered_and_local() -> None:
    local = {c.info.model_id: c for c in (_ck("a", "1"), _ck("b", "2"), _ck("c", "3"))}
    known = {"a@1": ("a", 4), "b@2": ("b", 4), "b@9": ("b", 4), "d@4": ("d", 4)}
    complete = {"a@1": True, "b@2": True, "c@3": False, "d@4": True}
    models = ApiModels(
        local,
        lambda: known,
        lambda: [{"model": m, "complete": ok} for m, ok in complete.items()],
    )
    # "b" names two models on the mesh, so it is listed under its full id; d is not local.
    assert [api_id for api_id, _ in models.listed()] == ["a", "b@2"]
    assert models.resolve("a").api_id == "a"
    assert models.resolve("b@2").checkpoint.info.model_id == "b@2"
    for want, status, code in (
        ("zzz", 404, "model_not_found"),
        ("d", 404, "model_not_found"),  # served, but no local checkpoint
        ("c", 503, "model_not_covered"),
    ):
        with pytest.raises(ApiError) as info:
            models.resolve(want)
        assert (info.value.status, info.value.code) == (status, code)


# --- metrics ----------------------------------------------------------------------------------
def _fake_node() -> Any:
    """What /metrics reads of the agent (agent.api.metrics.MetricsSource)."""
    serving = SimpleNamespace(
        active_sessions=lambda: 2,
        tokens_served=123,
        kv_free_tokens=lambda: 900,
        errors_sent={"busy": 4},
        chosen_span=lambda: (2, 5),
        model_id="tiny@1",
        model_name="tiny",
    )
    mesh = SimpleNamespace(
        peer_id="12D3KooTest",
        connected_peers=lambda: ["p1", "p2"],
        validator=SimpleNamespace(rejected={"expired": 3, "bad_signature": 0}),
        bytes_in=10,
        bytes_out=20,
    )
    return SimpleNamespace(
        mesh=mesh,
        peer_states=lambda: ["online", "online", "joining"],
        state="online",
        started=0.0,
        serving=serving,
        coverage=lambda: [{"model": "tiny@1", "model_name": "tiny", "replicas": [1, 2, 1]}],
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_read_the_node_at_scrape_time() -> None:
    node = _fake_node()
    metrics = ApiMetrics(node, lambda: 7)
    metrics.count_request("/v1/models", 200)
    metrics.count_tokens(usage(5, 6))
    got = _samples(metrics.render().decode())
    model = (("model", "tiny@1"), ("model_name", "tiny"))
    assert got[("shardmesh_peers", (("state", "online"),))] == 2
    assert got[("shardmesh_peers", (("state", "joining"),))] == 1
    assert got[("shardmesh_peers", (("state", "draining"),))] == 0
    assert got[("shardmesh_state", (("state", "online"),))] == 1
    assert got[("shardmesh_connected_peers", ())] == 2
    assert got[("shardmesh_sessions", ())] == 2
    assert got[("shardmesh_tokens_served_total", ())] == 123
    assert got[("shardmesh_served_span_start", model)] == 2
    assert got[("shardmesh_served_span_end", model)] == 5
    assert got[("shardmesh_model_min_replicas", model)] == 1
    assert got[("shardmesh_ads_rejected_total", (("reason", "expired"),))] == 3
    assert got[("shardmesh_forward_errors_total", (("code", "busy"),))] == 4
    assert got[("shardmesh_failovers_total", ())] == 7
    assert got[("shardmesh_bytes_total", (("direction", "out"), ("kind", "gossip")))] == 20
    assert ("shardmesh_step_seconds_count", ()) in got
    assert ("shardmesh_batch_rows_count", ()) in got and ("shardmesh_batch_tokens_sum", ()) in got
    assert (
        got[("shardmesh_api_requests_total", (("endpoint", "/v1/models"), ("status", "200")))] == 1
    )
    assert got[("shardmesh_api_tokens_total", (("kind", "completion"),))] == 6
    # Live: a change on the node shows in the next scrape without any hook.
    node.serving.tokens_served = 500
    node.serving = None
    again = _samples(metrics.render().decode())
    assert again[("shardmesh_sessions", ())] == 0
    assert ("shardmesh_served_span_start", model) not in again
