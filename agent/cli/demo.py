"""`shardmesh demo`: a local mesh on loopback serving a tiny model made offline.

Starts N agents as separate `shardmesh up` processes, each serving a slice of the model's
blocks, runs a generation through them via the first agent's control socket, prints the
route and the peers table, and stops every agent by pid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from agent.cli import render
from agent.testing.agents import AgentProcess, stop_all, wait_for

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


def _agent(
    work: Path, i: int, model_dir: Path, span: tuple[int, int], boot: str | None
) -> AgentProcess:
    args = ["--announce-interval", "1", "--ad-ttl", "5", "--model", str(model_dir)]
    args += ["--blocks", f"{span[0]}:{span[1]}", "--threads", "1", "--log-level", "warning"]
    if boot:
        args += ["--bootstrap", boot]
    # Its log: work/agent<i>.log, next to its state dir.
    return AgentProcess(work / f"agent{i}", args)


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
    agents: list[AgentProcess] = []
    try:
        for i, span in enumerate(spans):
            agent = _agent(work, i, model_dir, span, agents[0].addr if agents else None)
            agents.append(agent)
            agent.launch()
            _say(f"started agent {i} (pid {agent.pid}) serving blocks {span[0]}:{span[1]}", quiet)
            if i == 0:  # the others bootstrap to it, so they need its address
                agent.wait_ready(READY_TIMEOUT_S)
        for agent in agents[1:]:
            agent.wait_ready(READY_TIMEOUT_S)
        wait_for(lambda: _covered(agents, info.model_id), 30, "full coverage", interval=0.2)
        _say(f"generating through the mesh: {PROMPT!r} (random weights: expect nonsense)", quiet)
        result = None
        if not quiet:
            sys.stdout.write(f"\n{PROMPT}")
        for event in agents[0].stream_request(
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
        peers = agents[0].request("peers", timeout=10.0)
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
        stop_all(agents, drain=True)


def _covered(agents: list[AgentProcess], model_id: str) -> bool:
    """Whether agent 0 sees the whole model served; raises at once if an agent has died."""
    for agent in agents:
        agent.check_running()
    peers = agents[0].request_or_none("peers", timeout=2.0)
    return bool(peers) and any(c["model"] == model_id and c["complete"] for c in peers["coverage"])
