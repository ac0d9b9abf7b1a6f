"""Requests for a model that is still loading, in-process: the pure decision (loading or not
served, what the message says), the bounded wait (trio's autojump clock), the route's final
error, the standalone client's wait, the request field, the control socket's "waiting" lines
and error code, the CLI's one waiting line, the HTTP API's 503 + Retry-After and model list,
and a failed load's one-line reason in the lifecycle."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from factories import OTHER_PEER, PEER, ad, peer_span

from agent.api.apimodels import ApiModels, Checkpoint, load_checkpoints
from agent.api.control import ControlError, serve_control, stream_request
from agent.api.openai_format import ApiError
from agent.api.responses import LOADING_RETRY_AFTER_S, SseOut, as_api_error
from agent.cli.generate import WaitingLine
from agent.config import AgentConfig, ApiConfig, ClientConfig
from agent.daemon.lifecycle import Lifecycle, load_error_line
from agent.errors import ShardmeshError
from agent.model.modelinfo import ModelInfo
from agent.route.generation import GenerateRequest
from agent.route.loading import (
    Loading,
    load_failures,
    loading_now,
    loading_state,
    wait_while_loading,
)
from agent.route.session import RouteSession
from agent.route.standalone import StandaloneView, wait_for_model
from agent.route.view import GenerationError, ModelLoading, ModelPeer

MODEL = "tiny-llama@ab12cd34"
A, B, C = "12D3KooWpeerAAAAAA", "12D3KooWpeerBBBBBB", "12D3KooWpeerCCCCCC"


def joining(peer: str, span: tuple[int, int] | None, reason: str = "") -> ModelPeer:
    if not reason:
        reason = f"loading blocks {span[0]}:{span[1]}" if span else "choosing blocks"
    return ModelPeer(peer, "joining", span, reason)


# --- the decision ------------------------------------------------------------------------------
def test_covered_is_not_loading() -> None:
    spans = [peer_span(A, 0, 4), peer_span(B, 4, 8)]
    assert loading_state(MODEL, 0, 8, spans, [joining(C, (0, 8))]) is None


def test_missing_blocks_with_nobody_loading_them_is_not_loading() -> None:
    spans = [peer_span(A, 0, 4)]
    assert loading_state(MODEL, 0, 8, spans, []) is None
    # A peer joining with blocks that are already online does not fill the hole.
    assert loading_state(MODEL, 0, 8, spans, [joining(C, (0, 4))]) is None
    # Nor does a peer that failed to load (online, no span) or one that is draining.
    failed = ModelPeer(C, "online", None, "load failed: no tensor 'x'")
    assert loading_state(MODEL, 0, 8, spans, [failed, ModelPeer(B, "draining", None, "")]) is None


def test_peers_loading_the_missing_blocks_make_it_loading() -> None:
    spans = [peer_span(A, 0, 4)]
    peers = [joining(C, None), joining(B, (4, 8))]
    loading = loading_state(MODEL, 0, 8, spans, peers)
    assert loading is not None
    assert loading.missing == (4, 5, 6, 7)
    assert [p.peer_id for p in loading.peers] == [B, C]  # by span, not chosen last
    assert loading.describe() == (
        "model tiny-llama is loading on 2 peers (blocks 4:8 on BBBBBB; "
        "blocks not chosen yet on CCCCCC: choosing blocks)"
    )
    assert "loading" in loading.describe()
    doc = loading.to_json()
    assert doc["missing"] == "blocks 4-7" and doc["message"] == loading.describe()
    assert doc["peers"][0] == {"peer_id": B, "span": [4, 8], "reason": "loading blocks 4:8"}


def test_joining_and_draining_spans_do_not_count_as_coverage() -> None:
    spans = [peer_span(A, 0, 8, state="joining"), peer_span(B, 0, 8, state="draining")]
    loading = loading_state(MODEL, 0, 8, spans, [joining(A, (0, 8))])
    assert loading is not None and loading.missing == tuple(range(8))
    assert loading.describe() == "model tiny-llama is loading on 1 peer (blocks 0:8 on AAAAAA)"


def test_an_avoided_online_peer_leaves_its_blocks_missing() -> None:
    spans = [peer_span(A, 0, 8), peer_span(B, 0, 8, state="joining")]
    peers = [joining(B, (0, 8))]
    assert loading_state(MODEL, 0, 8, spans, peers) is None
    loading = loading_state(MODEL, 0, 8, spans, peers, avoid={A})
    assert loading is not None and loading.missing == tuple(range(8))


def test_a_sub_range_asks_only_about_its_own_blocks() -> None:
    spans = [peer_span(A, 0, 4)]
    peers = [joining(B, (4, 8))]
    assert loading_state(MODEL, 0, 4, spans, peers) is None  # failover of 0:4: served
    loading = loading_state(MODEL, 4, 6, spans, peers)
    assert loading is not None and loading.missing == (4, 5)


def test_blocks_nobody_claims_are_named() -> None:
    loading = loading_state(MODEL, 0, 8, [peer_span(A, 0, 2)], [joining(B, (2, 6))])
    assert loading is not None and loading.unclaimed == (6, 7)
    assert loading.describe().endswith("; no peer serves or loads blocks 6-7 yet")


def test_this_agent_is_named_so() -> None:
    loading = loading_state(MODEL, 0, 8, [], [joining(A, (0, 8))], self_id=A)
    assert loading is not None
    assert loading.describe() == "model tiny-llama is loading on 1 peer (blocks 0:8 on this agent)"


def test_a_peers_reason_is_one_printable_line() -> None:
    evil = joining(B, (0, 8), reason="measuring\n\x1b[2Jspeed " + "x" * 500)
    line = loading_state(MODEL, 0, 8, [], [evil])
    assert line is not None
    text = line.describe()
    assert "\n" not in text and "\x1b" not in text and len(text) < 300


def test_many_loading_peers_are_counted_not_listed() -> None:
    peers = [joining(f"12D3KooWpeer{i:06d}", (i, i + 1)) for i in range(10)]
    loading = loading_state(MODEL, 0, 10, [], peers)
    assert loading is not None and loading.describe().count("blocks ") == 4
    assert "6 more" in loading.describe()


def test_failed_loads_are_noted() -> None:
    peers = [ModelPeer(A, "online", None, "load failed: out of memory"), joining(B, (0, 2))]
    assert load_failures(peers) == " (1 peer failed to load it: AAAAAA: load failed: out of memory)"
    assert load_failures([joining(B, (0, 2))]) == ""
    assert load_failures(peers, self_id=A).startswith(" (1 peer failed to load it: this agent: ")


# --- the wait ----------------------------------------------------------------------------------
class FakeView:
    """Spans and model peers a test changes as time goes by."""

    self_id = "client"
    local = None

    def __init__(self, spans: list[Any], peers: list[ModelPeer]) -> None:
        self.span_rows = spans
        self.peer_rows = peers

    def spans(self, model_id: str) -> list[Any]:
        return list(self.span_rows)

    def model_peers(self, model_id: str) -> list[ModelPeer]:
        return list(self.peer_rows)

    def peer_addrs(self, peer_id: str) -> list[str]:
        return []


class SpansOnlyView:
    """A view that cannot list model peers (older views, the tests' fakes)."""

    def spans(self, model_id: str) -> list[Any]:
        return []


async def test_the_wait_returns_at_once_when_covered_or_nobody_loads(
    autojump_clock: trio.abc.Clock,
) -> None:
    notices: list[Loading] = []

    async def notify(loading: Loading) -> None:
        notices.append(loading)

    t0 = trio.current_time()
    await wait_while_loading(FakeView([peer_span(A, 0, 8)], []), MODEL, 8, 30, notify)
    await wait_while_loading(FakeView([], []), MODEL, 8, 30, notify)
    await wait_while_loading(SpansOnlyView(), MODEL, 8, 30, notify)  # type: ignore[arg-type]
    assert trio.current_time() == t0 and notices == []
    assert loading_now(SpansOnlyView(), MODEL, 0, 8) is None  # type: ignore[arg-type]


async def test_the_wait_ends_when_the_blocks_come_online(autojump_clock: trio.abc.Clock) -> None:
    view = FakeView([], [joining(A, (0, 8))])
    notices: list[tuple[float, str]] = []

    async def notify(loading: Loading) -> None:
        notices.append((trio.current_time(), loading.describe()))

    async def finish_loading() -> None:
        await trio.sleep(12)
        view.span_rows = [peer_span(A, 0, 8)]
        view.peer_rows = [ModelPeer(A, "online", (0, 8), "serving blocks 0:8 of tiny-llama")]

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_loading)
        await wait_while_loading(view, MODEL, 8, 60, notify)
    assert 12 <= trio.current_time() - t0 < 12.5
    # Once at once, then a keepalive every NOTICE_EVERY_S (5 s) while nothing changed.
    assert [round(t - t0) for t, _ in notices] == [0, 5, 10]
    assert notices[0][1] == "model tiny-llama is loading on 1 peer (blocks 0:8 on AAAAAA)"


