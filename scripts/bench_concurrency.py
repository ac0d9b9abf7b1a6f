#!/usr/bin/env python3
"""Continuous batching benchmark: aggregate decode tokens/s of C concurrent generations through
two agents that batch the steps of concurrent sessions into one forward, against Hugging Face
generate() with batch size C in one process; one torch thread per process.

The model is Llama-shaped with random weights (float32; about 134M parameters with the
defaults: hidden 768, 12 layers, MLP 2048, 12 heads, vocab 32000), made once under --workdir
(by scripts/bench_generate.py's maker, so both benchmarks share models) and reused. For every C
in --concurrency, C different prompts of --prompt-tokens tokens (prompt i from seed --seed + i)
and N = --tokens greedy new tokens each:

  mesh    the layers split in 2, two agents (`shardmesh up --threads 1`, limits raised so one
          client may hold C sessions), and ONE standalone client process (embeddings + LM head,
          torch.set_num_threads(1)) that starts C `agent.route.generate.generate_ids` calls at
          once in a trio nursery. An on_token callback timestamps every token of every stream.
          aggregate decode tok/s = sum over streams of (tokens after that stream's first) /
          (last token of any stream - first token of any stream). Time between tokens (TBT):
          the gaps between consecutive tokens of each stream, pooled over the C streams.
          Mean batch rows: the agents' `status` batch counters (sequences per forward) read
          before and after each measured round, delta rows / delta forwards.
  local   generate(do_sample=False, max_new_tokens=N) on the C prompts as one batch (equal
          lengths, no padding) in a child process with torch.set_num_threads(1). A
          LogitsProcessor timestamps every decoding step (it runs once per new token, right
          after that step's forward); aggregate decode tok/s = C*(N-1) / (t_step_N - t_step_1).

Per C: one warm-up round at that C, then --repeats measured rounds; the median rate is shown.
Exactness: every stream's greedy tokens through the mesh must equal those of the local batch-C
run for its prompt and those of a local batch-1 run of that prompt; otherwise the row says
DIFFERENT and the script exits 1.

With batching the pipeline overlaps: the client and both agents can all compute at once, so on
fewer than 3 cores the mesh is short of CPU (a warning says so).

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
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:  # sys.path[0] when run as a script; not when a test imports it
    sys.path.insert(0, str(HERE))

import bench_generate as bg  # noqa: E402

from agent.testing.agents import AgentProcess, pdeathsig_preexec, stop_all  # noqa: E402
from agent.testing.report import machine_info, markdown_table, write_json  # noqa: E402

BenchError = bg.BenchError
FAILURES = bg.FAILURES
ONE_THREAD_ENV = bg.ONE_THREAD_ENV
PACKAGES = ("torch", "transformers", "libp2p", "trio")
PROCESSES = 3  # two agents and the client, all busy at once while steps are batched


# --- small helpers ------------------------------------------------------------------------------
def percentile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def gaps_ms(times: Sequence[float]) -> list[float]:
    return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


def batch_counters(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """The serving batch counters of an agent's `status` (under "serving" or at the top)."""
    if not status:
        return None
    serving = status.get("serving")
    batch = (serving if isinstance(serving, dict) else status).get("batch")
    return batch if isinstance(batch, dict) and "forwards" in batch else None


def rows_total(batch: dict[str, Any]) -> int:
    """Rows over all forwards so far. status shows mean_rows rounded to 2 decimals, so this is
    exact while forwards <= 100 and off by at most forwards/200 rows beyond."""
    return round(float(batch["mean_rows"]) * int(batch["forwards"]))


def prompts_for(args: argparse.Namespace) -> list[list[int]]:
    return [
        bg.prompt_ids(args.prompt_tokens, args.vocab, args.seed + i)
        for i in range(max(args.concurrency_levels))
    ]


