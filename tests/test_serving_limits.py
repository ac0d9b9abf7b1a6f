"""Every bad forward request, one by one, against a real agent with tight limits: each gets
its error on the stream, changes nothing, and the next correct step is still exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
from agentproc import serving_tiny_model, wait_for

from agent.model.blocks import ShardModel
from agent.model.wire import to_frame
from agent.policy.routing import Hop
from agent.route.health import PeerHealth
from agent.route.hops import RemoteHop
from agent.route.standalone import open_standalone
from agent.route.view import ClientConfig
from protocol import ErrorReply, OpenSession, SessionOpened, Step

pytestmark = pytest.mark.procs

LIMITS = """
[limits]
max_sessions = 3
max_session_tokens = 64
kv_budget_tokens = 100
max_frame_bytes = 65536
# One client holds 80 of the 100 tokens below; by default a peer's share is half.
per_peer_kv_tokens = 100
"""
SPAN = (0, 4)
HIDDEN = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    with serving_tiny_model(tmp_path_factory.mktemp("limits"), LIMITS) as (agent, model):
        yield agent, model


async def _expect_error(hop: RemoteHop, msg: object, code: str) -> None:
    assert hop.framed is not None
    await hop.framed.send(msg)  # type: ignore[arg-type]
    with trio.fail_after(10):
        reply = await hop.framed.receive()
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == code, (reply.code, reply.message)


async def test_bad_requests_get_errors_and_change_nothing(served) -> None:
    agent, model_dir = served
    local = ShardModel.load(model_dir, *SPAN, dtype="float32", device="cpu")
    model_id = local.info.model_id
    ref_cache = local.new_cache()
    gen = torch.Generator().manual_seed(0)
    pos = 0

    def new_hop(view) -> RemoteHop:
        return RemoteHop(view, Hop(agent.peer_id, *SPAN), ClientConfig(), PeerHealth())

    async with open_standalone([agent.addrs[0]]) as view:
        session = new_hop(view)
        await session.open(model_id, 40, 1)

        async def good_step(q: int = 1) -> None:
            nonlocal pos
            x = torch.randn(1, q, HIDDEN, generator=gen)
            got = await session.step(x, pos)
            want = local.forward(ref_cache, x, pos)
            assert (got - want).abs().max().item() < 1e-5
            pos += q

        await good_step(5)
        s = Step(step=99, position=0, hidden=to_frame(torch.zeros(1, 1, HIDDEN)))

        def step(position: int, t: torch.Tensor) -> Step:
            return Step(step=1000 + position, position=position, hidden=to_frame(t))

        # Built at send time: `pos` moves on with every good step in between.
        bad_on_session = [
            (lambda: step(pos, torch.zeros(1, 1, 32)), "wrong_shape"),
            (lambda: step(pos, torch.zeros(2, 1, HIDDEN)), "wrong_shape"),  # batch 2 in batch 1
            (lambda: step(pos, torch.zeros(1, 1, HIDDEN, dtype=torch.float16)), "wrong_dtype"),
            (lambda: step(pos + 3, torch.zeros(1, 1, HIDDEN)), "position"),
            (lambda: s, "position"),
            (lambda: step(pos, torch.zeros(1, 40, HIDDEN)), "too_long"),  # past max_length 40
            (lambda: step(pos, torch.zeros(1, 300, HIDDEN)), "too_large"),  # 76,800 B > 64 KiB
            (lambda: OpenSession(model_id, 0, 4, 10, "float32", 1), "bad_request"),  # 2nd open
        ]
        for make, code in bad_on_session:
            await _expect_error(session, make(), code)
            await good_step()
        # A frame whose body is not a message at all.
        assert session.framed is not None
        await session.framed.stream.write(b"\x00\x00\x00\x07garbage")
        with trio.fail_after(10):
            reply = await session.framed.receive()
        assert isinstance(reply, ErrorReply) and reply.code == "malformed"
        await good_step()

        # Open-time refusals, each on a new stream; the good session is unaffected.
        other_model = model_id[:-4] + "beef"
        for args, code in [
            ((other_model, 0, 4, 10, "float32", 1), "wrong_model"),
            ((model_id, 2, 5, 10, "float32", 1), "span_not_served"),
            ((model_id, 0, 4, 65, "float32", 1), "too_long"),
            ((model_id, 0, 4, 10, "int64", 1), "wrong_dtype"),
        ]:
            hop = new_hop(view)
            with pytest.raises(Exception, match=code):
                await _open_raw(hop, OpenSession(*args))
            await hop.close()
        # KV budget 100 tokens: 40 held; 40 more fit; a third 40 does not.
        second = new_hop(view)
        await second.open(model_id, 40, 1)
        third = new_hop(view)
        with pytest.raises(Exception, match="kv_budget"):
            await _open_raw(third, OpenSession(model_id, 0, 4, 40, "float32", 1))
        await third.close()
        # Sessions: 3 allowed; the fourth is refused even though its 5 tokens would fit.
        small = new_hop(view)
        await small.open(model_id, 10, 1)
        fourth = new_hop(view)
        with pytest.raises(Exception, match="too_many_sessions"):
            await _open_raw(fourth, OpenSession(model_id, 0, 4, 5, "float32", 1))
        await fourth.close()
        # A step on a stream with no session.
        orphan = new_hop(view)
        await _open_stream(orphan)
        await _expect_error(orphan, step(0, torch.zeros(1, 1, HIDDEN)), "no_session")
        await orphan.close()
        # Closing (or losing) a stream frees its session and its KV reservation.
        await second.close()
        await small.close()
        wait_for(lambda: agent.status()["sessions"] == 1, 10, "sessions to be freed")
        again = new_hop(view)
        await again.open(model_id, 40, 1)
        await again.close()
        await good_step()
        await session.close()
    status = await trio.to_thread.run_sync(agent.status)
    errors = status["forward_errors"]
    for code in (
        "wrong_shape",
        "wrong_dtype",
        "position",
        "too_long",
        "too_large",
        "malformed",
        "bad_request",
        "wrong_model",
        "span_not_served",
        "kv_budget",
        "too_many_sessions",
        "no_session",
    ):
        assert errors.get(code, 0) >= 1, (code, errors)


async def _open_stream(hop: RemoteHop) -> None:
    from libp2p.peer.id import ID

    from agent.net.framed import FramedStream
    from protocol import FORWARD_PROTOCOL_ID

    stream = await hop.host.new_stream(ID.from_base58(hop.peer_id), [FORWARD_PROTOCOL_ID])
    hop.framed = FramedStream(stream, max_frame=1 << 30)


async def _open_raw(hop: RemoteHop, msg: OpenSession) -> None:
    await _open_stream(hop)
    assert hop.framed is not None
    await hop.framed.send(msg)
    with trio.fail_after(10):
        reply = await hop.framed.receive()
    if isinstance(reply, ErrorReply):
        raise RuntimeError(f"{reply.code}: {reply.message}")
    assert isinstance(reply, SessionOpened)


async def test_agent_survives_and_reports(served) -> None:
    """Abused here on streams of its own (whatever ran before, or did not), the agent answers
    each abuse, frees the dropped session, still computes exactly, and logs no traceback."""
    agent, model_dir = served
    status = await trio.to_thread.run_sync(agent.status)
    before, model_id = status["forward_errors"], status["model"]
    local = ShardModel.load(model_dir, *SPAN, dtype="float32", device="cpu")

    async with open_standalone([agent.addrs[0]]) as view:

        def new_hop() -> RemoteHop:
            return RemoteHop(view, Hop(agent.peer_id, *SPAN), ClientConfig(), PeerHealth())

        abused = new_hop()
        await abused.open(model_id, 40, 1)
        assert abused.framed is not None
        await abused.framed.stream.write(b"\x00\x00\x00\x07garbage")  # not a message at all
        with trio.fail_after(10):
            reply = await abused.framed.receive()
        assert isinstance(reply, ErrorReply) and reply.code == "malformed", reply
        huge = Step(step=0, position=0, hidden=to_frame(torch.zeros(1, 300, HIDDEN)))
        await _expect_error(abused, huge, "too_large")  # 76,800 B > 64 KiB
        await abused.framed.stream.reset()  # gone mid-session, without a CloseSession
        # Still serving, and exactly.
        fresh = new_hop()
        await fresh.open(model_id, 40, 1)
        x = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(1))
        got = await fresh.step(x, 0)
        assert (got - local.forward(local.new_cache(), x, 0)).abs().max().item() < 1e-5
        await fresh.close()

    def settled() -> dict | None:
        s = agent.status()
        return s if s["sessions"] == 0 else None

    s = await trio.to_thread.run_sync(wait_for, settled, 10, "the dropped session to be freed")
    assert s["state"] == "online" and s["span"] == list(SPAN)
    assert "/shardmesh/forward/1.0.0" in s["protocols"]
    errors = s["forward_errors"]
    for code in ("malformed", "too_large"):  # this test's own abuse reached the agent
        assert errors.get(code, 0) > before.get(code, 0), (code, before, errors)
    assert Path(agent.log_path).exists() and "Traceback" not in agent.log()