async def test_the_wait_gives_up_with_loading(autojump_clock: trio.abc.Clock) -> None:
    view = FakeView([], [joining(A, (0, 8), reason="loading blocks 0:8")])
    t0 = trio.current_time()
    with pytest.raises(ModelLoading) as caught:
        await wait_while_loading(view, MODEL, 8, 3.0)
    assert 3 <= trio.current_time() - t0 < 3.5
    msg = str(caught.value)
    assert "loading" in msg and "still loading after 3 s" in msg and "\n" not in msg
    assert isinstance(caught.value, GenerationError) and caught.value.code == "model_loading"


async def test_an_enclosing_deadline_shortens_the_wait(autojump_clock: trio.abc.Clock) -> None:
    """The API's request timeout (or the CLI's --timeout) ends the wait with "loading", not
    with a bare timeout."""
    view = FakeView([], [joining(A, (0, 8))])
    t0 = trio.current_time()
    with pytest.raises(ModelLoading), trio.fail_after(4):
        await wait_while_loading(view, MODEL, 8, 600)
    assert trio.current_time() - t0 == pytest.approx(3.5, abs=0.3)


async def test_the_wait_ignores_avoided_peers(autojump_clock: trio.abc.Clock) -> None:
    # The only online replica failed recently: blocks missing, and B loads them.
    view = FakeView([peer_span(A, 0, 8)], [joining(B, (0, 8))])
    with pytest.raises(ModelLoading):
        await wait_while_loading(view, MODEL, 8, 1.0, avoid=lambda: {A})


