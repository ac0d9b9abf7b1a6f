"""Forward-stream limits a hostile peer cannot step around, and a client a hostile server
cannot exhaust.

Server side, against a real agent (tight [limits]): garbage, errors and refused requests do
not keep a session past its idle timeout (only steps that run do); a peer over its stream cap
gets its extra streams reset while another peer is served exactly; the bytes of a large frame
in progress are charged to the peer's byte rate as they arrive, and slow it, before the frame
is complete. Client side: an answer is held to the bytes its request needs, refused at its
4-byte length prefix (a fake server in this process claims 1 GiB), and the route fails over.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from agentproc import Agent, serving_tiny_model, wait_for

from agent.config import LimitsConfig, load_config
from agent.config.errors import ConfigError
from agent.net.framed import (
    RESULT_OVERHEAD,
    SMALL_REPLY_BYTES,
    FramedStream,
    StreamGone,
    result_limit,
)
from agent.policy.routing import Hop
from agent.policy.snapshot import PeerSpan
from agent.route.health import PeerHealth
from agent.route.hops import HopError, RemoteHop
from agent.route.session import RouteSession
from agent.route.view import ClientConfig
from protocol import (
    FORWARD_PROTOCOL_ID,
    ErrorReply,
    OpenSession,
    Role,
    SessionOpened,
    Step,
    StepResult,
    TensorFrame,
    encode_frame,
)
from protocol.forward import (
    MAX_ERROR_CODE_LEN,
    MAX_ERROR_MESSAGE_LEN,
    MAX_SESSION_ID_LEN,
    MAX_STEP,
)

HIDDEN = 64
SPAN = (0, 4)
GARBAGE = b"\x00\x00\x00\x07garbage"  # an honest prefix around a body that is no message
OPENED = SessionOpened(session_id="s1", max_length=32, kv_free_tokens=100)


# --- config ---------------------------------------------------------------------------------------


def test_new_limits_have_safe_defaults_and_are_checked(tmp_path: Path) -> None:
    lim = LimitsConfig()
    assert lim.per_peer_streams == 8
    assert lim.per_peer_session_share <= 0.25 and lim.per_peer_kv_share <= 0.25
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[limits]\nper_peer_streams = 3\nper_peer_session_share = 0.5\nper_peer_kv_share = 1\n"
    )
    loaded = load_config(cfg, {}).limits
    assert (loaded.per_peer_streams, loaded.per_peer_session_share) == (3, 0.5)
    assert loaded.per_peer_kv_share == 1.0
    for bad, key in [
        ("per_peer_streams = 0", "limits.per_peer_streams"),
        ("per_peer_session_share = 0", "limits.per_peer_session_share"),
        ("per_peer_kv_share = 1.5", "limits.per_peer_kv_share"),
        ("per_peer_kv_share = nan", "limits.per_peer_kv_share"),
    ]:
        cfg.write_text(f"[limits]\n{bad}\n")
        with pytest.raises(ConfigError, match=key):
            load_config(cfg, {})


# --- the client's bound on answers, sans network ------------------------------------------------


def test_answer_limits_hold_the_largest_honest_answers() -> None:
    tensor = TensorFrame("bfloat16", (1 << 16, 1 << 20, 1 << 30, 7), b"\x00" * 6)
    result = StepResult(step=MAX_STEP, hidden=tensor, elapsed_ms=1e9 - 1)
    assert len(encode_frame(result)) - 4 - len(tensor.data) <= RESULT_OVERHEAD
    assert result_limit(10**6) == 10**6 + RESULT_OVERHEAD
    worst_error = ErrorReply(
        code="\U0001f600" * MAX_ERROR_CODE_LEN,
        message="\U0001f600" * MAX_ERROR_MESSAGE_LEN,
        step=MAX_STEP,
    )
    assert len(encode_frame(worst_error)) - 4 <= SMALL_REPLY_BYTES == result_limit(0)
    opened = SessionOpened("\U0001f600" * MAX_SESSION_ID_LEN, 1 << 24, MAX_STEP)
    assert len(encode_frame(opened)) - 4 <= SMALL_REPLY_BYTES


class FakeStream:
    """A libp2p stream's read/write over in-memory bytes (reads return at most n)."""

    def __init__(self) -> None:
        self.incoming = bytearray()
        self.read_sizes: list[int] = []
        self.written = bytearray()

    async def read(self, n: int) -> bytes:
        await trio.sleep(0)
        if not self.incoming:
            return b""  # EOF
        chunk = bytes(self.incoming[:n])
        del self.incoming[:n]
        self.read_sizes.append(len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close(self) -> None:
        pass


def _step(q: int = 2) -> Step:
    return Step(step=1, position=0, hidden=TensorFrame("float32", (1, q, HIDDEN), bytes(q * 256)))


async def test_client_refuses_an_oversized_answer_after_its_prefix() -> None:
    stream = FakeStream()
    framed = FramedStream(stream, max_frame=1 << 30, role=Role.CLIENT, max_discard=0)  # type: ignore[arg-type]
    await framed.send_event(OpenSession("m", 0, 4, 32, "float32", 1))
    stream.incoming += encode_frame(OPENED)
    assert await framed.next_event(max_frame=SMALL_REPLY_BYTES) == OPENED
    step = _step()
    await framed.send_event(step, expect_shape=step.hidden.shape)
    # The answer claims a 1 GiB frame (the decoder itself would take it) and its body follows.
    stream.incoming += struct.pack(">I", 1 << 30) + bytes(1 << 20)
    before = framed.bytes_in
    with pytest.raises(StreamGone, match="exceeds the limit"):
        await framed.next_event(max_frame=result_limit(len(step.hidden.data)))
    assert framed.bytes_in - before == 4  # the prefix, nothing of the body
    assert len(stream.incoming) == 1 << 20


async def test_client_takes_an_answer_of_the_size_it_asked_for() -> None:
    stream = FakeStream()
    framed = FramedStream(stream, max_frame=1 << 30, role=Role.CLIENT, max_discard=0)  # type: ignore[arg-type]
    await framed.send_event(OpenSession("m", 0, 4, 32, "float32", 1))
    stream.incoming += encode_frame(OPENED)
    await framed.next_event(max_frame=SMALL_REPLY_BYTES)
    step = _step(q=300)
    await framed.send_event(step, expect_shape=step.hidden.shape)
    answer = StepResult(step=1, hidden=step.hidden, elapsed_ms=1.0)
    stream.incoming += encode_frame(answer)
    assert await framed.next_event(max_frame=result_limit(len(step.hidden.data))) == answer
    # An answer followed by the start of a frame nobody asked for (read with it): the next
    # answer cannot be told from it, so the stream is refused before that frame grows.
    small = Step(step=2, position=300, hidden=_step().hidden)
    await framed.send_event(small, expect_shape=small.hidden.shape)
    stream.incoming += encode_frame(StepResult(2, small.hidden, 1.0))
    stream.incoming += struct.pack(">I", 1 << 29) + bytes(6)
    assert isinstance(await framed.next_event(max_frame=result_limit(512)), StepResult)
    assert not stream.incoming  # both came in one read
    third = Step(step=3, position=302, hidden=_step().hidden)
    await framed.send_event(third, expect_shape=third.hidden.shape)
    with pytest.raises(StreamGone, match="answer nothing"):
        await framed.next_event(max_frame=result_limit(512))


async def test_on_read_is_awaited_per_chunk_before_the_next_read() -> None:
    stream = FakeStream()
    events: list[str] = []

    async def on_read(n: int) -> None:
        events.append(f"charge {n} after {len(stream.read_sizes)} reads")

    framed = FramedStream(
        stream,  # type: ignore[arg-type]
        max_frame=1 << 20,
        on_read=on_read,
        read_max=1000,
    )
    frame = encode_frame(_step(q=10))  # 2,560 bytes of tensor: several reads
    stream.incoming += frame
    msg = await framed.receive()
    assert isinstance(msg, Step)
    assert stream.read_sizes and max(stream.read_sizes) <= 1000
    assert sum(stream.read_sizes) == len(frame)
    assert events == [f"charge {n} after {i + 1} reads" for i, n in enumerate(stream.read_sizes)]


# --- a hostile server: a libp2p host in this process -------------------------------------------


class HonestHop:
    """A hop computing toy blocks (x * 2 + 1) in this process."""

    def __init__(self, hop: Hop) -> None:
        self.peer_id, self.start, self.end = hop.peer_id, hop.start, hop.end

    async def open(self, model_id: str, max_length: int, batch: int) -> None:
        pass

    async def step(self, h: torch.Tensor, position: int) -> torch.Tensor:
        return h * 2 + 1

    async def close(self) -> None:
        pass


class RecordingHop(RemoteHop):
    read: list[int] = []

    async def close(self) -> None:
        if self.framed is not None:
            RecordingHop.read.append(self.framed.bytes_in)
        await super().close()


@pytest.mark.procs
async def test_client_refuses_a_huge_answer_at_its_prefix_and_fails_over() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol

    from agent.config import MeshConfig
    from agent.net.mesh import open_mesh
    from agent.route.standalone import open_standalone

    written: list[int] = []

    async def evil(stream: Any) -> None:
        """Opens a session like anyone, then answers the Step with a 1 GiB frame's prefix and
        as much of its body as the client will take (bounded by time)."""
        framed = FramedStream(stream, max_frame=1 << 20, role=Role.SERVER)
        try:
            assert isinstance(await framed.next_event(), OpenSession)
            await framed.send_event(OPENED)
            assert isinstance(await framed.next_event(), Step)
            await framed.write(struct.pack(">I", 1 << 30))
            written.append(4)
            with trio.move_on_after(5):
                while True:
                    await framed.write(bytes(1 << 16))
                    written.append(1 << 16)
        except StreamGone:
            pass
        finally:
            await framed.close()

    async with open_mesh(MeshConfig(), create_new_key_pair()) as evil_mesh:
        evil_mesh.host.set_stream_handler(TProtocol(FORWARD_PROTOCOL_ID), evil)
        evil_id = evil_mesh.peer_id
        async with open_standalone(evil_mesh.listen_addrs()) as standalone:

            class View:
                host, mesh, self_id = standalone.host, standalone.mesh, standalone.self_id
                local = None
                serving = None

                def spans(self, model_id: str) -> list[PeerSpan]:
                    return [
                        PeerSpan(p, 0, 4, 1000.0, "online", 0, 10**6) for p in (evil_id, "good")
                    ]

                def peer_addrs(self, peer_id: str) -> list[str]:
                    return evil_mesh.listen_addrs()

            class Session(RouteSession):
                def _make_hop(self, hop: Hop) -> Any:
                    if hop.peer_id == evil_id:
                        return RecordingHop(self.view, hop, self.cfg, self.health)
                    return HonestHop(hop)

            RecordingHop.read.clear()
            session = Session(
                View(),  # type: ignore[arg-type]
                "m",
                4,
                max_length=32,
                health=PeerHealth(rtt_ms={evil_id: 1.0, "good": 50.0}),
            )
            x = torch.randn(1, 3, HIDDEN)
            t0 = time.monotonic()
            with trio.fail_after(20):
                await session.open()
                assert session.route()[0]["peer_id"] == evil_id  # the cheaper peer first
                out = await session.step(x, 0)
            took = time.monotonic() - t0
            route = session.route()
            await session.close()
    assert torch.equal(out, x * 2 + 1)
    assert session.failovers == 1 and [r["peer_id"] for r in route] == ["good"]
    assert "refused at its prefix" in session.failures[0], session.failures
    # What the client read from the liar: its SessionOpened and the 4 bytes of a prefix.
    assert RecordingHop.read == [len(encode_frame(OPENED)) + 4]
    assert took < 10, took  # refused at once, not after a step timeout


# --- a real agent with tight limits -------------------------------------------------------------

IDLE_S = 4.0
STREAM_CAP = 3
BYTE_RATE = 1 << 20  # 1 MiB/s (and a second's burst)
LIMITS = f"""
[limits]
session_idle_timeout = {IDLE_S}
per_peer_streams = {STREAM_CAP}
per_peer_bytes_per_s = {float(BYTE_RATE)}
max_frame_bytes = {4 << 20}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    with serving_tiny_model(tmp_path_factory.mktemp("fwdlimits"), LIMITS) as (agent, model):
        yield agent, model


async def _status(agent: Agent) -> dict[str, Any]:
    return await trio.to_thread.run_sync(agent.status)


def _local(model: Path) -> Any:
    from agent.model.blocks import ShardModel

    return ShardModel.load(model, *SPAN, dtype="float32", device="cpu")


@pytest.mark.procs
async def test_slow_drip_garbage_does_not_keep_a_session_alive(served) -> None:
    from agent.route.standalone import open_standalone

    agent, _ = served
    model_id = (await _status(agent))["model"]
    gen = torch.Generator().manual_seed(0)
    async with open_standalone([agent.addrs[0]]) as view:
        hop = RemoteHop(view, Hop(agent.peer_id, *SPAN), ClientConfig(), PeerHealth())
        await hop.open(model_id, 32, 1)
        assert hop.framed is not None
        # Steps that run keep the session, even past the idle timeout in all.
        pos, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < IDLE_S * 1.5:
            await trio.sleep(IDLE_S / 4)
            await hop.step(torch.randn(1, 1, HIDDEN, generator=gen), pos)
            pos += 1
        last_useful = time.monotonic()
        # Then only garbage, refused steps and a second OpenSession, every 0.4 s: each gets
        # its error, none moves the idle deadline.
        bad = [
            GARBAGE,
            encode_frame(Step(99, pos + 5, TensorFrame("float32", (1, 1, HIDDEN), bytes(256)))),
            encode_frame(OpenSession(model_id, 0, 4, 8, "float32", 1)),
        ]
        codes: list[str] = []
        closed_after = None
        with trio.move_on_after(IDLE_S * 4):
            for i in range(1000):
                await trio.sleep(0.4)
                try:
                    await hop.framed.write(bad[i % len(bad)])
                    with trio.fail_after(IDLE_S):
                        reply = await hop.framed.receive()
                except StreamGone:
                    closed_after = time.monotonic() - last_useful
                    break
                assert isinstance(reply, ErrorReply), reply
                codes.append(reply.code)
        hop.framed = None
    assert closed_after is not None, f"the stream outlived {IDLE_S * 4} s of garbage: {codes}"
    assert IDLE_S - 0.5 < closed_after < IDLE_S + 4, (closed_after, codes)
    assert {"malformed", "position", "bad_request"} <= set(codes), codes
    await trio.to_thread.run_sync(
        wait_for, lambda: agent.status()["sessions"] == 0, 10, "the idle session to close"
    )


@pytest.mark.procs
async def test_streams_over_the_cap_are_reset_while_another_peer_is_served(served) -> None:
    from agent.route.standalone import open_standalone

    agent, model = served
    model_id = (await _status(agent))["model"]
    refused_before = (await _status(agent))["peer_limits"]["refused"].get("too_many_streams", 0)
    local = _local(model)
    x = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(1))
    want = local.forward(local.new_cache(), x, 0)
    async with open_standalone([agent.addrs[0]]) as a, open_standalone([agent.addrs[0]]) as b:

        def hop(view: Any) -> RemoteHop:
            return RemoteHop(view, Hop(agent.peer_id, *SPAN), ClientConfig(), PeerHealth())

        held = [hop(a) for _ in range(STREAM_CAP)]
        for h in held:
            await h.open(model_id, 8, 1)
        for _ in range(2):
            over = hop(a)
            with trio.fail_after(8), pytest.raises(HopError):
                await over.open(model_id, 8, 1)  # reset at once: no session, no answer
            await over.close()
        # The peer's streams within the cap are untouched, and another peer notices nothing.
        assert (await held[0].step(x, 0) - want).abs().max().item() < 1e-5
        other = hop(b)
        await other.open(model_id, 8, 1)
        assert (await other.step(x, 0) - want).abs().max().item() < 1e-5
        await other.close()
        status = await _status(agent)
        assert status["peer_limits"]["refused"]["too_many_streams"] >= refused_before + 2
        # A stream closed frees its place.
        await held[0].close()
        again = hop(a)
        deadline = time.monotonic() + 10
        while True:
            try:
                await again.open(model_id, 8, 1)
                break
            except HopError:
                await again.close()
                assert time.monotonic() < deadline, "the closed stream's place never freed"
                await trio.sleep(0.2)
        await again.close()
        for h in held[1:]:
            await h.close()


@pytest.mark.procs
async def test_a_large_partial_frame_is_charged_and_slowed_before_it_completes(served) -> None:
    from libp2p.peer.id import ID

    from agent.route.standalone import open_standalone

    agent, _ = served
    before = (await _status(agent))["peer_limits"]
    claimed, sent = 3 << 20, 2 << 20  # a 3 MiB frame (under max_frame_bytes), 2 MiB of it
    async with open_standalone([agent.addrs[0]]) as view:
        stream = await view.host.new_stream(ID.from_base58(agent.peer_id), [FORWARD_PROTOCOL_ID])
        t0 = time.monotonic()
        await stream.write(struct.pack(">I", claimed))
        piece = bytes(1 << 16)
        for _ in range(sent // len(piece)):
            await stream.write(piece)

        def charged() -> dict[str, Any] | None:
            s = agent.status()["peer_limits"]
            return s if s["bytes_charged"] - before["bytes_charged"] >= sent else None

        # The agent reads (and charges) all of it although the frame never completes, at
        # the peer's byte rate: 2 MiB at 1 MiB/s with a second's burst takes a second.
        after = await trio.to_thread.run_sync(
            lambda: wait_for(charged, IDLE_S - 1, "bytes charged", interval=0.02)
        )
        read_s = time.monotonic() - t0
        await stream.reset()
    assert after["throttled_reads"] > before["throttled_reads"]
    assert read_s > 0.8, read_s
