#!/usr/bin/env python3
"""Generation benchmark: decode tokens/s of Hugging Face generate() in one process against the
mesh with 1, 2 and 3 agents on this machine (loopback), one torch thread per process.

The model is Llama-shaped with random weights (float32; about 220M parameters with the
defaults), made once under --workdir and reused. Every measurement runs in a fresh process:

  local   `generate(do_sample=False, max_new_tokens=N)` in a child process with
          torch.set_num_threads(1). A streamer timestamps every token as generate() emits it;
          decode tokens/s = (N - 1) / (time of token N - time of token 1), i.e. prefill and the
          first token are excluded, exactly as the mesh client counts. One warm-up run, then
          --repeats runs; the median is reported.
  mesh k  the layers split evenly into k spans, k agents (`shardmesh up --threads 1`), and a
          standalone client (embeddings + LM head, torch.set_num_threads(1)) in a child process
          that runs `agent.route.generate.generate_ids` for the same prompt and N: one warm-up, then
          --repeats runs, median of its decode_tokens_per_s. Its greedy tokens must equal the
          local run's.

  verify  (--verify 0,0.1,1) the same k spans, each served by two agents (2k agents), and the
          client with verified outputs (agent.verify) at each fraction: every sampled step
          also runs on the other replica of each hop, concurrently with the primary. One
          warm-up and --repeats runs per fraction, median decode tokens/s; the cost of a
          fraction is its rate against fraction 0 on the same agents.

Overhead per hop = (1/mesh_rate - 1/local_rate) / k, in ms: what each of the k network hops adds
to a decode step (the embedding and LM head run on the client in both setups). "transport"
is the client's own view of a hop: round trip of a decode step minus the step time the agent
reports (its forward plus the hand-off to its worker thread), averaged over the last steps.

During decode the pipeline is sequential (client -> agent 1 -> ... -> agent k -> client), so
only one of these single-threaded processes computes at any moment; k agents plus a client on
fewer cores than processes is still a fair comparison with one process on one thread.

Every process started here is stopped by pid at the end, also on Ctrl-C or an error, and is
told by the kernel (PR_SET_PDEATHSIG) to stop if this script dies first.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing.agents import AgentError, AgentProcess, pdeathsig_preexec, stop_all  # noqa: E402
from agent.testing.report import machine_info, markdown_table, write_json  # noqa: E402

# Child processes get one BLAS/OpenMP thread too, so no pool is sized to the whole machine.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ANNOUNCE_INTERVAL_S = 1.0
AD_TTL_S = 8.0
PAD_ID = 0


class BenchError(Exception):
    """The benchmark cannot go on (a process failed, a wait ran out); one line for the user."""


# Either of ours, or an agent that would not start (agent.testing's AgentError).
FAILURES = (BenchError, AgentError)


# --- the model ----------------------------------------------------------------------------------
def model_shape(args: argparse.Namespace) -> dict[str, int]:
    heads = args.heads or max(1, args.hidden // 64)
    intermediate = args.intermediate or 256 * round(2.75 * args.hidden / 256)
    return {
        "hidden_size": args.hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 2048,
    }


def model_dir_for(workdir: Path, shape: dict[str, int], seed: int) -> Path:
    s = shape
    return workdir / (
        f"bench-llama-h{s['hidden_size']}-l{s['num_hidden_layers']}-i{s['intermediate_size']}"
        f"-a{s['num_attention_heads']}-v{s['vocab_size']}-s{seed}"
    )


def make_model(out: Path, shape: dict[str, int], seed: int) -> None:
    """Random-weight float32 Llama written to a private dir and renamed into place, so an
    interrupted run never leaves a half model for the next one to reuse."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    # No bos/eos: generate() then never stops early, like the mesh client given no eos.
    cfg = LlamaConfig(
        **shape,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size="200MB")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def param_count(model_dir: Path) -> int:
    from agent.model.modelinfo import read_weight_index

    return sum(e.numel for e in read_weight_index(model_dir).values())


