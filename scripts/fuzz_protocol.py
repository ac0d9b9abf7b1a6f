#!/usr/bin/env python3
"""Coverage-guided fuzzing of the protocol decoders with atheris (libFuzzer for Python).

Every decoder in protocol/ must turn any bytes into a valid message or a ProtocolError, and
so must the forward connection's state machine (both roles). Any other exception (or a broken
invariant: a decoded message that does not re-encode to itself, a frame decoder that buffers
more than a frame, a connection whose events depend on how its bytes were split) is a finding:
the input is saved to --out/findings/ with its traceback, and the fuzzer goes on. libFuzzer's
own findings (an input that runs past -timeout, or memory past -rss_limit_mb) are saved there
too, by libFuzzer.

The ad_* field targets build a validly signed ad from the input, one group of fields
hostile at a time (addresses, block counts and spans, TTL and timestamp, counts), so that the
decoder's value rules are reached past the signature; whatever decodes must satisfy every
bound the protocol promises (`check_ad_bounds`), and `own_ad_timing` checks that the agent's
own interval and TTL, from any config that validation accepts and any table size, give an
ad that peers accept.

Each target runs in its own process (atheris.Fuzz never returns) for its share of --seconds,
starting from a seed corpus of valid encodings kept in --out/corpus/<target>/ (it grows with
what the fuzzer finds, so later runs start further). At the end one line a target: executions,
exec/s, coverage (libFuzzer's cov = instrumented edges, ft = features), corpus, findings.

    .venv/bin/python scripts/fuzz_protocol.py --seconds 60
    .venv/bin/python scripts/fuzz_protocol.py --target decode_message --seconds 300

Exit status: 0 no findings, 1 findings (or a target that did not run), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench-results/fuzz")
MAX_SAVED_FINDINGS = 50  # unique ones per target; past that only counted
FRAME_MAX = 4096


@dataclasses.dataclass(frozen=True)
class Target:
    run: Callable[[bytes], None]
    seeds: list[bytes]
    max_len: int = 4096


def build_targets() -> dict[str, Target]:
    """The decoders, each wrapped as bytes -> None with invariants asserted.

    Imports protocol here so the child can import it under atheris' instrumentation first.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocol import ads, codec, forward, tensors
    from protocol import errors as perrors
    from protocol import frames as framing  # `frames` names the encoded frames below

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    peer = ads.peer_id_from_ed25519(ads.public_key_raw(key))
    now = 1_700_000_000.0
    ad = ads.CapacityAd(
        version="1.0.0",
        peer_id=peer,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",),
        devices=(ads.DeviceSummary("gpu", "NVIDIA H100", 1 << 36, 1 << 35, 12.5),),
        model="tiny@ab12",
        model_name="tiny",
        n_blocks=8,
        span=(2, 6),
        throughput=100.0,
        kv_free_tokens=4096,
        sessions=1,
        state="online",
        seq=3,
        timestamp=now,
        ttl=60.0,
        reason="why",
    )
    tensor = tensors.TensorFrame("float32", (1, 2, 3), bytes(range(24)))
    empty = tensors.TensorFrame("bfloat16", (1, 0, 4096), b"")
    msgs: list[forward.Message] = [
        forward.OpenSession("tiny@ab12", 0, 4, 128, "bfloat16", 1),
        forward.Step(step=1, position=5, hidden=tensor),
        forward.CloseSession(),
        forward.SessionOpened("s-1", 128, 4096),
        forward.StepResult(step=1, hidden=tensor, elapsed_ms=0.5),
        forward.ErrorReply("kv_budget", "no room", 3),
        forward.ErrorReply("internal", "x", None),
    ]
    frames = [forward.encode_frame(m) for m in msgs]
    bodies = [f[forward.FRAME_PREFIX_LEN :] for f in frames]
    envelope = ads.encode_signed_ad(ad, key)
    ad_body = codec.pack(ads._ad_to_map(ad))

    def sign_raw(ad_bytes: bytes) -> bytes:
        sig = key.sign(ads.AD_SIGNING_PREFIX + ad_bytes)
        return codec.pack({"ad": ad_bytes, "key": ads.public_key_raw(key), "sig": sig})

    def unpack_map(data: bytes) -> None:
        out = codec.unpack_map(data, max_size=FRAME_MAX)
        again = codec.pack(out)
        assert codec.pack(codec.unpack_map(again, max_size=1 << 20)) == again, "unstable"

    def tensor_from_wire(data: bytes) -> None:
        obj = codec.unpack_map(data, max_size=FRAME_MAX)
        t = tensors.tensor_from_wire(obj, max_bytes=FRAME_MAX, max_dims=4)
        assert len(t.data) == t.numel * tensors.WIRE_DTYPES[t.dtype]
        assert tensors.tensor_from_wire(tensors.tensor_to_wire(t), max_bytes=FRAME_MAX) == t

    def read_frame_length(data: bytes) -> None:
        n = forward.read_frame_length(data, FRAME_MAX)
        assert len(data) == 4 and n == int.from_bytes(data, "big") <= FRAME_MAX

    def decode_message(data: bytes) -> None:
        msg = forward.decode_message(data, max_frame=FRAME_MAX)
        again = forward.encode_frame(msg)[forward.FRAME_PREFIX_LEN :]
        assert forward.decode_message(again, max_frame=1 << 20) == msg, "round trip"

    def frame_decoder(data: bytes) -> None:
        # First byte: chunk size; the rest: the stream, fed in those chunks and drained.
        if not data:
            return
        step = data[0] + 1
        dec = framing.FrameDecoder(max_frame=FRAME_MAX)
        try:
            for i in range(1, len(data), step):
                dec.feed(data[i : i + step])
                while True:
                    try:
                        msg = dec.next_message()
                    except perrors.DecodeError:
                        continue
                    if msg is None:
                        break
                assert dec.buffered <= forward.FRAME_PREFIX_LEN + FRAME_MAX, "over-buffered"
        except perrors.FrameTooLarge:
            assert dec.buffered == 0, "buffer kept after FrameTooLarge"
            try:
                dec.feed(b"\x00")
            except perrors.FrameTooLarge:
                return
            raise AssertionError("decoder usable after FrameTooLarge") from None

    def decode_signed_ad(data: bytes) -> None:
        got = ads.decode_signed_ad(data)
        assert got.peer_id == peer  # only our key can sign; anything else is a forgery
        check_ad_bounds(got, peer)

    def ad_body_signed(data: bytes) -> None:
        # Validly signed hostile ad bodies: the only way past the signature to the ad parser.
        got = ads.decode_signed_ad(sign_raw(data))
        check_ad_bounds(got, peer)
        assert ads.decode_signed_ad(ads.encode_signed_ad(got, key)) == got, "round trip"

    validator = ads.AdValidator(max_peers=64)

    def ad_validator(data: bytes) -> None:
        sender = peer if len(data) % 2 else None
        try:
            validator.check(data, sender=sender, now=now + (len(data) % 7))
        except perrors.AdRejected as e:
            assert e.reason in ads.AD_REJECT_REASONS, e.reason

    targets = {
        "unpack_map": Target(unpack_map, [*bodies, ad_body, envelope]),
        "tensor_from_wire": Target(
            tensor_from_wire,
            [codec.pack(tensors.tensor_to_wire(t)) for t in (tensor, empty)],
        ),
        "read_frame_length": Target(read_frame_length, [f[:4] for f in frames], max_len=16),
        "decode_message": Target(decode_message, bodies),
        "frame_decoder": Target(
            frame_decoder, [bytes([7]) + b"".join(frames), bytes([0]) + frames[1]], max_len=8192
        ),
        "decode_signed_ad": Target(decode_signed_ad, [envelope]),
        "ad_body": Target(ad_body_signed, [ad_body]),
        "ad_validator": Target(ad_validator, [envelope, sign_raw(ad_body)]),
    }
    targets.update(_ad_field_targets())
    targets.update(_connection_targets())
    targets.update(_swarm_targets())
    return targets


