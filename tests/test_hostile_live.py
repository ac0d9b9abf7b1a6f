"""Thousands of random and malformed frames and ads against live agents, from several peers at
once; afterwards the agents still serve a generation whose tokens equal Hugging Face's.

Two agent processes serve the halves of a tiny llama. Hostile peers are real libp2p hosts in
this process (the agent's own mesh code, so they are accepted like any peer). Each one, at the
same time as the others: opens many forward-protocol streams to both agents and writes random
bytes, truncated frames, length prefixes announcing huge frames, valid frames followed by
garbage, runs of malformed frames with honest prefixes, allocation bombs, a valid OpenSession
followed by malformed Steps, and streams reset mid-frame; and publishes hundreds of random and
malformed capacity ads. Everything is bounded by count and by time.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import json
import random
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
from agentproc import Agent, cli, stop_all, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factories import bare_ad, libp2p_identity

from protocol import (
    CAPACITY_TOPIC,
    FORWARD_PROTOCOL_ID,
    DecodeError,
    ErrorReply,
    FrameDecoder,
    OpenSession,
    Step,
    TensorFrame,
    encode_frame,
    encode_signed_ad,
    pack,
)

pytestmark = pytest.mark.procs

SPANS = [(0, 3), (3, 6)]
N_HOSTILE = 4  # peers attacking at once
STREAMS_PER_TARGET = 12  # forward streams per hostile peer per agent
ADS_PER_PEER = 500
CONCURRENT_STREAMS = 6  # per hostile peer
ATTACK_S = 30.0  # hard bound on the whole attack phase
STREAM_S = 8.0  # bound on one hostile stream (write, then read replies until the agent closes)
WRITE_SIZE = 32 * 1024
PROMPT = [5, 17, 42, 99, 123, 7, 300]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    from agent.model.tiny import ensure_tiny_model

    root = tmp_path_factory.mktemp("hostile")
    model = ensure_tiny_model("llama", root / "models")
    agents: list[Agent] = []
    try:
        base = ["--model", str(model), "--threads", "1"]
        first = Agent(root / "a0", [*base, "--blocks", f"{SPANS[0][0]}:{SPANS[0][1]}"])
        agents.append(first.start(ready_timeout=180))
        boot = ["--bootstrap", first.addrs[0]]
        second = Agent(root / "a1", [*base, "--blocks", f"{SPANS[1][0]}:{SPANS[1][1]}", *boot])
        agents.append(second)
        second.start(ready_timeout=180)
        wait_for(lambda: len(first.peer_ids()) == 1, 60, "the pair to meet")
        yield model, agents
    finally:
        stop_all(agents)


# --- what the hostile peers send ----------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    streams: int = 0
    stream_failures: int = 0
    frames: int = 0  # frames (or pieces of one) written to forward streams
    replies: dict[str, int] = dataclasses.field(default_factory=dict)
    ads: int = 0
    publish_failures: int = 0
    failure_kinds: set[str] = dataclasses.field(default_factory=set)
    timeouts: dict[str, int] = dataclasses.field(default_factory=dict)
    open_s: list[float] = dataclasses.field(default_factory=list)

    def reply(self, kind: str) -> None:
        self.replies[kind] = self.replies.get(kind, 0) + 1


@dataclasses.dataclass(frozen=True)
class Target:
    peer_id: str
    model_id: str
    span: tuple[int, int]
    hidden: int


def prefixed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def junk_body(rng: random.Random, t: Target) -> bytes:
    """One malformed frame body: random bytes, wrong maps, a mutated valid frame, or a bomb."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:  # a message map with wrong or missing fields
        # Not "close": a CloseSession with extra keys is valid and ends the stream.
        tag = rng.choice(["open", "step", "opened", "result", "error", "x", ""])
        fields: dict[str, Any] = {"t": tag}
        for key in rng.sample(["step", "position", "hidden", "model_id", "start", "end"], 3):
            fields[key] = rng.choice(
                [None, True, -1, 2**64 - 1, 1e308, "x" * 300, b"\x00" * 9, [1, [2]], {"a": 1}]
            )
        return pack(fields)
    if kind == 2:  # a tensor whose claimed shape does not match its bytes
        dims = [rng.choice([1, 2**31, 2**40]) for _ in range(3)]
        return pack(
            {
                "t": "step",
                "step": 0,
                "position": 0,
                "hidden": {"dtype": "float32", "shape": dims, "data": b"\x00" * 16},
            }
        )
    if kind == 3:  # a valid frame's body with bytes flipped
        body = bytearray(encode_frame(valid_step(rng, t, 0))[4:])
        for _ in range(rng.randrange(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return bytes(body)
    if kind == 4:  # deep nesting
        return b"\x81\xa1t" + b"\x91" * rng.randrange(20, 3000) + b"\xc0"
    # Many tiny objects: ~64 KiB of empty arrays would have been ~4 MiB of lists.
    n = 1 << 16
    return b"\x81\xa1t\xdd" + struct.pack(">I", n) + b"\x90" * n


def valid_step(rng: random.Random, t: Target, position: int, tokens: int = 1) -> Step:
    # Random float32 bytes: NaN, inf and huge values included; the protocol allows them.
    data = rng.randbytes(tokens * t.hidden * 4)
    return Step(
        step=position, position=position, hidden=TensorFrame("float32", (1, tokens, t.hidden), data)
    )


def bad_steps(rng: random.Random, t: Target) -> list[bytes]:
    """Steps that decode but break the session's rules, and ones that do not decode."""
    h = t.hidden

    def zeros(*shape: int) -> bytes:
        n = 4
        for d in shape:
            n *= d
        return b"\x00" * n

    out = [
        encode_frame(Step(1, 0, TensorFrame("float32", (1, 1, h + 1), zeros(h + 1)))),
        encode_frame(Step(2, 0, TensorFrame("float32", (2, 1, h), zeros(2, h)))),
        encode_frame(Step(3, 0, TensorFrame("int32", (1, 1, h), zeros(h)))),
        encode_frame(Step(4, 99, TensorFrame("float32", (1, 1, h), zeros(h)))),
        encode_frame(Step(5, 1, TensorFrame("float32", (1, 64, h), zeros(64, h)))),
        encode_frame(Step(6, 0, TensorFrame("float32", (1, 0, h), b""))),
        encode_frame(Step(7, 0, TensorFrame("float32", (h,), zeros(h)))),
        encode_frame(OpenSession(t.model_id, t.span[0], t.span[1], 16, "float32", 1)),
    ]
    out += [prefixed(junk_body(rng, t)) for _ in range(8)]
    rng.shuffle(out)
    return out


def scenario(rng: random.Random, t: Target) -> tuple[str, list[bytes], str]:
    """A name, the chunks to write on one stream, then how to end it ("close" or "reset")."""
    # Runs of malformed frames on one stream are the bulk; every other kind needs its own.
    kind = rng.choice([0, 1, 2, 3, 4, 4, 4, 6, 6, 7, 8])
    open_ok = encode_frame(OpenSession(t.model_id, t.span[0], t.span[1], 16, "float32", 1))
    ending = rng.choice(["close", "reset"])
    if kind == 0:
        return "random_bytes", [rng.randbytes(rng.randrange(1, 4096))], ending
    if kind == 1:  # the stream ends mid-frame
        frame = encode_frame(valid_step(rng, t, 0)) if ending == "close" else open_ok
        return "truncated", [frame[: rng.randrange(1, len(frame))]], ending
    if kind == 2:  # over the frame limit, or over every limit
        n = rng.choice([2**32 - 1, 2**30, 64 * 1024 * 1024 + 1])
        return "huge_prefix", [struct.pack(">I", n) + rng.randbytes(rng.randrange(0, 64))], ending
    if kind == 3:
        return "valid_then_garbage", [open_ok, rng.randbytes(rng.randrange(1, 512))], "close"
    if kind == 4:  # honest prefixes around bad bodies: the stream goes on after each
        return "malformed_run", [prefixed(junk_body(rng, t)) for _ in range(100)], "close"
    if kind == 6:
        valid = [encode_frame(valid_step(rng, t, p)) for p in range(3)]
        return "session_bad_steps", [open_ok, *valid, *bad_steps(rng, t)], ending
    if kind == 7:
        return (
            "steps_without_session",
            [encode_frame(valid_step(rng, t, 0)), *bad_steps(rng, t)],
            ending,
        )
    return "reset_at_once", [], "reset"


# --- hostile peers ------------------------------------------------------------------------------


async def run_stream(
    host: Any, t: Target, name: str, chunks: list[bytes], end: str, tally: Tally
) -> None:
    from libp2p.peer.id import ID

    stream = None
    t0 = time.monotonic()
    with trio.move_on_after(STREAM_S) as scope:
        try:
            stream = await host.new_stream(ID.from_base58(t.peer_id), [FORWARD_PROTOCOL_ID])
        except Exception as exc:
            tally.stream_failures += 1
            tally.failure_kinds.add(f"{type(exc).__name__}: {str(exc)[:100]}")
            return
        tally.streams += 1
        tally.open_s.append(time.monotonic() - t0)
        # Frames go out in a few large writes (our CPU is the scarce part here), the agent
        # reads them one by one; a frame counts once all of its bytes are written.
        data = b"".join(chunks)
        ends = list(itertools.accumulate(len(c) for c in chunks))
        written = 0
        # The agent may drop the stream at any point; that is its right.
        with contextlib.suppress(Exception):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_replies, stream, tally)
                for i in range(0, len(data), WRITE_SIZE):
                    await stream.write(data[i : i + WRITE_SIZE])
                    done = bisect.bisect_right(ends, i + WRITE_SIZE)
                    tally.frames += done - written
                    written = done
                if end == "reset":
                    await stream.reset()
                    nursery.cancel_scope.cancel()  # a local reset does not wake our read
                else:
                    await stream.close()  # half-close: the agent sees EOF, answers, closes
    if scope.cancelled_caught:
        tally.timeouts[name] = tally.timeouts.get(name, 0) + 1
    if stream is not None:
        with trio.move_on_after(1), trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await stream.reset()


async def read_replies(stream: Any, tally: Tally) -> None:
    """Read the agent's answers until it closes the stream; every frame must decode."""
    dec = FrameDecoder(max_frame=1 << 24)
    while True:
        try:
            data = await stream.read(1 << 16)
        except Exception:
            return
        if not data:
            return
        dec.feed(data)
        while True:
            try:
                msg = dec.next_message()
            except DecodeError:
                tally.reply("undecodable")
                continue
            if msg is None:
                break
            tally.reply(msg.code if isinstance(msg, ErrorReply) else type(msg).__name__)


def hostile_ads(rng: random.Random, me: str, key: Ed25519PrivateKey, n: int) -> list[bytes]:
    good = encode_signed_ad(bare_ad(me, seq=1), key)
    out: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(1, 2000)))
        elif kind == 1:  # a valid signed ad with bytes flipped
            data = bytearray(good)
            # Distinct positions, each XORed with a non-zero byte: a "flip" to the same
            # value would leave a valid ad (1 in 256), which the agents rightly accept.
            for j in rng.sample(range(len(data)), rng.randrange(1, 4)):
                data[j] ^= rng.randrange(1, 256)
            out.append(bytes(data))
        elif kind == 2:  # envelope keys with wrong types
            out.append(pack({"ad": rng.choice([1, "x", None, [1]]), "key": b"k" * 32, "sig": b""}))
        elif kind == 3:  # a bomb: many tiny objects, or deep nesting
            out.append(b"\x81\xa2ad\xdd" + struct.pack(">I", 15000) + b"\x90" * 15000)
        elif kind == 4:  # over the ad size limit
            out.append(b"\x81\xa2ad\xc6" + struct.pack(">I", 20000) + b"\x00" * 20000)
        else:  # correctly signed by us, but expired or from the future
            ts = time.time() + rng.choice([-3600.0, 3600.0])
            out.append(encode_signed_ad(bare_ad(me, seq=2 + i, timestamp=ts), key))
    return out