def ensure_model(args: argparse.Namespace) -> Path:
    shape = model_shape(args)
    out = model_dir_for(args.workdir, shape, args.seed)
    if (out / "config.json").is_file():
        print(f"model: reusing {out}", flush=True)
        return out
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"model: writing {out} ...", flush=True)
    t0 = time.monotonic()
    run_worker(
        ["make", "--model-dir", str(out), "--shape", json.dumps(shape), "--seed", str(args.seed)],
        args.timeout,
    )
    print(f"model: written in {time.monotonic() - t0:.0f} s", flush=True)
    return out


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    """A fixed pseudo-random prompt (ids away from the pad id)."""
    x, out = seed * 2654435761 + 12345, []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(1 + (x >> 33) % (vocab - 1))
    return out


# --- workers (child processes) ------------------------------------------------------------------
def local_worker(model_dir: Path, prompt: list[int], n: int, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Timestamps each put(): first the prompt, then every new token as it is chosen."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=PAD_ID
    )
    ids = torch.tensor([prompt], dtype=torch.long)
    mask = torch.ones_like(ids)
    rates, prefills, tokens = [], [], None
    for r in range(repeats + 1):
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, generation_config=gen_cfg, streamer=clock
            )
        new = out[0, len(prompt) :].tolist()
        if len(new) != n or len(clock.times) != n + 1:
            raise BenchError(
                f"generate() gave {len(new)} tokens and {len(clock.times) - 1} streamer "
                f"events, expected {n}"
            )
        if tokens is not None and new != tokens:
            raise BenchError("generate() is not deterministic across runs")
        tokens = new
        if r == 0:
            continue  # warm-up
        prefills.append(clock.times[1] - t0)
        rates.append((n - 1) / (clock.times[-1] - clock.times[1]))
    return {
        "decode_tokens_per_s": statistics.median(rates),
        "runs_tokens_per_s": rates,
        "prefill_s": statistics.median(prefills),
        "token_ids": tokens,
        "torch_threads": torch.get_num_threads(),
    }