def check_ad_bounds(ad: Any, peer: str) -> None:
    """Every bound a decoded ad promises its users (the peer table, peer exchange, routing,
    `peers`), asserted: an AssertionError here is a value the decoder let through."""
    import math

    import multiaddr

    from protocol import ads
    from protocol.ids import PROTOCOL_MAJOR, parse_version

    def count(value: Any, lo: int, hi: int) -> bool:
        return type(value) is int and lo <= value <= hi

    def real(value: Any, lo: float, hi: float) -> bool:
        return type(value) is float and math.isfinite(value) and lo <= value <= hi

    assert parse_version(ad.version)[0] == PROTOCOL_MAJOR, f"version {ad.version!r}"
    assert ad.peer_id == peer, "peer id"
    # Addresses: at most MAX_ADDRS, each a multiaddr whose last component is /p2p/<the ad's
    # own id>, and whose part before it is what Mesh.dial hands to py-libp2p (it must parse).
    assert isinstance(ad.addrs, tuple) and len(ad.addrs) <= ads.MAX_ADDRS, "too many addrs"
    for addr in ad.addrs:
        assert type(addr) is str and 1 <= len(addr) <= ads.MAX_ADDR_LEN, f"addr {addr!r:.80}"
        items = list(multiaddr.Multiaddr(addr).items())
        last = (items[-1][0].name, items[-1][1]) if items else None
        assert last == ("p2p", peer), f"addr {addr!r:.100} does not end in /p2p/<own id>"
        head = addr.rpartition("/p2p/")[0]
        multiaddr.Multiaddr(head)  # raises (a finding) if the dialable part does not parse
    # Blocks: n_blocks in [1, MAX_BLOCKS]; a span inside it, non-empty, with a model.
    assert ad.n_blocks is None or count(ad.n_blocks, 1, ads.MAX_BLOCKS), f"n_blocks {ad.n_blocks}"
    if ad.span is not None:
        assert ad.n_blocks is not None and ad.model is not None, "span without n_blocks/model"
        start, end = ad.span
        assert count(start, 0, ad.n_blocks - 1) and count(end, start + 1, ad.n_blocks), ad.span
    assert ad.model is None or (type(ad.model) is str and 1 <= len(ad.model) <= ads.MAX_NAME_LEN)
    assert ad.model_name is None or len(ad.model_name) <= ads.MAX_NAME_LEN
    # Time: a finite timestamp, a TTL in (0, MAX_TTL], so the expiry is finite too.
    assert real(ad.timestamp, 0.0, ads.MAX_TIMESTAMP), f"timestamp {ad.timestamp!r}"
    assert real(ad.ttl, 0.0, ads.MAX_TTL) and ad.ttl > 0, f"ttl {ad.ttl!r}"
    assert math.isfinite(ad.expires_at), "expiry"
    # Counts: ints (not bools) in [0, MAX_COUNT]; throughput finite and bounded.
    for name in ("kv_free_tokens", "sessions", "seq"):
        assert count(getattr(ad, name), 0, ads.MAX_COUNT), f"{name} {getattr(ad, name)!r}"
    assert real(ad.throughput, 0.0, ads.MAX_THROUGHPUT), f"throughput {ad.throughput!r}"
    assert ad.state in ads.AD_STATES, f"state {ad.state!r}"
    assert type(ad.reason) is str and len(ad.reason) <= ads.MAX_REASON_LEN, "reason"
    assert isinstance(ad.devices, tuple) and len(ad.devices) <= ads.MAX_DEVICES, "devices"
    for d in ad.devices:
        assert d.kind in ads.DEVICE_KINDS and len(d.name) <= ads.MAX_NAME_LEN, d
        assert count(d.memory_total, 0, ads.MAX_COUNT), d
        assert count(d.memory_free, 0, d.memory_total), d
        assert d.utilization is None or real(d.utilization, 0.0, 100.0), d