async def hostile_peer(
    index: int, targets: list[Target], addrs: list[list[str]], root: Path, tally: Tally
) -> None:
    from agent.config import AgentConfig
    from agent.net.mesh import open_mesh

    rng = random.Random(1000 + index)
    key_pair, key = libp2p_identity()
    cfg = AgentConfig(state_dir=root, listen=("/ip4/127.0.0.1/tcp/0",), mdns=False)
    async with open_mesh(cfg.mesh, key_pair) as mesh:
        for a in addrs:
            await mesh.dial(a)
        with trio.move_on_after(10):
            while len(mesh.pubsub.peer_topics.get(CAPACITY_TOPIC, ())) < len(addrs):
                await trio.sleep(0.1)
        limiter = trio.CapacityLimiter(CONCURRENT_STREAMS)
        jobs = [(t, *scenario(rng, t)) for t in targets for _ in range(STREAMS_PER_TARGET)]
        rng.shuffle(jobs)

        async def one(t: Target, name: str, chunks: list[bytes], end: str) -> None:
            async with limiter:
                await run_stream(mesh.host, t, name, chunks, end, tally)

        async def publish_all() -> None:
            for data in hostile_ads(rng, mesh.peer_id, key, ADS_PER_PEER):
                try:
                    await mesh.publish(data)
                    tally.ads += 1
                except Exception:
                    tally.publish_failures += 1
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_all)
            for job in jobs:
                nursery.start_soon(one, *job)