def mesh_worker(
    model_dir: Path,
    bootstrap: str,
    spans: list[list[int]],
    prompt: list[int],
    n: int,
    reps: int,
    fractions: list[float] | None = None,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    import trio

    from agent.model.head import ClientHead
    from agent.route.generate import generate_ids
    from agent.route.health import PeerHealth
    from agent.route.standalone import open_standalone, wait_for_model
    from agent.route.view import ClientConfig

    head = ClientHead.load(model_dir, dtype="float32", device="cpu")
    want = sorted(tuple(s) for s in spans)

    async def run() -> dict[str, Any]:
        async with open_standalone([bootstrap]) as view:
            model_id, _ = await wait_for_model(view, head.info.model_id, timeout_s=60)
            # Every agent of this round in the table, not just some route through the blocks.
            with trio.move_on_after(60):
                while (seen := sorted((p.start, p.end) for p in view.spans(model_id))) != want:
                    await trio.sleep(0.1)
            if seen != want:
                raise BenchError(f"the client sees spans {seen}, expected {want}")
            health = PeerHealth()
            if fractions is not None:
                return await verify_runs(view, health, fractions)
            rates, prefills, tokens, route = [], [], None, None
            for r in range(reps + 1):
                res = await generate_ids(
                    view, head, prompt, max_new_tokens=n, eos_token_id=None, health=health
                )
                if res.failovers:
                    raise BenchError(f"failovers during the benchmark: {res.failures}")
                if tokens is not None and res.token_ids != tokens:
                    raise BenchError("the mesh is not deterministic across runs")
                tokens, route = res.token_ids, res.route
                if r:  # run 0 is the warm-up
                    rates.append(res.decode_tokens_per_s)
                    prefills.append(res.prefill_s)
            return {
                "decode_tokens_per_s": statistics.median(rates),
                "runs_tokens_per_s": rates,
                "prefill_s": statistics.median(prefills),
                "token_ids": tokens,
                "route": route,
                "transport_ms": [round(health.rtt_ms.get(h["peer_id"], -1), 3) for h in route],
                "torch_threads": torch.get_num_threads(),
            }

    async def verify_runs(view: Any, health: Any, fracs: list[float]) -> dict[str, Any]:
        rows = []
        for fraction in fracs:
            cfg = ClientConfig(verify_fraction=fraction)
            rates, res = [], None
            for r in range(reps + 1):
                res = await generate_ids(
                    view, head, prompt, max_new_tokens=n, eos_token_id=None, cfg=cfg, health=health
                )
                if res.failovers or res.suspect_peers:
                    raise BenchError(f"failovers during the benchmark: {res.failures}")
                if r:
                    rates.append(res.decode_tokens_per_s)
            assert res is not None
            rows.append(
                {
                    "fraction": fraction,
                    "decode_tokens_per_s": statistics.median(rates),
                    "runs_tokens_per_s": rates,
                    "verified_steps": res.verified_steps,
                    "unverified_steps": res.unverified_steps,
                    "mismatches": res.mismatches,
                    "token_ids": res.token_ids,
                    "route": res.route,
                }
            )
        return {"verify": rows, "torch_threads": torch.get_num_threads()}

    return trio.run(run)


def worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_generate.py --worker")
    p.add_argument("kind", choices=["make", "local", "mesh"])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--shape")
    p.add_argument("--prompt")
    p.add_argument("--tokens", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--bootstrap")
    p.add_argument("--spans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", help="JSON list of verify fractions")
    a = p.parse_args(argv)
    try:
        if a.kind == "make":
            make_model(a.model_dir, json.loads(a.shape), a.seed)
            out: dict[str, Any] = {"ok": True}
        elif a.kind == "local":
            out = local_worker(a.model_dir, json.loads(a.prompt), a.tokens, a.repeats)
        else:
            out = mesh_worker(
                a.model_dir, a.bootstrap, json.loads(a.spans), json.loads(a.prompt), a.tokens,
                a.repeats, json.loads(a.verify) if a.verify else None,
            )  # fmt: skip
    except Exception as exc:  # reported to the parent: traceback, then one summary line
        leaf = _first_leaf(exc)
        if not isinstance(leaf, BenchError):
            traceback.print_exception(exc)
        print(f"bench_generate worker: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        return 1
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _first_leaf(exc: BaseException) -> BaseException:
    """trio nurseries wrap errors in groups: the first real one inside."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def run_worker(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Any:
    """Run a worker to completion (killed on timeout or Ctrl-C) and return its RESULT."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *argv]
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **ONE_THREAD_ENV, **(env or {})},
            preexec_fn=pdeathsig_preexec,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"worker {argv[0]} did not finish within {timeout:g} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise BenchError(f"worker {argv[0]} failed (exit {proc.returncode}): {tail}")


# --- agents -------------------------------------------------------------------------------------
def agent_process(
    root: Path, name: str, model_dir: Path, span: tuple[int, int], bootstrap: str | None
) -> AgentProcess:
    """`shardmesh up --model ... --blocks s:e --threads 1`, one BLAS thread, dies with us."""
    args = ["--announce-interval", str(ANNOUNCE_INTERVAL_S), "--ad-ttl", str(AD_TTL_S)]
    args += ["--model", str(model_dir), "--blocks", f"{span[0]}:{span[1]}", "--threads", "1"]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    return AgentProcess(root / name, args, env=ONE_THREAD_ENV, cwd=REPO, die_with_parent=True)


@contextlib.contextmanager
def agents_running(
    model_dir: Path, spans: list[tuple[int, int]], root: Path, timeout: float, prefix: str = ""
) -> Iterator[list[AgentProcess]]:
    """k agents, agent 0 alone and the others bootstrapped to it; all stopped on exit."""
    prefix = prefix or f"k{len(spans)}"
    agents: list[AgentProcess] = []
    try:
        for i, span in enumerate(spans):
            boot = agents[0].addr if agents else None
            agents.append(agent_process(root, f"{prefix}-a{i}", model_dir, span, boot))
            agents[-1].start(timeout)
        wait_coverage(agents[0], timeout)
        yield agents
    finally:
        stop_all(agents)


def wait_coverage(agent: AgentProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = agent.request_or_none("peers")
        if peers and any(c["complete"] for c in peers.get("coverage", [])):
            return
        time.sleep(0.2)
    raise BenchError(f"the agents did not cover every block within {timeout:g} s")


def split_layers(n_layers: int, k: int) -> list[tuple[int, int]]:
    bounds = [round(i * n_layers / k) for i in range(k + 1)]
    return list(itertools.pairwise(bounds))


# --- report -------------------------------------------------------------------------------------
GENERATE_PACKAGES = ("torch", "transformers", "libp2p")  # the versions the numbers depend on


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _match(r: dict[str, Any]) -> str:
    return "same" if r["tokens_match"] else f"DIFFER at {r['first_mismatch']}"


def print_table(report: dict[str, Any]) -> None:
    local, m, cfg = report["local"], report["machine"], report["config"]
    headers = ("setup", "decode tok/s", "ratio", "ms/token", "overhead/hop ms",
               "transport ms/hop", "prefill ms", "tokens")  # fmt: skip
    rows: list[tuple[object, ...]] = []
    rows.append(("local", f"{local['decode_tokens_per_s']:.2f}", f"{1.0:.3f}",
                 f"{1000 / local['decode_tokens_per_s']:.2f}", "-", "-",
                 f"{local['prefill_s'] * 1000:.1f}", "reference"))  # fmt: skip
    for r in report["mesh"]:
        name = f"mesh k={r['k']}"
        if "error" in r:
            rows.append((name, f"failed: {r['error']}"))
            continue
        rows.append((name, f"{r['decode_tokens_per_s']:.2f}", f"{r['ratio']:.3f}",
                     f"{1000 / r['decode_tokens_per_s']:.2f}", f"{r['overhead_per_hop_ms']:.2f}",
                     "/".join(f"{t:.2f}" for t in r["transport_ms"]),
                     f"{r['prefill_s'] * 1000:.1f}", _match(r)))  # fmt: skip
    print()
    print(markdown_table(headers, rows))
    print(
        f"\nmodel: Llama-shaped, {cfg['params'] / 1e6:.0f}M parameters (hidden {cfg['hidden']}, "
        f"{cfg['layers']} layers, vocab {cfg['vocab']}), random weights, float32; prompt "
        f"{cfg['prompt_tokens']} tokens, {cfg['tokens']} new tokens, greedy; median of "
        f"{cfg['repeats']} runs after one warm-up.\n"
        "decode tok/s excludes prefill and the first token. overhead/hop = (1/mesh - 1/local)/k;"
        "\ntransport = client-observed round trip of a decode step minus the agent's reported step"
        "\ntime (its forward incl. the hand-off to its worker thread), averaged over recent steps."
        f"\nmachine: {m['cpu_model']}, {m['logical_cores']} logical cores; torch {m['torch']}, "
        f"transformers {m['transformers']}, libp2p {m['libp2p']}, python {m['python']}."
        "\nOne torch thread per process. k agents + the client are more processes than cores "
        "here, but\nthe decode pipeline is sequential: one process computes at a time."
    )
    load = max(m["load_avg_at_start"][0], report["load_avg_at_end"][0])
    if m["logical_cores"] and load > 0.5 * m["logical_cores"]:
        print(
            f"\nWARNING: 1-min load average reached {load:.1f} on {m['logical_cores']} cores: "
            "other work competed for the CPU, so these numbers are not representative.",
            file=sys.stderr,
        )
    if report.get("verify"):
        print_verify_table(report)
    bad = [r["k"] for r in report["mesh"] if r.get("tokens_match") is False]
    bad += [r["k"] for r in report.get("verify", []) if r.get("tokens_match") is False]
    if bad:
        print(
            f"\n!!! MISMATCH: the mesh with k={bad} produced different greedy tokens than "
            "generate() — a bug !!!",
            file=sys.stderr,
        )


def print_verify_table(report: dict[str, Any]) -> None:
    headers = ("verified outputs", "fraction", "decode tok/s", "vs off", "verified",
               "unverified", "tokens")  # fmt: skip
    rows: list[tuple[object, ...]] = []
    for r in report["verify"]:
        name = f"k={r['k']} ({2 * r['k']} agents)"
        if "error" in r:
            rows.append((name, f"failed: {r['error']}"))
            continue
        rows.append((name, f"{r['fraction']:g}", f"{r['decode_tokens_per_s']:.2f}",
                     f"{r['vs_off']:.3f}", r["verified_steps"], r["unverified_steps"],
                     _match(r)))  # fmt: skip
    print()
    print(markdown_table(headers, rows))
    print(
        "verified outputs: every span served by two agents; a sampled step also runs on the"
        "\nother replica of each hop (concurrently). vs off = rate / rate at fraction 0, same "
        "agents;\nverified/unverified = steps of the last run (prefill counts as one)."
    )


# --- main ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, help="MLP width (default 2.75 x hidden)")
    p.add_argument("--heads", type=int, help="attention heads (default hidden / 64)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0, help="weights and prompt")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation (N)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--agents", default="1,2,3", help="comma-separated mesh sizes")
    p.add_argument(
        "--verify",
        default="",
        metavar="FRACTIONS",
        help="also measure verified outputs at these fractions, e.g. 0,0.1,1 (2k agents per k)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench_generate.json")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/shardmesh-bench"))
    p.add_argument("--timeout", type=float, default=900.0, help="per worker process, s")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="per agent start, s")
    args = p.parse_args(argv)
    try:
        args.agent_counts = [int(s) for s in args.agents.split(",") if s.strip()]
    except ValueError:
        p.error(f"--agents: expected integers like 1,2,3, got {args.agents!r}")
    if not args.agent_counts or min(args.agent_counts) < 1:
        p.error("--agents: every count must be at least 1")
    try:
        args.verify_fractions = [float(s) for s in args.verify.split(",") if s.strip()]
    except ValueError:
        p.error(f"--verify: expected fractions like 0,0.1,1, got {args.verify!r}")
    if any(not 0.0 <= f <= 1.0 for f in args.verify_fractions):
        p.error("--verify: every fraction must be between 0 and 1")
    if max(args.agent_counts) > args.layers:
        p.error("--agents: more agents than layers")
    if args.tokens < 2 or args.repeats < 1 or args.prompt_tokens < 1:
        p.error("--tokens must be >= 2, --repeats and --prompt-tokens >= 1")
    heads = args.heads or max(1, args.hidden // 64)
    if args.hidden % heads:
        p.error(f"--hidden {args.hidden} is not a multiple of {heads} heads")
    args.workdir = args.workdir.resolve()
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = ensure_model(args)
    prompt = prompt_ids(args.prompt_tokens, args.vocab, args.seed)
    common = ["--model-dir", str(model_dir), "--prompt", json.dumps(prompt)]
    common += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    report: dict[str, Any] = {
        "machine": machine_info(GENERATE_PACKAGES),
        "config": {
            "params": param_count(model_dir),
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "shape": model_shape(args),
            "model_dir": str(model_dir),
            "prompt_tokens": args.prompt_tokens,
            "tokens": args.tokens,
            "repeats": args.repeats,
            "threads_per_process": 1,
            "method": {
                "local": "HF generate(do_sample=False) in a fresh process, torch threads 1; a "
                "streamer timestamps each token; decode tok/s = (N-1) / (t_token_N - t_token_1)",
                "mesh": "agent.route.generate.generate_ids from a standalone client process (torch "
                "threads 1) through k `shardmesh up --threads 1` agents on loopback; its "
                "decode_tokens_per_s counts the same N-1 tokens",
                "overhead_per_hop_ms": "(1/mesh_rate - 1/local_rate) / k * 1000",
                "transport_ms": "per hop: client-observed round trip of a step minus the "
                "agent's reported step time (EMA, weight 0.3 on the newest step)",
                "statistic": "median over --repeats runs after one warm-up run",
            },
        },
        "mesh": [],
    }
    print("local: generate() in one process ...", flush=True)
    local = run_worker(["local", *common], args.timeout)
    report["local"] = local
    print(f"local: {local['decode_tokens_per_s']:.2f} tok/s", flush=True)
    root = args.workdir / "agents"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for k in args.agent_counts:
        spans = split_layers(args.layers, k)
        row: dict[str, Any] = {"k": k, "spans": spans}
        print(f"mesh k={k}: spans {spans} ...", flush=True)
        try:
            with agents_running(model_dir, spans, root, args.ready_timeout) as agents:
                worker = ["mesh", *common, "--spans", json.dumps(spans)]
                res = run_worker([*worker, "--bootstrap", agents[0].addr], args.timeout)
        except FAILURES as exc:
            row["error"] = str(exc)
            print(f"mesh k={k}: FAILED: {exc}", flush=True)
            report["mesh"].append(row)
            continue
        rate, base = res["decode_tokens_per_s"], local["decode_tokens_per_s"]
        row.update(res)
        row["ratio"] = rate / base
        row["overhead_per_hop_ms"] = (1 / rate - 1 / base) / k * 1000
        row["first_mismatch"] = first_mismatch(local["token_ids"], res["token_ids"])
        row["tokens_match"] = row["first_mismatch"] is None
        print(
            f"mesh k={k}: {rate:.2f} tok/s, ratio {row['ratio']:.3f}, "
            f"tokens {'same' if row['tokens_match'] else 'DIFFERENT'}",
            flush=True,
        )
        report["mesh"].append(row)
    if args.verify_fractions:
        report["verify"] = bench_verify(args, model_dir, common, local, root)
    return report


def bench_verify(
    args: argparse.Namespace,
    model_dir: Path,
    common: list[str],
    local: dict[str, Any],
    root: Path,
) -> list[dict[str, Any]]:
    """Per k: every span served twice, then the client at each verify fraction."""
    rows: list[dict[str, Any]] = []
    fractions = json.dumps(args.verify_fractions)
    for k in args.agent_counts:
        spans = split_layers(args.layers, k)
        print(f"verify k={k}: spans {spans}, each on two agents ...", flush=True)
        try:
            with agents_running(model_dir, spans * 2, root, args.ready_timeout, f"v{k}") as agents:
                worker = ["mesh", *common, "--spans", json.dumps(spans * 2), "--verify", fractions]
                res = run_worker([*worker, "--bootstrap", agents[0].addr], args.timeout)
        except FAILURES as exc:
            print(f"verify k={k}: FAILED: {exc}", flush=True)
            rows.append({"k": k, "error": str(exc)})
            continue
        off = next((r for r in res["verify"] if r["fraction"] == 0), None)
        for r in res["verify"]:
            r["k"] = k
            r["vs_off"] = r["decode_tokens_per_s"] / off["decode_tokens_per_s"] if off else 1.0
            r["first_mismatch"] = first_mismatch(local["token_ids"], r["token_ids"])
            r["tokens_match"] = r["first_mismatch"] is None
            print(
                f"verify k={k} fraction {r['fraction']:g}: {r['decode_tokens_per_s']:.2f} tok/s, "
                f"{r['verified_steps']} steps verified, "
                f"tokens {'same' if r['tokens_match'] else 'DIFFERENT'}",
                flush=True,
            )
            rows.append(r)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    args = parse_args(argv)
    # SIGTERM/SIGHUP unwind through the finally blocks like Ctrl-C, so every agent is stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        report = bench(args)
    except KeyboardInterrupt:
        print("bench_generate: interrupted; every process was stopped", file=sys.stderr)
        return 130
    except FAILURES as exc:
        print(f"bench_generate: {exc}", file=sys.stderr)
        return 1
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_table(report)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    failed = [r["k"] for r in report["mesh"] if "error" in r or not r.get("tokens_match")]
    failed += [r["k"] for r in report.get("verify", []) if not r.get("tokens_match")]
    return 1 if failed else 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