# --- workers (child processes) ------------------------------------------------------------------
def local_worker(
    model_dir: Path, prompts: list[list[int]], levels: list[int], n: int, repeats: int
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        LogitsProcessor,
        LogitsProcessorList,
    )

    class StepClock(LogitsProcessor):
        """Called once per decoding step, after its forward and before its token is chosen."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.times.append(time.perf_counter())
            return scores

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=bg.PAD_ID
    )

    def generate(batch: list[list[int]]) -> tuple[list[list[int]], list[float], float]:
        ids = torch.tensor(batch, dtype=torch.long)
        clock = StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([clock]),
            )
        new = out[:, ids.shape[1] :].tolist()
        if any(len(t) != n for t in new) or len(clock.times) != n:
            raise BenchError(
                f"generate() gave {[len(t) for t in new]} tokens and {len(clock.times)} "
                f"steps, expected {n}"
            )
        return new, clock.times, t0

    generate([prompts[0]])  # warm-up of the batch-1 path
    # Batch-1 references: each prompt alone.
    refs = [generate([p])[0][0] for p in prompts]
    rows = []
    for c in levels:
        rates, prefills, gaps, tokens = [], [], [], None
        for r in range(repeats + 1):
            new, times, t0 = generate(prompts[:c])
            if tokens is not None and new != tokens:
                raise BenchError(f"generate() at batch {c} is not deterministic across runs")
            tokens = new
            if r == 0:
                continue  # warm-up
            rates.append(c * (n - 1) / (times[-1] - times[0]))
            prefills.append(times[0] - t0)
            gaps += gaps_ms(times)
        assert tokens is not None
        rows.append(
            {
                "c": c,
                "decode_tokens_per_s": statistics.median(rates),
                "runs_tokens_per_s": rates,
                "prefill_s": statistics.median(prefills),
                "tbt_p50_ms": percentile(gaps, 50),
                "tbt_p95_ms": percentile(gaps, 95),
                "token_ids": tokens,
                "matches_batch1": [t == refs[i] for i, t in enumerate(tokens)],
            }
        )
    return {"rows": rows, "batch1_token_ids": refs, "torch_threads": torch.get_num_threads()}


def mesh_worker(
    model_dir: Path,
    bootstrap: str,
    spans: list[list[int]],
    prompts: list[list[int]],
    levels: list[int],
    n: int,
    repeats: int,
    agent_dirs: list[str],
    agent_pids: list[int],
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    import psutil
    import trio

    from agent.model.head import ClientHead
    from agent.route.generate import GenerationResult, generate_ids
    from agent.route.health import PeerHealth
    from agent.route.standalone import open_standalone, wait_for_model

    head = ClientHead.load(model_dir, dtype="float32", device="cpu")
    want = sorted(tuple(s) for s in spans)
    agents = [AgentProcess(Path(d)) for d in agent_dirs]  # only their control sockets
    procs = [psutil.Process(pid) for pid in agent_pids]

    def agent_cpu() -> list[float]:
        out = []
        for p in procs:
            try:
                t = p.cpu_times()
                out.append(t.user + t.system)
            except psutil.Error:
                out.append(float("nan"))
        return out

    async def batches() -> list[dict[str, Any] | None]:
        def read() -> list[dict[str, Any] | None]:
            return [batch_counters(a.request_or_none("status")) for a in agents]

        return await trio.to_thread.run_sync(read)

    async def one_round(view: Any, health: Any, c: int) -> dict[str, Any]:
        times: list[list[float]] = [[] for _ in range(c)]
        results: list[GenerationResult | None] = [None] * c

        async def stream(i: int) -> None:
            async def on_token(token: int) -> None:
                times[i].append(time.perf_counter())

            results[i] = await generate_ids(
                view,
                head,
                prompts[i],
                max_new_tokens=n,
                eos_token_id=None,
                on_token=on_token,
                health=health,
            )

        before = await batches()
        cpu0, acpu0, t0 = time.process_time(), agent_cpu(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(c):
                nursery.start_soon(stream, i)
        wall = time.perf_counter() - t0
        cpu1, acpu1 = time.process_time(), agent_cpu()
        after = await batches()
        done = [r for r in results if r is not None]
        if len(done) != c or any(r.failovers for r in done):
            raise BenchError(f"failovers during the benchmark: {[r.failures for r in done]}")
        if any(len(t) != len(r.token_ids) or len(t) != n for t, r in zip(times, done, strict=True)):
            raise BenchError(f"expected {n} tokens and on_token calls per stream")
        first = min(t[0] for t in times)
        last = max(t[-1] for t in times)
        stream_gaps = [gaps_ms(t) for t in times]
        return {
            "tokens": [r.token_ids for r in done],
            "rate": sum(len(t) - 1 for t in times) / (last - first),
            "gaps": stream_gaps,
            "first_token_spread_ms": (max(t[0] for t in times) - first) * 1000,
            "prefill_s": [r.prefill_s for r in done],
            "stream_tokens_per_s": [r.decode_tokens_per_s for r in done],
            "route": done[0].route,
            "batch_before": before,
            "batch_after": after,
            "cpu_share": {
                "client": (cpu1 - cpu0) / wall,
                "agents": [(b - a) / wall for a, b in zip(acpu0, acpu1, strict=True)],
            },
        }

    def batch_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per agent: mean rows per forward over the measured rounds, from counter deltas."""
        out: list[dict[str, Any]] = []
        for k in range(len(agents)):
            fwd = rows = 0
            shown = None
            for rd in rounds:
                b, a = rd["batch_before"][k], rd["batch_after"][k]
                if b is None or a is None:
                    fwd = -1
                    break
                fwd += int(a["forwards"]) - int(b["forwards"])
                rows += rows_total(a) - rows_total(b)
                shown = a["mean_rows"]
            if fwd > 0:
                out.append({"mean_rows": rows / fwd, "forwards": fwd, "rows": rows})
            else:  # no counters: what status shows (over the agent's whole life), if anything
                out.append({"mean_rows": shown, "forwards": None, "rows": None, "lifetime": True})
        return out

    async def run() -> dict[str, Any]:
        async with open_standalone([bootstrap]) as view:
            model_id, _ = await wait_for_model(view, head.info.model_id, timeout_s=60)
            with trio.move_on_after(60):
                while (seen := sorted((p.start, p.end) for p in view.spans(model_id))) != want:
                    await trio.sleep(0.1)
            if seen != want:
                raise BenchError(f"the client sees spans {seen}, expected {want}")
            health = PeerHealth()
            rows = []
            for c in levels:
                await one_round(view, health, c)  # warm-up
                rounds = [await one_round(view, health, c) for _ in range(repeats)]
                tokens = rounds[0]["tokens"]
                if any(rd["tokens"] != tokens for rd in rounds):
                    raise BenchError(f"the mesh at C={c} is not deterministic across rounds")
                pooled = [g for rd in rounds for s in rd["gaps"] for g in s]
                per_stream = [[g for rd in rounds for g in rd["gaps"][i]] for i in range(c)]
                rows.append(
                    {
                        "c": c,
                        "decode_tokens_per_s": statistics.median(rd["rate"] for rd in rounds),
                        "runs_tokens_per_s": [rd["rate"] for rd in rounds],
                        "tbt_p50_ms": percentile(pooled, 50),
                        "tbt_p95_ms": percentile(pooled, 95),
                        "stream_tbt_p50_ms": [percentile(s, 50) for s in per_stream],
                        "stream_tbt_p95_ms": [percentile(s, 95) for s in per_stream],
                        "first_token_spread_ms": [rd["first_token_spread_ms"] for rd in rounds],
                        "prefill_s": [rd["prefill_s"] for rd in rounds],
                        "stream_tokens_per_s": [rd["stream_tokens_per_s"] for rd in rounds],
                        "batch": batch_rows(rounds),
                        "cpu_share": [rd["cpu_share"] for rd in rounds],
                        "route": rounds[0]["route"],
                        "token_ids": tokens,
                    }
                )
            return {"rows": rows, "torch_threads": torch.get_num_threads()}

    return trio.run(run)


def worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_concurrency.py --worker")
    p.add_argument("kind", choices=["local", "mesh"])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--levels", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--bootstrap")
    p.add_argument("--spans")
    p.add_argument("--agent-dirs")
    p.add_argument("--agent-pids")
    a = p.parse_args(argv)
    prompts, levels = json.loads(a.prompts), json.loads(a.levels)
    try:
        if a.kind == "local":
            out = local_worker(a.model_dir, prompts, levels, a.tokens, a.repeats)
        else:
            out = mesh_worker(
                a.model_dir, a.bootstrap, json.loads(a.spans), prompts, levels, a.tokens,
                a.repeats, json.loads(a.agent_dirs), json.loads(a.agent_pids),
            )  # fmt: skip
    except Exception as exc:  # reported to the parent: traceback, then one summary line
        leaf = bg._first_leaf(exc)
        if not isinstance(leaf, BenchError):
            traceback.print_exception(exc)
        print(f"bench_concurrency worker: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        return 1
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_worker(argv: list[str], timeout: float) -> Any:
    """bench_generate.run_worker for this script's workers: run to completion (killed on
    timeout or Ctrl-C, and by the kernel if we die) and return its RESULT."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *argv]
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **ONE_THREAD_ENV},
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
def limits_toml(max_c: int) -> str:
    """[limits] that let one client hold max_c sessions (and their streams, KV and request
    rate) on each agent, and one forward carry all of their rows: the defaults keep a
    stranger peer to a quarter of the agent (8 sessions, 8 streams)."""
    return (
        "[limits]\n"
        f"max_sessions = {max(32, 2 * max_c)}\n"
        f"per_peer_sessions = {max(16, 2 * max_c)}\n"
        "per_peer_session_share = 1.0\n"
        "per_peer_kv_share = 1.0\n"
        f"per_peer_streams = {max(8, 2 * max_c + 4)}\n"
        "per_peer_requests_per_s = 100000.0\n"
        f"max_batch_rows = {max(32, max_c)}\n"
    )


@contextlib.contextmanager
def agents_running(
    model_dir: Path, spans: list[tuple[int, int]], root: Path, timeout: float, config: Path
) -> Iterator[list[AgentProcess]]:
    """bench_generate.agents_running with `--config config` on every agent: agent 0 alone,
    the others bootstrapped to it; all stopped by pid on exit."""
    agents: list[AgentProcess] = []
    try:
        for i, span in enumerate(spans):
            boot = agents[0].addr if agents else None
            agent = bg.agent_process(root, f"c{len(spans)}-a{i}", model_dir, span, boot)
            agent.args += ["--config", str(config)]
            agents.append(agent)
            agent.start(timeout)
        bg.wait_coverage(agents[0], timeout)
        yield agents
    finally:
        stop_all(agents)


# --- report -------------------------------------------------------------------------------------
def compare(local: dict[str, Any], mesh: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per C: mesh against local batch-C and against each prompt's batch-1 run."""
    loc = {r["c"]: r for r in local["rows"]}
    refs = local["batch1_token_ids"]
    base = next((r["decode_tokens_per_s"] for r in mesh["rows"] if r["c"] == 1), None)
    rows = []
    for m in mesh["rows"]:
        c, lr = m["c"], loc[m["c"]]
        problems = []
        for i, toks in enumerate(m["token_ids"]):
            at = bg.first_mismatch(lr["token_ids"][i], toks)
            if at is not None:
                problems.append(f"stream {i} vs local batch-{c} at token {at}")
            at = bg.first_mismatch(refs[i], toks)
            if at is not None:
                problems.append(f"stream {i} vs local batch-1 at token {at}")
        batch = m["batch"]
        rows.append(
            {
                **m,
                "local": {k: v for k, v in lr.items() if k != "token_ids"},
                "local_token_ids": lr["token_ids"],
                "x_vs_c1": m["decode_tokens_per_s"] / base if base else None,
                "mesh_over_local": m["decode_tokens_per_s"] / lr["decode_tokens_per_s"],
                "mean_batch_rows": [b["mean_rows"] for b in batch],
                "mean_batch_rows_lifetime": any(b.get("lifetime") for b in batch),
                "tokens_match": not problems,
                "mismatches": problems,
            }
        )
    return rows


def print_table(report: dict[str, Any]) -> None:
    m, cfg = report["machine"], report["config"]
    headers = ("C", "mesh agg tok/s", "x vs C=1", "local batch-C tok/s", "mesh/local",
               "p50 TBT ms", "p95 TBT ms", "mean batch rows", "tokens")  # fmt: skip
    rows: list[tuple[object, ...]] = []
    for r in report["rows"]:
        mean_rows = "/".join("-" if x is None else f"{x:.2f}" for x in r["mean_batch_rows"])
        if r["mean_batch_rows_lifetime"]:
            mean_rows += " (lifetime)"
        rows.append((
            r["c"], f"{r['decode_tokens_per_s']:.2f}",
            "-" if r["x_vs_c1"] is None else f"{r['x_vs_c1']:.2f}",
            f"{r['local']['decode_tokens_per_s']:.2f}", f"{r['mesh_over_local']:.3f}",
            f"{r['tbt_p50_ms']:.1f}", f"{r['tbt_p95_ms']:.1f}", mean_rows,
            "same" if r["tokens_match"] else "DIFFERENT",
        ))  # fmt: skip
    print()
    print(markdown_table(headers, rows))
    print(
        f"\nmodel: Llama-shaped, {cfg['params'] / 1e6:.1f}M parameters (hidden {cfg['hidden']}, "
        f"{cfg['layers']} layers, vocab {cfg['vocab']}), random weights, float32; C prompts of "
        f"{cfg['prompt_tokens']} tokens, {cfg['tokens']} new tokens each, greedy; median of "
        f"{cfg['repeats']} round(s) after one warm-up round per C.\n"
        "mesh: 2 agents (layers split in 2) + one client process running C generate_ids at once."
        "\nagg tok/s = tokens after each stream's first / (last token of any stream - first "
        "token of any stream);\nlocal = generate() batch C, C*(N-1) / (t_step_N - t_step_1). "
        "TBT = gaps between a stream's tokens,\npooled over streams; mean batch rows = "
        "sequences per forward on agent 0 / agent 1 during the measured rounds."
        f"\nmachine: {m['cpu_model']}, {m['logical_cores']} logical cores; torch {m['torch']}, "
        f"transformers {m['transformers']}, libp2p {m['libp2p']}, python {m['python']}; one "
        "torch thread per process."
    )
    if m["logical_cores"] and m["logical_cores"] < PROCESSES:
        print(
            f"\nWARNING: {m['logical_cores']} logical cores for {PROCESSES} busy processes (2 "
            "agents + client overlap while steps are batched): the mesh is short of CPU here.",
            file=sys.stderr,
        )
    load = max(m["load_avg_at_start"][0], report["load_avg_at_end"][0])
    if m["logical_cores"] and load > 0.5 * m["logical_cores"]:
        print(
            f"\nWARNING: 1-min load average reached {load:.1f} on {m['logical_cores']} cores: "
            "other work competed for the CPU, so these numbers are not representative.",
            file=sys.stderr,
        )
    bad = [r for r in report["rows"] if r.get("tokens_match") is False]
    for r in bad:
        print(
            f"\n!!! MISMATCH at C={r['c']}: {'; '.join(r['mismatches'][:6])} — the mesh produced "
            "different greedy tokens than generate(), a bug !!!",
            file=sys.stderr,
        )


# --- main ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated values of C")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation (N)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, help="MLP width (default 2.75 x hidden)")
    p.add_argument("--heads", type=int, help="attention heads (default hidden / 64)")
    p.add_argument("--seed", type=int, default=0, help="weights; prompt i uses seed + i")
    p.add_argument("--repeats", type=int, default=1, help="measured rounds per C after a warm-up")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/shardmesh-bench"))
    p.add_argument("--out", type=Path, help="JSON report (default WORKDIR/bench_concurrency.json)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per worker process, s")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="per agent start, s")
    args = p.parse_args(argv)
    try:
        levels = [int(s) for s in args.concurrency.split(",") if s.strip()]
    except ValueError:
        p.error(f"--concurrency: expected integers like 1,2,4, got {args.concurrency!r}")
    if not levels or min(levels) < 1:
        p.error("--concurrency: every value must be at least 1")
    args.concurrency_levels = sorted(set(levels))
    if args.layers < 2:
        p.error("--layers must be at least 2 (the layers are split between 2 agents)")
    if args.tokens < 2 or args.repeats < 1 or args.prompt_tokens < 1:
        p.error("--tokens must be >= 2, --repeats and --prompt-tokens >= 1")
    if args.vocab < 2:
        p.error("--vocab must be at least 2")
    heads = args.heads or max(1, args.hidden // 64)
    if args.hidden % heads:
        p.error(f"--hidden {args.hidden} is not a multiple of {heads} heads")
    args.workdir = args.workdir.resolve()
    args.out = (args.out or args.workdir / "bench_concurrency.json").resolve()
    return args


def method() -> dict[str, str]:
    return {
        "mesh": "2 agents (`shardmesh up --threads 1`, layers split in 2, [limits] raised so one "
        "peer may hold C sessions) on loopback; ONE standalone client process (torch threads 1) "
        "starts C agent.route.generate.generate_ids calls at once in a trio nursery, stream i on "
        "prompt i; an on_token callback records time.perf_counter() at every token",
        "mesh_aggregate_tokens_per_s": "sum over the C streams of (tokens after that stream's "
        "first token) = C*(N-1), divided by (time of the last token of any stream - time of the "
        "first token of any stream); prefill and the first tokens are outside the count but the "
        "window may include other streams' prefill",
        "tbt_ms": "time between consecutive tokens of one stream (N-1 gaps per stream), pooled "
        "over the C streams and the measured rounds; p50/p95 by linear interpolation between "
        "closest ranks; per-stream values in stream_tbt_p50_ms / stream_tbt_p95_ms",
        "mean_batch_rows": "per agent: (rows_total after - before) / (forwards after - before) "
        "summed over the measured rounds, rows_total = round(mean_rows * forwards) from `status` "
        "batch (exact while forwards <= 100 per agent lifetime, else within forwards/200 rows); "
        "counts every forward of the rounds, prefill chunks included",
        "local": "HF generate(do_sample=False, max_new_tokens=N) on the C prompts as one batch "
        "(equal lengths, attention mask all ones) in a fresh process, torch threads 1",
        "local_aggregate_tokens_per_s": "C*(N-1) / (t_step_N - t_step_1), t_step_i = "
        "time.perf_counter() in a LogitsProcessor, which generate() calls once per new token "
        "right after that step's forward (before the token is chosen)",
        "x_vs_c1": "mesh aggregate tok/s at C / mesh aggregate tok/s at C=1",
        "exactness": "every mesh stream's tokens == local batch-C tokens for its prompt and == a "
        "local batch-1 generate() of that prompt",
        "cpu_share": "process CPU seconds / round wall time, client and each agent",
        "statistic": "per C one warm-up round at that C, then --repeats rounds; median rate",
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = bg.ensure_model(args)
    params = bg.param_count(model_dir)
    print(f"model: {params / 1e6:.1f}M parameters", flush=True)
    prompts = prompts_for(args)
    levels = args.concurrency_levels
    common = ["--model-dir", str(model_dir), "--prompts", json.dumps(prompts)]
    common += ["--levels", json.dumps(levels), "--tokens", str(args.tokens)]
    common += ["--repeats", str(args.repeats)]
    report: dict[str, Any] = {
        "machine": machine_info(PACKAGES),
        "config": {
            "params": params,
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "shape": bg.model_shape(args),
            "model_dir": str(model_dir),
            "prompt_tokens": args.prompt_tokens,
            "tokens": args.tokens,
            "concurrency": levels,
            "repeats": args.repeats,
            "threads_per_process": 1,
            "prompts": prompts,
            "agent_limits": limits_toml(max(levels)),
            "method": method(),
        },
        "rows": [],
    }
    print(f"local: generate() at batch {levels} and batch-1 references ...", flush=True)
    local = run_worker(["local", *common], args.timeout)
    for r in local["rows"]:
        print(f"local batch {r['c']}: {r['decode_tokens_per_s']:.2f} tok/s", flush=True)
    root = args.workdir / "agents-concurrency"  # not bench_generate's: both may run
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = root / "limits.toml"
    config.write_text(limits_toml(max(levels)))
    spans = bg.split_layers(args.layers, 2)
    print(f"mesh: spans {spans}, C in {levels} ...", flush=True)
    with agents_running(model_dir, spans, root, args.ready_timeout, config) as agents:
        worker = ["mesh", *common, "--spans", json.dumps(spans), "--bootstrap", agents[0].addr]
        worker += ["--agent-dirs", json.dumps([str(a.state_dir) for a in agents])]
        worker += ["--agent-pids", json.dumps([a.pid for a in agents])]
        mesh = run_worker(worker, args.timeout)
    report["local_batch1_token_ids"] = local["batch1_token_ids"]
    report["rows"] = compare(local, mesh)
    for r in report["rows"]:
        print(
            f"mesh C={r['c']}: {r['decode_tokens_per_s']:.2f} tok/s, mean batch rows "
            f"{r['mean_batch_rows']}, tokens {'same' if r['tokens_match'] else 'DIFFERENT'}",
            flush=True,
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    args = parse_args(argv)
    # SIGTERM/SIGHUP unwind through the finally blocks like Ctrl-C, so every agent is stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bg._raise_interrupt)
    try:
        report = bench(args)
    except KeyboardInterrupt:
        print("bench_concurrency: interrupted; every process was stopped", file=sys.stderr)
        return 130
    except FAILURES as exc:
        print(f"bench_concurrency: {exc}", file=sys.stderr)
        return 1
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_table(report)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0 if all(r.get("tokens_match") for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