# --- the route's own error ---------------------------------------------------------------------
async def test_the_routes_error_says_loading_while_peers_load() -> None:
    cfg = ClientConfig(reroute_wait_s=0.0)
    view = FakeView([peer_span(A, 0, 4)], [joining(B, (4, 8))])
    session = RouteSession(view, MODEL, 8, max_length=16, cfg=cfg)  # type: ignore[arg-type]
    with pytest.raises(ModelLoading, match=re.escape("is loading on 1 peer (blocks 4:8 on BBB")):
        await session.open()


async def test_the_routes_error_names_peers_whose_load_failed() -> None:
    cfg = ClientConfig(reroute_wait_s=0.0)
    failed = ModelPeer(B, "online", None, "load failed: checkpoint has no tensor 'w'")
    view = FakeView([peer_span(A, 0, 4)], [failed])
    session = RouteSession(view, MODEL, 8, max_length=16, cfg=cfg)  # type: ignore[arg-type]
    with pytest.raises(GenerationError) as caught:
        await session.open()
    assert not isinstance(caught.value, ModelLoading)
    assert str(caught.value) == (
        f"model {MODEL} is not fully served: no usable peer serves blocks 4-7 "
        "(1 peer failed to load it: BBBBBB: load failed: checkpoint has no tensor 'w')"
    )


# --- the standalone client -----------------------------------------------------------------------
def _standalone() -> StandaloneView:
    mesh = SimpleNamespace(host=None, peer_id="client", is_connected=lambda pid: True)
    return StandaloneView(mesh)