class _Draw:
    """Values drawn from fuzz input bytes, deterministically (no atheris needed, so the
    targets also run on their seeds in the tests); past the end every draw reads zeros, and
    choice 0 is always the honest value, so a short input is a valid ad."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out + bytes(n - len(out))

    def byte(self) -> int:
        return self.raw(1)[0]

    def below(self, n: int) -> int:
        """An int in [0, n) from one byte, or two when n > 256."""
        return int.from_bytes(self.raw(1 if n <= 256 else 2), "big") % n

    def pick(self, options: list[Any]) -> Any:
        return options[self.below(len(options))]

    def text(self, max_len: int) -> str:
        return self.raw(self.below(max_len + 1)).decode("utf-8", "replace")

    def u64(self) -> int:
        return int.from_bytes(self.raw(8), "big")

    def double(self) -> float:
        import struct

        return float(struct.unpack(">d", self.raw(8))[0])


_RAW_INT, _RAW_FLOAT = object(), object()  # "draw the value from the next 8 bytes"


def _value(d: _Draw, honest: Any, edges: list[Any]) -> Any:
    """`honest` (choice 0), an edge value, or a raw int or double from the input."""
    got = d.pick([honest, *edges, _RAW_INT, _RAW_FLOAT])
    if got is _RAW_INT:
        return d.u64() - (1 << 63) if d.byte() & 1 else d.u64()
    if got is _RAW_FLOAT:
        return d.double()
    return got


def _ad_field_targets() -> dict[str, Target]:
    """Validly signed ads whose fields, one group per target, are drawn from the input: the
    value rules of protocol.ads (addresses, blocks and spans, TTL and timestamp, counts)."""
    import math

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocol import ads, codec
    from protocol.errors import AdRejected

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    peer = ads.peer_id_from_ed25519(ads.public_key_raw(key))
    other = ads.peer_id_from_ed25519(
        ads.public_key_raw(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
    )
    now = 1_700_000_000.0
    base: dict[str, Any] = {
        "version": "1.0.0",
        "peer_id": peer,
        "addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}"],
        "devices": [],
        "model": "tiny@ab12",
        "model_name": "tiny",
        "n_blocks": 8,
        "span": [2, 6],
        "throughput": 100.0,
        "kv_free_tokens": 4096,
        "sessions": 1,
        "state": "online",
        "seq": 3,
        "timestamp": now,
        "ttl": 60.0,
        "reason": "",
    }
    validator_now = now + 1.0

    def decode(fields: dict[str, Any]) -> Any:
        """Sign the ad map, decode it like a receiver; check what decoded."""
        ad_bytes = codec.pack({**base, **fields})
        sig = key.sign(ads.AD_SIGNING_PREFIX + ad_bytes)
        env = codec.pack({"ad": ad_bytes, "key": ads.public_key_raw(key), "sig": sig})
        got = ads.decode_signed_ad(env)
        check_ad_bounds(got, peer)
        return got

    # --- addresses ------------------------------------------------------------------------
    pieces = [
        "/ip4/127.0.0.1", "/ip4/10.0.0.1", "/ip6/::1", "/ip6zone/x", "/dns4/a.example",
        "/dns/x", "/dnsaddr/x", "/tcp/4001", "/tcp/0", "/tcp/65536", "/udp/1", "/quic-v1",
        "/ws", "/wss", "/tls", "/unix", "/unix/", "/unix/a", "/memory/3", "/p2p-circuit",
        "/p2p/", "/p2p", "/ipfs/", f"/p2p/{peer}", f"/p2p/{other}", peer, other, "/", "//",
        "", "\x00", "\u00e9", "x" * 40, "/garbage",
    ]  # fmt: skip

    def draw_addr(d: _Draw) -> Any:
        kind = d.below(8)
        if kind == 0:  # honest
            a, b = d.byte(), d.byte()
            return f"/ip4/10.{a}.{b}.1/tcp/{d.below(65536)}/p2p/{peer}"
        if kind == 1:  # another peer's id
            return f"/ip4/127.0.0.1/tcp/4001/p2p/{other}"
        if kind == 2:  # free text that ends in our id
            return d.text(64) + f"/p2p/{peer}"
        if kind == 3:  # protocol fragments, ending in our id or not
            parts = [d.pick(pieces) for _ in range(d.below(6))]
            return "".join(parts) + (f"/p2p/{peer}" if d.byte() & 1 else "")
        if kind == 4:  # around the length limit
            n = ads.MAX_ADDR_LEN - len(f"/dns4//tcp/1/p2p/{peer}") - 2 + d.below(5)
            return f"/dns4/{'a' * max(0, n)}/tcp/1/p2p/{peer}"
        if kind == 5:  # not a string
            return d.pick([None, 1, -1, b"/ip4/1.2.3.4", [], {}, True, 1.5])
        if kind == 6:  # free text
            return d.text(128)
        return f"{d.pick(pieces)}/p2p/{peer}"

    def ad_addrs(data: bytes) -> None:
        d = _Draw(data)
        n = d.pick([1, 0, 2, ads.MAX_ADDRS, ads.MAX_ADDRS + 1, d.below(40)])
        addrs: Any = [draw_addr(d) for _ in range(n)]
        if d.byte() == 255:
            addrs = d.pick([None, "x", {}, f"/ip4/1.2.3.4/tcp/1/p2p/{peer}"])
        decode({"addrs": addrs})

    # --- blocks and spans -------------------------------------------------------------------
    mb = ads.MAX_BLOCKS
    block_edges = [None, 0, 1, 2, mb - 1, mb, mb + 1, 1 << 20, 2**63 - 1, -1, True, 8.0, "8"]

    def ad_blocks(data: bytes) -> None:
        d = _Draw(data)
        n_blocks = _value(d, 8, block_edges)
        n = n_blocks if type(n_blocks) is int else 8
        span_edges = [0, 1, n - 1, n, n + 1, -1, mb - 1, mb, mb + 1, 2**64 - 1, None, True, 0.0]
        shape = d.below(6)
        span: Any
        if shape == 0:
            span = [_value(d, 2, span_edges), _value(d, 6, span_edges)]
        elif shape == 1:
            span = None
        elif shape == 2:
            span = [_value(d, 0, span_edges)]
        elif shape == 3:
            span = [_value(d, 0, span_edges) for _ in range(3)]
        elif shape == 4:
            span = d.pick(["0:4", 4, {}, (0, 4)])
        else:
            span = [_value(d, 0, span_edges), _value(d, n, span_edges)]
        names = ["tiny@ab12", None, "", "m" * ads.MAX_NAME_LEN, "m" * (ads.MAX_NAME_LEN + 1)]
        model = d.pick(names)
        decode({"n_blocks": n_blocks, "span": span, "model": model})

    # --- TTL and timestamp ----------------------------------------------------------------------
    mt = ads.MAX_TTL
    float_edges = [
        0.0, -0.0, 5e-324, 1e-300, 1.0, 1, mt, math.nextafter(mt, math.inf), mt + 1, 1e9,
        1e308, math.inf, -math.inf, math.nan, -1.0, True, None, "60", 2**63, -(2**63),
    ]  # fmt: skip
    ts_edges = [
        0.0, now - 3600, now + 29.0, now + 31.0, ads.MAX_TIMESTAMP,
        math.nextafter(ads.MAX_TIMESTAMP, math.inf), math.inf, math.nan, -1.0, 0, None,
    ]  # fmt: skip
    validator = ads.AdValidator(max_peers=8)

    def ad_timing(data: bytes) -> None:
        d = _Draw(data)
        ttl = _value(d, 60.0, float_edges)
        ts = _value(d, now, ts_edges)
        got = decode({"ttl": ttl, "timestamp": ts, "seq": d.u64() >> 1})
        # The validator's freshness rules on what decoded: accepted means fresh and not from
        # the future (beyond the skew), so the entry's expiry is ahead of us and finite.
        envelope = ads.encode_signed_ad(got, key)
        try:
            ok = validator.check(envelope, sender=peer, now=validator_now)
        except AdRejected as e:
            assert e.reason in ("expired", "future", "replayed"), e.reason
            return
        assert ok.timestamp <= validator_now + validator.max_clock_skew, "from the future"
        assert validator_now <= ok.expires_at < math.inf, "expired or endless"

    # --- counts -------------------------------------------------------------------------------
    mc = ads.MAX_COUNT
    count_edges = [0, 1, mc, mc + 1, 2**64 - 1, -1, -(2**63), True, False, 1.0, None, "1"]
    util_edges = [None, 0.0, 100.0, math.nextafter(100.0, math.inf), -0.0, -1e-9, math.nan, 50]

    def ad_counts(data: bytes) -> None:
        d = _Draw(data)
        devices = []
        for _ in range(d.pick([0, 1, ads.MAX_DEVICES, ads.MAX_DEVICES + 1, d.below(4)])):
            total = _value(d, 1 << 34, count_edges)
            devices.append(
                {
                    "kind": d.pick(["gpu", "cpu", "tpu", "", None]),
                    "name": d.pick(["x", "", "n" * ads.MAX_NAME_LEN, "n" * (ads.MAX_NAME_LEN + 1)]),
                    "memory_total": total,
                    "memory_free": _value(d, 1 << 33, [total, *count_edges]),
                    "utilization": _value(d, 12.5, util_edges),
                }
            )
        tp_edges = [0.0, ads.MAX_THROUGHPUT, ads.MAX_THROUGHPUT * 2, math.inf, math.nan, -1.0]
        decode(
            {
                "devices": devices,
                "kv_free_tokens": _value(d, 4096, count_edges),
                "sessions": _value(d, 1, count_edges),
                "seq": _value(d, 3, count_edges),
                "throughput": _value(d, 100.0, [*tp_edges, 1, True, None]),
                "state": d.pick(["online", "joining", "draining", "leaving", "gone", "", None]),
            }
        )

    return {
        "ad_addrs": Target(ad_addrs, [b"", bytes([0, 1, 2, 3, 4, 5, 6, 7] * 4), bytes(range(64))]),
        # Honest; no span; 4096 blocks served whole (the protocol's maximum, at the bound).
        "ad_blocks": Target(ad_blocks, [b"", bytes([0, 1, 0]), bytes([6, 0, 1, 8, 0])]),
        "ad_timing": Target(ad_timing, [b"", bytes([7, 5, 0]), bytes([0, 2])]),
        "ad_counts": Target(ad_counts, [b"", bytes([2, 1]), bytes([1] * 12)]),
        **_own_timing_target(validator_now, decode),
    }


def _own_timing_target(now: float, decode: Callable[[dict[str, Any]], Any]) -> dict[str, Target]:
    """The agent's own ad timing (agent.policy.peertable's announce_interval, announce_ttl):
    from any announce_interval and ad_ttl that config validation accepts and any table
    size, the interval is finite and within the protocol's bound and the TTL gives an ad
    that peers accept. Only where this checkout has the agent package."""
    try:
        from agent.config import AgentConfig, ConfigError, validate
        from agent.policy.peertable import (
            MAX_ANNOUNCE_INTERVAL,
            TTL_PER_INTERVAL,
            announce_interval,
            announce_ttl,
        )
    except ImportError:
        return {}
    import math

    from protocol import ads
    from protocol.errors import ProtocolError

    edges = [
        0.5, 1.0, 20.0, 900.0, 3600.0, 3601.0, 1e9, 1e308, math.inf, 5e-324, 0.0, -1.0,
        math.nan, -math.inf,
    ]  # fmt: skip

    def own_ad_timing(data: bytes) -> None:
        d = _Draw(data)
        base_interval = float(_value(d, 5.0, edges))
        base_ttl = float(_value(d, 20.0, edges))
        n_peers = d.pick([0, 1, 24, 1024, 10**6, 2**40, d.u64()])
        try:
            validate(AgentConfig(announce_interval=base_interval, ad_ttl=base_ttl))
        except ConfigError:
            return  # the agent refuses to start with it
        interval = announce_interval(base_interval, n_peers)
        ttl = announce_ttl(base_ttl, interval)
        what = f"announce_interval={base_interval!r} ad_ttl={base_ttl!r} peers={n_peers}"
        assert math.isfinite(interval) and 0 < interval <= MAX_ANNOUNCE_INTERVAL, (what, interval)
        assert 0 < ttl <= ads.MAX_TTL and ttl >= TTL_PER_INTERVAL * interval, (what, ttl)
        try:
            decode({"ttl": ttl, "timestamp": now})
        except ProtocolError as e:
            raise AssertionError(f"{what}: peers would refuse our ad ({e})") from None

    return {"own_ad_timing": Target(own_ad_timing, [b"", bytes([3, 2, 4])], max_len=64)}


def _connection_targets() -> dict[str, Target]:
    """The forward connection's state machine (protocol.connection), both roles, where this
    checkout has it: arbitrary bytes from the peer, answered the way a good peer would."""
    try:
        from protocol import connection
    except ImportError:
        return {}
    from protocol import forward
    from protocol import frames as framing
    from protocol.errors import ProtocolError
    from protocol.tensors import TensorFrame

    role_of = {0: connection.Role.CLIENT, 1: connection.Role.SERVER}
    # Small limits, so that skipped and fatal frames are within the fuzzer's reach.
    max_frame, max_discard = 512, 2048
    tensor = TensorFrame("float32", (1, 1, 2), bytes(8))
    state = connection.ConnectionState

    def drive(role: connection.Role, chunks: list[bytes]) -> list[object]:
        conn = connection.ForwardConnection(role, max_frame=max_frame, max_discard=max_discard)
        log: list[object] = []
        next_step = 1

        def answer(event: object) -> None:  # a good peer: its sends must all be allowed
            nonlocal next_step
            if role is connection.Role.SERVER:
                if isinstance(event, ProtocolError):
                    step = getattr(event, "step", None)
                    conn.send(forward.ErrorReply(event.code, str(event)[:64], step))
                elif isinstance(event, forward.OpenSession):
                    conn.send(forward.SessionOpened("s", event.max_length, 0))
                elif isinstance(event, forward.Step):
                    conn.send(forward.StepResult(event.step, event.hidden, 0.0))
            elif conn.state is state.OPEN:
                conn.send(forward.Step(next_step, 0, tensor), expect_shape=tensor.shape)
                next_step += 1

        if role is connection.Role.CLIENT:
            conn.send(forward.OpenSession("m", 0, 1, 8, "float32", 1))
        for chunk in chunks:
            conn.receive_data(chunk)
            while True:
                try:
                    event = conn.next_event()
                except framing.FramingLost:
                    assert conn.state is state.FAILED and conn.buffered == 0, "not failed"
                    try:
                        conn.next_event()
                    except framing.FramingLost:
                        log.append("lost")
                        return log
                    raise AssertionError("connection usable after FramingLost") from None
                except ProtocolError as exc:
                    assert not isinstance(exc, connection.LocalProtocolError), f"refused: {exc}"
                    log.append((type(exc).__name__, str(exc), conn.state))
                    answer(exc)
                    continue
                if event is None:
                    break
                log.append((event, conn.state))
                answer(event)
            if conn.state is not state.CLOSED:
                assert conn.buffered <= forward.FRAME_PREFIX_LEN + max_frame, "over-buffered"
        return log

    def forward_connection(data: bytes) -> None:
        # First byte: the role (bit 0) and the chunk size (the rest); then the peer's bytes,
        # fed in those chunks. Fed all at once instead, they must give the same events.
        if not data:
            return
        role = role_of[data[0] & 1]
        step = (data[0] >> 1) + 1
        body = data[1:]
        chunked = drive(role, [body[i : i + step] for i in range(0, len(body), step)])
        assert chunked == drive(role, [body]), "events depend on how the bytes were split"

    def seed(role: int, chunk: int, *parts: forward.Message | bytes) -> bytes:
        out = bytes([(chunk - 1) << 1 | role])
        for p in parts:
            out += p if isinstance(p, bytes) else forward.encode_frame(p)
        return out

    junk = b"\x00\x00\x00\x03\x81\xa1t"
    return {
        "forward_connection": Target(
            forward_connection,
            [
                seed(
                    1,
                    7,
                    forward.OpenSession("m", 0, 1, 8, "float32", 1),
                    forward.Step(1, 0, tensor),
                    junk,
                    forward.OpenSession("m", 0, 1, 8, "float32", 1),
                    forward.Step(2, 1, tensor),
                    forward.CloseSession(),
                ),
                seed(
                    0,
                    13,
                    forward.SessionOpened("s", 8, 0),
                    forward.StepResult(1, tensor, 0.5),
                    forward.ErrorReply("position", "m", 2),
                    forward.StepResult(3, TensorFrame("float32", (2, 1), bytes(8)), 1.0),
                    forward.ErrorReply("malformed", "m", None),
                ),
                seed(1, 128, (max_frame + 1).to_bytes(4, "big") + bytes(max_frame + 1))
                + forward.encode_frame(forward.Step(1, 0, tensor))
                + (max_discard + 1).to_bytes(4, "big"),
            ],
            max_len=4096,
        ),
    }


def _swarm_targets() -> dict[str, Target]:
    """The private-swarm handshake codec, where this checkout has it."""
    try:
        from protocol import swarm
    except ImportError:
        return {}

    def decode_auth(data: bytes) -> None:
        msg = swarm.decode_auth(data)
        again = swarm.encode_auth(msg)[swarm.FRAME_PREFIX_LEN :]
        assert swarm.decode_auth(again) == msg, "round trip"

    key = b"k" * 32
    nonce_i, nonce_r = b"\x01" * swarm.NONCE_LEN, b"\x02" * swarm.NONCE_LEN

    def fixed_nonce(n: int) -> bytes:  # so a seed can carry the right proof
        return b"\x02" * n

    def auth_stream(data: bytes) -> None:
        # First byte: chunk size; decoded messages drive a responder's handshake.
        if not data:
            return
        step = data[0] + 1
        dec = swarm.AuthDecoder()
        hs = swarm.Handshake(
            key=key, initiator=False, local_id=b"r", remote_id=b"i", random_bytes=fixed_nonce
        )
        hs.start()
        for i in range(1, len(data), step):
            dec.feed(data[i : i + step])
            while (msg := dec.next_message()) is not None:
                hs.receive(msg)

    mac = swarm.compute_proof(key, b"initiator", b"i", b"r", nonce_i, nonce_r)
    msgs: list[swarm.AuthMessage] = [
        swarm.Hello(nonce_i),
        swarm.Proof(mac),
        swarm.Challenge(nonce_r),
        swarm.Refused("bad_proof"),
    ]
    frames = [swarm.encode_auth(m) for m in msgs]
    return {
        "swarm_decode_auth": Target(decode_auth, [f[swarm.FRAME_PREFIX_LEN :] for f in frames]),
        "swarm_auth_stream": Target(auth_stream, [bytes([5]) + b"".join(frames[:2])], max_len=2048),
    }


def libfuzzer_dict(seeds: list[bytes]) -> str:
    """A libFuzzer dictionary of every msgpack string in the seeds (field names, tags, dtypes):
    tokens a byte-level mutator would take long to guess."""
    import msgpack

    tokens: set[bytes] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, str):
            tokens.add(msgpack.packb(obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k)
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
        elif isinstance(obj, bytes):  # the signed ad inside an envelope
            with contextlib.suppress(Exception):
                walk(msgpack.unpackb(obj, raw=False))

    for seed in seeds:
        # Every map in the seed (frames follow prefixes and chunk-size bytes; several a seed).
        for start, byte in enumerate(seed):
            if 0x80 <= byte <= 0x8F or byte in (0xDE, 0xDF):
                unpacker = msgpack.Unpacker(raw=False)
                unpacker.feed(seed[start:])
                with contextlib.suppress(Exception):
                    walk(next(unpacker))
    return "".join(
        '"' + "".join(f"\\x{b:02x}" for b in t) + '"\n' for t in sorted(tokens) if len(t) <= 64
    )


# --- child: one target under libFuzzer ----------------------------------------------------------


def run_child(name: str, seconds: int, out: Path, libfuzzer_args: list[str]) -> None:
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]  # untyped

    with atheris.instrument_imports(include=["protocol"]):
        import protocol.ads
        import protocol.codec
        import protocol.forward
        import protocol.tensors

        with contextlib.suppress(ImportError):  # in checkouts that have them
            import protocol.connection
            import protocol.swarm  # noqa: F401
    from protocol.errors import ProtocolError

    target = build_targets()[name]
    corpus = out / "corpus" / name
    findings_dir = out / "findings"
    corpus.mkdir(parents=True, exist_ok=True)
    findings_dir.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(target.seeds):
        path = corpus / f"seed-{i}"
        if not path.exists():
            path.write_bytes(seed)
    tokens = libfuzzer_dict(target.seeds)
    dict_args = []
    if tokens:  # libFuzzer refuses an empty dictionary file
        dict_path = out / "corpus" / f"{name}.dict"
        dict_path.write_text(tokens)
        dict_args = [f"-dict={dict_path}"]
    seen: set[tuple[str, str]] = set()

    def one_input(data: bytes) -> None:
        try:
            target.run(data)
        except ProtocolError:
            pass
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
            sig = (type(e).__name__, where)
            if sig in seen or len(seen) >= MAX_SAVED_FINDINGS:
                return
            seen.add(sig)
            digest = hashlib.sha1(data).hexdigest()[:12]
            path = findings_dir / f"{name}-{sig[0]}-{digest}.bin"
            path.write_bytes(data)
            path.with_suffix(".txt").write_text("".join(traceback.format_exception(e)))
            print(f"FINDING {name} {sig[0]} at {where}: {str(e)[:120]!r} -> {path}", flush=True)

    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={seconds}",
            f"-max_len={target.max_len}",
            f"-artifact_prefix={findings_dir}/{name}-",
            *dict_args,
            "-print_final_stats=1",
            "-timeout=10",
            "-rss_limit_mb=2048",
            *libfuzzer_args,
        ],
        one_input,
    )
    atheris.Fuzz()


# --- parent: run each target, parse libFuzzer's output, report ----------------------------------

_STAT_RE = re.compile(r"^stat::(\w+):\s*(\d+)", re.M)
_STATUS_RE = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)/")
_DONE_RE = re.compile(r"Done (\d+) runs in (\d+) second")


def parse_output(text: str) -> dict[str, Any]:
    stats = {k: int(v) for k, v in _STAT_RE.findall(text)}
    status = _STATUS_RE.findall(text)
    cov, ft, corp = (int(x) for x in status[-1]) if status else (0, 0, 0)
    done = _DONE_RE.search(text)
    findings = [line for line in text.splitlines() if line.startswith("FINDING ")]
    # libFuzzer's own: timeout, out-of-memory, deadly signal, leak.
    findings += [line for line in text.splitlines() if line.startswith("==") and "ERROR:" in line]
    return {
        "executions": stats.get("number_of_executed_units", int(done.group(1)) if done else 0),
        "exec_per_s": stats.get("average_exec_per_sec", 0),
        "cov": cov,
        "ft": ft,
        "corpus": corp,
        "new_units": stats.get("new_units_added", 0),
        "peak_rss_mb": stats.get("peak_rss_mb", 0),
        "findings": findings,
    }


def run_target(
    name: str, seconds: int, out: Path, libfuzzer_args: list[str], log_dir: Path
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--seconds", str(seconds), "--out", str(out)]
    cmd += ["--", *libfuzzer_args]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=seconds + 60
        )
        text = proc.stdout + proc.stderr
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired as e:  # subprocess.run killed the child already
        parts = [
            p.decode(errors="replace") if isinstance(p, bytes) else p or ""
            for p in (e.stdout, e.stderr)
        ]
        text = "".join(parts)
        rc = "timeout"
    (log_dir / f"{name}.log").write_text(text)
    result: dict[str, Any] = {
        "target": name,
        "rc": rc,
        "wall_s": round(time.monotonic() - started, 1),
    }
    result.update(parse_output(text))
    if result["executions"] == 0:
        result["findings"].append(f"target did not run (rc {rc}); see {log_dir / name}.log")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="total time budget (all targets)")
    parser.add_argument("--target", action="append", help="a target (repeatable); default all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus, findings, logs")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("libfuzzer_args", nargs="*", help="after --: passed to libFuzzer")
    args = parser.parse_args(argv)

    if args.child:
        run_child(args.child, args.seconds, args.out, args.libfuzzer_args)
        return 0  # not reached: libFuzzer exits the process
    names = list(build_targets())
    if args.list:
        print("\n".join(names))
        return 0
    chosen = args.target or names
    unknown = [t for t in chosen if t not in names]
    if unknown or args.seconds < 1:
        parser.error(f"unknown target(s) {unknown}; see --list" if unknown else "--seconds < 1")
    try:
        import atheris  # noqa: F401
    except ImportError as e:
        print(f"fuzz_protocol: atheris is not importable ({e})", file=sys.stderr)
        return 1
    per = max(1, args.seconds // len(chosen))
    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in chosen:
        r = run_target(name, per, args.out, args.libfuzzer_args, log_dir)
        results.append(r)
        if not args.json:
            print(
                f"{name:20} {r['executions']:>10} execs {r['exec_per_s']:>7}/s  "
                f"cov {r['cov']:>4} ft {r['ft']:>5}  corpus {r['corpus']:>4}  "
                f"findings {len(r['findings'])}",
                flush=True,
            )
            for line in r["findings"]:
                print(f"    {line}")
    total = sum(len(r["findings"]) for r in results)
    (args.out / "report.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        execs = sum(r["executions"] for r in results)
        print(f"total: {execs} executions, {total} findings; inputs in {args.out / 'findings'}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
