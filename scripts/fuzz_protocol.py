#!/usr/bin/env python3
"""Coverage-guided fuzzing of the protocol decoders with atheris (libFuzzer for Python).

Every decoder in protocol/ must turn any bytes into a valid message or a ProtocolError, and
so must the forward connection's state machine (both roles). Any other exception (or a broken
invariant: a decoded message that does not re-encode to itself, a frame decoder that buffers
more than a frame, a connection whose events depend on how its bytes were split) is a finding:
the input is saved to --out/findings/ with its traceback, and the fuzzer goes on. libFuzzer's
own findings (an input that runs past -timeout, or memory past -rss_limit_mb) are saved there
too, by libFuzzer.

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
                    except codec.DecodeError:
                        continue
                    if msg is None:
                        break
                assert dec.buffered <= forward.FRAME_PREFIX_LEN + FRAME_MAX, "over-buffered"
        except codec.FrameTooLarge:
            assert dec.buffered == 0, "buffer kept after FrameTooLarge"
            try:
                dec.feed(b"\x00")
            except codec.FrameTooLarge:
                return
            raise AssertionError("decoder usable after FrameTooLarge") from None

    def decode_signed_ad(data: bytes) -> None:
        got = ads.decode_signed_ad(data)
        assert got.peer_id == peer  # only our key can sign; anything else is a forgery

    def ad_body_signed(data: bytes) -> None:
        # Validly signed hostile ad bodies: the only way past the signature to the ad parser.
        got = ads.decode_signed_ad(sign_raw(data))
        assert ads.decode_signed_ad(ads.encode_signed_ad(got, key)) == got, "round trip"

    validator = ads.AdValidator(max_peers=64)

    def ad_validator(data: bytes) -> None:
        sender = peer if len(data) % 2 else None
        try:
            validator.check(data, sender=sender, now=now + (len(data) % 7))
        except ads.AdRejected as e:
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
    targets.update(_connection_targets())
    targets.update(_swarm_targets())
    return targets


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

    role_of = {0: connection.Role.CLIENT, 1: connection.Role.SERVER}
    # Small limits, so that skipped and fatal frames are within the fuzzer's reach.
    max_frame, max_discard = 512, 2048
    tensor = forward.TensorFrame("float32", (1, 1, 2), bytes(8))
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
                    forward.StepResult(3, forward.TensorFrame("float32", (2, 1), bytes(8)), 1.0),
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
    msgs = [
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
    import atheris

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
        text = (e.stdout or "") + (e.stderr or "")
        text = text if isinstance(text, str) else text.decode(errors="replace")
        rc = "timeout"
    (log_dir / f"{name}.log").write_text(text)
    result = {"target": name, "rc": rc, "wall_s": round(time.monotonic() - started, 1)}
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