async def test_standalone_view_lists_model_peers_and_waits_for_loading(
    autojump_clock: trio.abc.Clock,
) -> None:
    view = _standalone()
    view.on_ad(ad(PEER, state="joining", span=(0, 8), n_blocks=8, reason="loading blocks 0:8"))
    view.on_ad(ad(OTHER_PEER, model="other@1", model_name="other", span=(0, 8), n_blocks=8))
    assert view.model_peers(MODEL) == [ModelPeer(PEER, "joining", (0, 8), "loading blocks 0:8")]
    notices: list[str] = []

    async def notify(loading: Loading) -> None:
        notices.append(loading.describe())

    async def finish_loading() -> None:
        await trio.sleep(25)  # past the 20 s the model has to show up: loading waits on
        view.on_ad(ad(PEER, state="online", span=(0, 8), n_blocks=8, seq=8))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_loading)
        got = await wait_for_model(view, "tiny-llama", 20.0, loading_wait_s=60, notify=notify)
    assert got == (MODEL, 8)
    assert notices == [f"model tiny-llama is loading on 1 peer (blocks 0:8 on {PEER[-6:]})"]


async def test_standalone_wait_for_a_load_that_never_ends(autojump_clock: trio.abc.Clock) -> None:
    view = _standalone()
    view.on_ad(ad(PEER, state="joining", span=(0, 8), n_blocks=8))
    with pytest.raises(ModelLoading, match="loading"), trio.fail_after(30):
        await wait_for_model(view, "tiny-llama", 5.0, loading_wait_s=600)
    # Nobody loading: the old answer, after timeout_s.
    view = _standalone()
    view.on_ad(ad(PEER, state="online", span=(0, 4), n_blocks=8))
    with pytest.raises(GenerationError) as caught:
        await wait_for_model(view, "tiny-llama", 5.0, loading_wait_s=600)
    assert not isinstance(caught.value, ModelLoading)


# --- the request and the control socket ---------------------------------------------------------
def test_generate_request_takes_a_loading_wait() -> None:
    base = {"model": "m", "prompt_ids": [1, 2]}
    assert GenerateRequest.from_json(base).loading_wait_s is None
    assert GenerateRequest.from_json({**base, "loading_wait": 12}).loading_wait_s == 12.0
    for bad in (-1, "soon", math.inf):
        with pytest.raises(GenerationError, match="loading_wait"):
            GenerateRequest.from_json({**base, "loading_wait": bad})


async def test_control_socket_passes_waiting_lines_and_the_loading_code(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def generate(req: dict[str, Any], emit: Any) -> Any:
        await emit({"event": "waiting", "message": "model m is loading on 1 peer (...)"})
        if req.get("fail"):
            raise ModelLoading("model m is loading on 1 peer (...); still loading after 1 s")
        await emit({"token_id": 5, "text": "x"})
        return {"token_ids": [5]}

    def ask(**args: Any) -> list[dict[str, Any]]:
        return list(stream_request(path, "generate", timeout=10, **args))

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {}, {"generate": generate})
        events = await trio.to_thread.run_sync(ask)
        with pytest.raises(ControlError) as caught:
            await trio.to_thread.run_sync(lambda: ask(fail=True))
        nursery.cancel_scope.cancel()
    assert [e["event"] for e in events] == ["waiting", "token", "result"]
    assert caught.value.code == "model_loading" and "still loading" in str(caught.value)


