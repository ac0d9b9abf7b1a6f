"""`shardmesh demo`: a local mesh on loopback serving a tiny model made offline.

Starts N agents as separate `shardmesh up` processes, each serving a slice of the model's
blocks, runs a generation through them via the first agent's control socket, prints the
route and the peers table, and stops every agent by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.api import control
from agent.cli import render
from agent.errors import ShardmeshError

PROMPT = "the mesh turns idle machines into one"
READY_TIMEOUT_S = 120.0


def even_spans(n_blocks: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n_blocks))
    bounds = [round(i * n_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        sys.stderr.write(f"demo: {msg}\n")
        sys.stderr.flush()


def _wait(pred: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise ShardmeshError(f"an agent exited early (code {p.returncode}) while {what}")
        try:
            value = pred()
        except ShardmeshError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise ShardmeshError(f"timed out after {timeout:g} s {what}")


def run_demo(args: argparse.Namespace) -> int:
    from agent.model.tiny import ensure_tiny_model

    quiet = args.json
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="shardmesh-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    _say(f"making a tiny {args.family} model offline in {work / 'models'}", quiet)
    model_dir = ensure_tiny_model(args.family, work / "models", n_layers=8, hidden=64)
    from agent.model.modelinfo import read_model_info

    info = read_model_info(model_dir)
    spans = even_spans(info.n_blocks, args.agents)
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[Path] = []
    try:
        first_addr: str | None = None
        for i, (start, end) in enumerate(spans):
            state = work / f"agent{i}"
            state.mkdir(exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "agent.cli",
                "up",
                "--state-dir",
                str(state),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
                "--announce-interval",
                "1",
                "--ad-ttl",
                "5",
                "--model",
                str(model_dir),
                "--blocks",
                f"{start}:{end}",
                "--threads",
                "1",
                "--log-level",
                "warning",
            ]
            if first_addr:
                cmd += ["--bootstrap", first_addr]
            log = open(work / f"agent{i}.log", "wb")  # noqa: SIM115 - owned by the child
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            log.close()
            socks.append(state / "control.sock")
            _say(f"started agent {i} (pid {procs[-1].pid}) serving blocks {start}:{end}", quiet)
            if first_addr is None:
                status = _wait(
                    lambda: _online(socks[0]), READY_TIMEOUT_S, "waiting for agent 0", procs
                )
                first_addr = status["addrs"][0]
        _wait(lambda: all(_online(s) for s in socks), READY_TIMEOUT_S, "waiting for agents", procs)
        _wait(lambda: _covered(socks[0], info.model_id), 30, "waiting for full coverage", procs)
        _say(f"generating through the mesh: {PROMPT!r} (random weights: expect nonsense)", quiet)
        result = None
        if not quiet:
            sys.stdout.write(f"\n{PROMPT}")
        for event in control.stream_request(
            socks[0],
            "generate",
            timeout=120,
            model=info.name,
            prompt=PROMPT,
            max_new_tokens=args.max_new_tokens,
        ):
            if event.get("event") == "token" and not quiet:
                sys.stdout.write(event.get("text", ""))
                sys.stdout.flush()
            elif event.get("event") == "result":
                result = event["result"]
        assert result is not None
        peers = control.request(socks[0], "peers")
        if quiet:
            sys.stdout.write(json.dumps({"generation": result, "peers": peers}, indent=2) + "\n")
        else:
            sys.stdout.write("\n\n")
            route = " -> ".join(
                f"{render.short_id(r['peer_id'])} blocks {r['span'][0]}:{r['span'][1]}"
                for r in result["route"]
            )
            sys.stdout.write(f"token ids: {result['token_ids']}\n")
            sys.stdout.write(f"route: client -> {route}\n")
            sys.stdout.write(
                f"{len(result['token_ids'])} tokens, prefill {result['prefill_s'] * 1000:.0f} ms, "
                f"decode {result['decode_tokens_per_s']:.1f} tokens/s\n\n"
            )
            sys.stdout.write(render.peers_table(peers))
        return 0
    finally:
        _say("stopping agents", quiet)
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def _online(sock: Path) -> dict[str, Any] | None:
    s = control.request(sock, "status", timeout=2.0)
    return s if s.get("state") == "online" else None


def _covered(sock: Path, model_id: str) -> bool:
    peers = control.request(sock, "peers", timeout=2.0)
    return any(c["model"] == model_id and c["complete"] for c in peers["coverage"])