def _merge(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _sum(d: dict[str, int]) -> int:
    return sum(d.values())


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def _status(agent: Agent) -> dict[str, Any]:
    return await trio.to_thread.run_sync(agent.status)


async def test_hostile_peers_cannot_break_serving(pair, tmp_path: Path) -> None:
    model, agents = pair
    before = [await _status(a) for a in agents]
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    targets = [
        Target(a.peer_id or "", s["model"], tuple(s["span"]), hidden)
        for a, s in zip(agents, before, strict=True)
    ]
    tallies = [Tally() for _ in range(N_HOSTILE)]
    t0 = time.monotonic()
    with trio.move_on_after(ATTACK_S) as attack:
        async with trio.open_nursery() as nursery:
            for i, tally in enumerate(tallies):
                nursery.start_soon(
                    hostile_peer, i, targets, [a.addrs for a in agents], tmp_path, tally
                )
    attack_s = time.monotonic() - t0

    frames = sum(t.frames for t in tallies)
    ads = sum(t.ads for t in tallies)
    streams = sum(t.streams for t in tallies)
    replies = _merge(t.replies for t in tallies)
    cut = _merge(t.timeouts for t in tallies)
    opens = sorted(x for t in tallies for x in t.open_s) or [0.0]
    report = (
        f"attack {attack_s:.1f} s{' (cut at the time bound)' if attack.cancelled_caught else ''}: "
        f"{streams} streams (median open {opens[len(opens) // 2]:.2f} s; "
        f"{sum(t.stream_failures for t in tallies)} failed to open; cut at {STREAM_S:g} s: "
        f"{cut}), {frames} frames, {ads} ads; replies {replies}; open failures "
        f"{sorted(set().union(*(t.failure_kinds for t in tallies)))[:3]}"
    )
    print(report)
    assert frames + ads >= 2000, report
    # Under load py-libp2p fails to negotiate some streams; at least half must have opened.
    assert streams >= N_HOSTILE * STREAMS_PER_TARGET, report
    # Every reply the agents wrote was a well-formed frame.
    assert replies.get("undecodable", 0) == 0, report
    assert replies.get("malformed", 0) > 100 and replies.get("wrong_shape", 0) > 0, report

    # Both agents are alive, counted what they refused and hold no hostile session.
    for agent in agents:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    after: list[dict[str, Any]] = []
    for agent in agents:
        wait_for(lambda a=agent: a.status()["sessions"] == 0, 15, "hostile sessions to close")
        after.append(await _status(agent))
    errors = [
        _delta(a["forward_errors"], b["forward_errors"]) for a, b in zip(after, before, strict=True)
    ]
    rejected = [
        _delta(a["rejected_ads"], b["rejected_ads"]) for a, b in zip(after, before, strict=True)
    ]
    print("forward_errors", errors, "rejected_ads", rejected)
    assert sum(_sum(e) for e in errors) >= 1000, errors
    for e in errors:
        assert e.get("malformed", 0) >= 100, errors
        assert {"wrong_shape", "position", "no_session"} <= set(e), errors
    # Gossip drops some under load (py-libp2p's queues are small), but a good share of the
    # hostile ads reaches each agent and is refused; none is accepted (tables below).
    for r in rejected:
        assert _sum(r) >= ads // 5, (rejected, ads)
        assert {"malformed", "oversized", "bad_signature"} <= set(r), rejected
    # No hostile peer made it into a table; the agents still see each other.
    assert await trio.to_thread.run_sync(agents[0].peer_ids) == {agents[1].peer_id}
    assert await trio.to_thread.run_sync(agents[1].peer_ids) == {agents[0].peer_id}

    # And they still serve: a generation through the mesh equals Hugging Face's greedy one.
    want = await trio.to_thread.run_sync(_hf_tokens, model)
    out = await trio.to_thread.run_sync(_generate, agents[0], model)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == want
    assert [tuple(r["span"]) for r in result["route"]] == SPANS
    for agent in agents:
        text = agent.log_path.read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]


def _hf_tokens(model: Path) -> list[int]:
    from hfref import hf_generate, load_full

    return hf_generate(load_full(model), PROMPT, 16)


def _generate(agent: Agent, model: Path) -> Any:
    args = ["--control", str(agent.control), "--model", model.name, "--model-dir", str(model)]
    args += ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "16", "--json"]
    return cli("generate", *args, timeout=120)