def test_the_cli_prints_one_waiting_line(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    line = WaitingLine()
    line.show("model m is loading on 2 peers (blocks 0:4 on AAAAAA; blocks 4:8 on BBBBBB)")
    line.show("model m is loading on 1 peer (blocks 4:8 on BBBBBB)")
    assert err.getvalue() == (
        "waiting: model m is loading on 2 peers (blocks 0:4 on AAAAAA; blocks 4:8 on BBBBBB)\n"
    )


# --- the HTTP API ------------------------------------------------------------------------------
def _ck(name: str, digest: str) -> Checkpoint:
    info = ModelInfo(
        model_id=f"{name}@{digest}",
        name=name,
        model_type="llama",
        n_blocks=4,
        hidden_size=8,
        vocab_size=16,
        torch_dtype=None,
        path=Path("/nonexistent"),
    )
    return Checkpoint(info)


def test_api_lists_a_loading_model_and_accepts_requests_for_it() -> None:
    local = {c.info.model_id: c for c in (_ck("a", "1"), _ck("c", "3"), _ck("e", "5"))}
    known = {"a@1": ("a", 4), "c@3": ("c", 4), "e@5": ("e", 4)}
    complete = {"a@1": True, "c@3": False, "e@5": False}
    asked: list[tuple[str, int]] = []

    def is_loading(model_id: str, n_blocks: int) -> bool:
        asked.append((model_id, n_blocks))
        return model_id == "c@3"

    models = ApiModels(
        local,
        lambda: known,
        lambda: [{"model": m, "complete": ok} for m, ok in complete.items()],
        is_loading,
    )
    assert [(i, st) for i, _, st in models.listed_states()] == [("a", "ready"), ("c", "loading")]
    assert [i for i, _ in models.listed()] == ["a", "c"]
    assert ("c@3", 4) in asked and ("a@1", 4) not in asked  # covered: no need to ask
    assert models.resolve("c").state == "loading" and models.resolve("a").state == "ready"
    with pytest.raises(ApiError) as caught:
        models.resolve("e")  # not covered, nobody loading: at once, as before
    assert (caught.value.status, caught.value.code) == (503, "model_not_covered")


def test_a_bad_model_dir_leaves_the_api_without_it_but_bad_model_dirs_stop_it(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-model"
    cfg = AgentConfig(state_dir=tmp_path, model=missing)
    assert load_checkpoints(cfg) == {}  # the agent's own "load failed" line says why
    bad = dataclasses.replace(cfg, model=None, api=ApiConfig(model_dirs=(missing,)))
    with pytest.raises(ShardmeshError, match=r"api\.model_dirs"):
        load_checkpoints(bad)


def test_a_loading_model_is_503_with_retry_after() -> None:
    err = as_api_error(ModelLoading("model m is loading on 1 peer (...)"), 600)
    assert (err.status, err.code, err.type) == (503, "model_loading", "server_error")
    assert err.headers == {"Retry-After": str(LOADING_RETRY_AFTER_S)}
    assert "loading" in err.body()["error"]["message"]
    plain = as_api_error(GenerationError("model m is not fully served: ..."), 600)
    assert (plain.status, plain.code, plain.headers) == (503, "mesh_unavailable", {})


async def test_an_error_body_carries_its_headers() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    err = as_api_error(ModelLoading("model m is loading"), 600)
    await SseOut(send).json(err.status, err.body(), err.headers)
    start, body = sent
    assert start["status"] == 503
    assert (b"retry-after", str(LOADING_RETRY_AFTER_S).encode()) in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "model_loading"


# --- a failed load -----------------------------------------------------------------------------
class Publisher:
    async def publish_ad(self, state: str | None = None) -> None:
        pass


def test_load_error_lines_are_one_line() -> None:
    assert load_error_line(ShardmeshError("checkpoint in /m has no tensor 'w'")) == (
        "checkpoint in /m has no tensor 'w'"
    )
    assert load_error_line(MemoryError()) == "out of memory"
    oom = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory.\nTried 2 GiB")
    assert load_error_line(oom) == "out of memory (CUDA out of memory. Tried 2 GiB)"
    multi = RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for w " + "x" * 900)
    line = load_error_line(multi)
    assert line.startswith("RuntimeError: Error(s) in loading state_dict: size mismatch")
    assert "\n" not in line and len(line) <= 300
    assert load_error_line(OSError()) == "OSError"


async def test_a_failed_load_is_online_with_the_reason() -> None:
    lc = Lifecycle(Publisher())
    assert lc.load_failed("checkpoint in /m has no tensor 'w'")
    assert (lc.state, lc.reason()) == ("online", "load failed: checkpoint in /m has no tensor 'w'")
    await lc.stop(1.0)  # nothing loaded: straight to leaving
    assert lc.state == "leaving"
    assert not lc.load_failed("late")  # a signal while loading wins
    assert lc.state == "leaving"
