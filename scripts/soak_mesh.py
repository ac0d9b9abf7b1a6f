#!/usr/bin/env python3
"""Long-run memory soak: N real agents gossip capacity ads to each other for --duration s at a
fast announce interval (default 0.5 s, ten times the default 5 s, so one hour of soak is about
ten hours of normal traffic). Every --sample-interval s it records each agent's RSS, CPU time,
open file descriptors, gossip counters and whether its peer table lists every other agent,
one JSON line per sample, flushed at once (a killed run keeps what it measured).

At the end it prints and writes a summary: RSS at the start (the first sample after --warmup),
at the end, growth per hour (least-squares slope over the samples after warm-up), the slopes
of the first and second halves (plateaued when the second half grows at most half as fast as
the first, or under 1 MiB/h), and whether every agent stayed up with a complete table at
every sample.

Topology and process handling as in bench_mesh.py (whose helpers this uses): agent 0 alone,
agent i bootstraps to agent 0 and one random earlier agent; every agent is stopped by pid at
the end, on Ctrl-C/SIGTERM/SIGHUP, and by the kernel if this script dies.

--tracemalloc gives agent 0 a sitecustomize hook (written to the results folder) that starts
tracemalloc on SIGUSR1 and dumps a snapshot on each later SIGUSR1: tracing starts after warm-up,
snapshots are taken one sample later and at the end, and the summary lists which lines'
allocations grew in between (agent 0's RSS then carries the tracer and leaves the medians).

Run in the background so it survives the shell:
  setsid nohup .venv/bin/python scripts/soak_mesh.py > bench-results/soak_mesh.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from bench_mesh import (
    FAILURES,
    REPO,
    BenchError,
    GossipConfig,
    fleet,
    mesh_machine_info,
    peer_ids,
    start_mesh,
    wait_full_mesh,
)

# (importing bench_mesh put the repository on sys.path)
from agent.testing.agents import MIB, AgentProcess
from agent.testing.report import write_json

PLATEAU_RATIO = 0.5
PLATEAU_FLOOR_MIB_H = 1.0

# --tracemalloc: agent 0 starts with this sitecustomize on PYTHONPATH, so the real agent
# process (no agent code changed) answers SIGUSR1: the first starts tracing (tracing from
# the start would make the imports alone take over a minute), each later one dumps a snapshot.
# Every answer is a file in the trace dir, written whole (rename) so the soak never reads half.
TRACE_HOOK = """\
import os, signal, tracemalloc

_dir = os.environ.get("SHARDMESH_SOAK_TRACE_DIR")
_count = [0]


def _on_usr1(signum, frame):
    if tracemalloc.is_tracing():
        _count[0] += 1
        name = f"snap-{_count[0]}.tracemalloc"
        tracemalloc.take_snapshot().dump(os.path.join(_dir, name + ".tmp"))
    else:
        tracemalloc.start(int(os.environ["SHARDMESH_SOAK_TRACE_DEPTH"]))
        name = "started"
        open(os.path.join(_dir, name + ".tmp"), "w").close()
    os.replace(os.path.join(_dir, name + ".tmp"), os.path.join(_dir, name))


if _dir:
    signal.signal(signal.SIGUSR1, _on_usr1)
"""


def sample(agents: Sequence[AgentProcess], t: float) -> dict[str, Any]:
    everyone = {a.peer_id for a in agents}
    rows = []
    for a in agents:
        row: dict[str, Any] = {"name": a.name, "pid": a.pid, "alive": a.alive()}
        if row["alive"]:
            try:
                row["rss_mib"] = round(a.rss_mib(), 2)
                row["cpu_s"] = round(a.cpu_seconds(), 2)
                row["fds"] = a.ps.num_fds()
            except Exception as exc:  # the process vanished between the checks
                row["alive"] = False
                row["error"] = str(exc)
        status = a.request_or_none("status") if row["alive"] else None
        ids = peer_ids(a) if row["alive"] else None
        row["answered"] = status is not None and ids is not None
        if status is not None:
            for key in ("gossip_bytes_in", "gossip_bytes_out", "known_peers", "connected_peers"):
                row[key] = status[key]
            row["rejected_ads"] = sum(status["rejected_ads"].values())
        if ids is not None:
            missing = everyone - {a.peer_id} - ids
            row["table_complete"] = not missing
            if missing:
                row["missing"] = sorted(missing)
        rows.append(row)
    return {"kind": "sample", "t_s": round(t, 1), "wall": time.time(), "agents": rows}


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t_s, value), scaled to per hour."""
    if len(points) < 2:
        return None
    ts = [p[0] for p in points]
    if max(ts) == min(ts):
        return None
    return statistics.linear_regression(ts, [p[1] for p in points]).slope * 3600


def summarize(
    samples: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    exit_codes: dict[str, Any],
    traced: str | None = None,
) -> dict[str, Any]:
    """`traced`: the agent under tracemalloc (its RSS carries the tracer), left out of medians."""
    after = [s for s in samples if s["t_s"] >= args.warmup]
    per_agent = []
    names = [r["name"] for r in samples[0]["agents"]] if samples else []
    for name in names:
        pts = [
            (s["t_s"], r["rss_mib"])
            for s in after
            for r in s["agents"]
            if r["name"] == name and "rss_mib" in r
        ]
        if not pts:
            per_agent.append({"name": name, "error": "no samples after warm-up"})
            continue
        mid = pts[0][0] + (pts[-1][0] - pts[0][0]) / 2
        first = [p for p in pts if p[0] <= mid]
        second = [p for p in pts if p[0] >= mid]
        s1, s2 = slope_per_hour(first), slope_per_hour(second)
        last = next(r for r in samples[-1]["agents"] if r["name"] == name)
        cpu = [(s["t_s"], r["cpu_s"]) for s in after for r in s["agents"] if r["name"] == name]
        span = cpu[-1][0] - cpu[0][0] if len(cpu) > 1 else 0.0
        per_agent.append(
            {
                "name": name,
                "traced": name == traced,
                "cpu_pct": round(100 * (cpu[-1][1] - cpu[0][1]) / span, 1) if span else None,
                "rss_start_mib": pts[0][1],
                "rss_end_mib": pts[-1][1],
                "rss_max_mib": max(p[1] for p in pts),
                "growth_mib_per_h": _r(slope_per_hour(pts)),
                "first_half_mib_per_h": _r(s1),
                "second_half_mib_per_h": _r(s2),
                "plateaued": _plateaued(s1, s2),
                "fds_end": last.get("fds"),
                "gossip_bytes_in": last.get("gossip_bytes_in"),
                "gossip_bytes_out": last.get("gossip_bytes_out"),
            }
        )
    rows = [r for s in samples for r in s["agents"]]
    incomplete = [
        {"t_s": s["t_s"], "name": r["name"], "missing": r.get("missing")}
        for s in samples
        for r in s["agents"]
        if not r.get("table_complete")
    ]
    good = [a for a in per_agent if "growth_mib_per_h" in a and not a["traced"]]

    def med(key: str) -> float | None:
        vals = [a[key] for a in good if a.get(key) is not None]
        return round(statistics.median(vals), 2) if vals else None

    elapsed = samples[-1]["t_s"] if samples else 0.0
    return {
        "kind": "summary",
        "agents": args.agents,
        "announce_interval_s": args.announce_interval,
        "ad_ttl_s": args.ad_ttl,
        "duration_s": elapsed,
        "warmup_s": args.warmup,
        "samples": len(samples),
        # Each agent publishes duration/interval ads; every other agent receives each once.
        "ads_received_per_agent_est": int(elapsed / args.announce_interval * (args.agents - 1)),
        "rss_start_mib_median": med("rss_start_mib"),
        "rss_end_mib_median": med("rss_end_mib"),
        "growth_mib_per_h_median": med("growth_mib_per_h"),
        "first_half_mib_per_h_median": med("first_half_mib_per_h"),
        "second_half_mib_per_h_median": med("second_half_mib_per_h"),
        "all_plateaued": bool(good) and all(a["plateaued"] for a in good),
        "all_alive_every_sample": all(r["alive"] and r["answered"] for r in rows),
        "tables_complete_every_sample": not incomplete,
        "incomplete_tables": incomplete[:20],
        "exit_codes": exit_codes,
        "per_agent": per_agent,
        "plateau_rule": f"second-half slope <= {PLATEAU_RATIO} x first-half slope, "
        f"or <= {PLATEAU_FLOOR_MIB_H} MiB/h",
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _plateaued(first: float | None, second: float | None) -> bool | None:
    if first is None or second is None:
        return None
    return second <= PLATEAU_FLOOR_MIB_H or second <= PLATEAU_RATIO * first


def write_line(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


class Tracer:
    """Agent 0's Python allocations (tracemalloc): start tracing, then snapshots on request."""

    def __init__(self, out_dir: Path, depth: int) -> None:
        self.dir = out_dir
        self.depth = depth
        self.hook_dir = out_dir / "hook"
        self.started_at: float | None = None
        self.snaps: list[tuple[float, Path]] = []

    def prepare(self, i: int, agent: AgentProcess) -> None:
        if i != 0:
            return
        self.hook_dir.mkdir(parents=True, exist_ok=True)
        for old in [*self.dir.glob("snap-*"), *self.dir.glob("started*")]:
            old.unlink()
        (self.hook_dir / "sitecustomize.py").write_text(TRACE_HOOK)
        path = os.pathsep.join(p for p in (str(self.hook_dir), os.environ.get("PYTHONPATH")) if p)
        agent.env = {
            "PYTHONPATH": path,
            "SHARDMESH_SOAK_TRACE_DIR": str(self.dir),
            "SHARDMESH_SOAK_TRACE_DEPTH": str(self.depth),
        }

    def step(self, agent: AgentProcess, t: float) -> None:
        """Start tracing on the first call, take a snapshot on every later one."""
        if self.started_at is None:
            self._ask(agent, self.dir / "started")
            self.started_at = t
            print(f"t={t:7.0f} s  tracemalloc started in {agent.name}", flush=True)
            return
        path = self.dir / f"snap-{len(self.snaps) + 1}.tracemalloc"
        self._ask(agent, path)
        self.snaps.append((t, path))
        print(f"t={t:7.0f} s  tracemalloc snapshot {path}", flush=True)

    def _ask(self, agent: AgentProcess, path: Path, timeout: float = 120.0) -> None:
        agent.signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"the traced agent wrote no {path} in {timeout:g} s")
            time.sleep(0.2)

    def compare(self, top: int = 15) -> dict[str, Any]:
        """What grew between the first and the last snapshot, by line and by traceback."""
        import tracemalloc

        (t0, p0), (t1, p1) = self.snaps[0], self.snaps[-1]
        skip = (
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap*"),
        )
        a = tracemalloc.Snapshot.load(str(p0)).filter_traces(skip)
        b = tracemalloc.Snapshot.load(str(p1)).filter_traces(skip)

        def total(snap: tracemalloc.Snapshot) -> float:
            return sum(st.size for st in snap.statistics("filename")) / MIB

        by_line = [
            {
                "where": str(d.traceback[0]),
                "size_diff_kib": round(d.size_diff / 1024, 1),
                "count_diff": d.count_diff,
                "size_kib": round(d.size / 1024, 1),
            }
            for d in b.compare_to(a, "lineno")[:top]
        ]
        by_trace = [
            {
                "size_diff_kib": round(d.size_diff / 1024, 1),
                "count_diff": d.count_diff,
                "traceback": [str(fr) for fr in d.traceback][-12:],
            }
            for d in b.compare_to(a, "traceback")[:5]
        ]
        return {
            "from_t_s": round(t0, 1),
            "to_t_s": round(t1, 1),
            "traced_mib": [round(total(a), 2), round(total(b), 2)],
            "top_by_line": by_line,
            "top_by_traceback": by_trace,
        }


def run(args: argparse.Namespace, out: IO[str]) -> dict[str, Any]:
    rng = random.Random(args.seed)
    samples: list[dict[str, Any]] = []
    tracer = Tracer(args.out.parent / "tracemalloc", args.trace_depth) if args.tracemalloc else None
    with fleet(GossipConfig(args.announce_interval, args.ad_ttl)) as f:
        prepare = tracer.prepare if tracer else None
        agents = start_mesh(f, args.agents, rng, ready_timeout=60.0, prepare=prepare)
        wait_full_mesh(agents, timeout=120.0, poll=0.1)
        print(f"{args.agents} agents in a full mesh; soaking for {args.duration:g} s", flush=True)
        t0 = time.monotonic()
        k = 0
        while True:
            t = time.monotonic() - t0
            s = sample(agents, t)
            samples.append(s)
            write_line(out, s)
            # Tracing starts after warm-up; snapshots one sample later and at the end.
            if tracer and t >= args.warmup and (len(tracer.snaps) < 1 or t >= args.duration):
                tracer.step(agents[0], t)
            rss = [r.get("rss_mib", 0.0) for r in s["agents"]]
            bad = [r["name"] for r in s["agents"] if not r.get("table_complete")]
            print(
                f"t={t:7.0f} s  RSS MiB median {statistics.median(rss):6.1f} max {max(rss):6.1f}"
                + (f"  INCOMPLETE/DOWN: {bad}" if bad else ""),
                flush=True,
            )
            if t >= args.duration:
                break
            k += 1
            next_t = min(k * args.sample_interval, args.duration)
            time.sleep(max(0.0, t0 + next_t - time.monotonic()))
        exit_codes = {a.name: a.stop() for a in agents}
    summary = summarize(samples, args, exit_codes, traced=agents[0].name if tracer else None)
    if tracer and len(tracer.snaps) >= 2:
        summary["tracemalloc"] = tracer.compare()
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(
        f"\nsoak: {s['agents']} agents, announce every {s['announce_interval_s']} s, "
        f"{s['duration_s']:.0f} s, {s['samples']} samples "
        f"(~{s['ads_received_per_agent_est']} ads received per agent)"
    )
    print(
        f"{'agent':>10} {'RSS@start':>10} {'RSS@end':>8} {'MiB/h':>7} {'1st half':>9} "
        f"{'2nd half':>9} {'plateau':>8} {'fds':>4} {'CPU%':>5}"
    )
    for a in s["per_agent"]:
        if "error" in a:
            print(f"{a['name']:>10} {a['error']}")
            continue
        name = a["name"] + ("*" if a["traced"] else "")
        print(
            f"{name:>10} {a['rss_start_mib']:10.1f} {a['rss_end_mib']:8.1f} "
            f"{a['growth_mib_per_h']:7.2f} {a['first_half_mib_per_h']:9.2f} "
            f"{a['second_half_mib_per_h']:9.2f} {a['plateaued']!s:>8} {a['fds_end']!s:>4} "
            f"{a['cpu_pct']!s:>5}"
        )
    if any(a.get("traced") for a in s["per_agent"]):
        print("(* under tracemalloc: its RSS includes the tracer and is left out of the medians)")
    print(
        f"median: RSS {s['rss_start_mib_median']} -> {s['rss_end_mib_median']} MiB, "
        f"growth {s['growth_mib_per_h_median']} MiB/h (first half "
        f"{s['first_half_mib_per_h_median']}, second half {s['second_half_mib_per_h_median']}); "
        f"plateaued: {s['all_plateaued']}"
    )
    print(
        f"all agents up at every sample: {s['all_alive_every_sample']}; tables complete at "
        f"every sample: {s['tables_complete_every_sample']}; exit codes: "
        f"{sorted(set(s['exit_codes'].values()), key=str)}"
    )
    tm = s.get("tracemalloc")
    if tm:
        print(
            f"\ntracemalloc, t={tm['from_t_s']:.0f}..{tm['to_t_s']:.0f} s: traced Python heap "
            f"{tm['traced_mib'][0]} -> {tm['traced_mib'][1]} MiB; largest growth by line:"
        )
        for d in tm["top_by_line"][:10]:
            print(f"  {d['size_diff_kib']:+9.1f} KiB {d['count_diff']:+7d} blocks  {d['where']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--duration", type=float, default=3600.0, metavar="S")
    p.add_argument("--announce-interval", type=float, default=0.5, metavar="S")
    p.add_argument("--ad-ttl", type=float, default=3.0, metavar="S")
    p.add_argument("--sample-interval", type=float, default=30.0, metavar="S")
    p.add_argument("--warmup", type=float, default=60.0, metavar="S")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace agent 0's allocations after warm-up; compare snapshots (see above)",
    )
    p.add_argument(
        "--trace-depth",
        type=int,
        default=4,
        help="frames kept per allocation; deeper tracing costs the agent more CPU",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "soak_mesh.jsonl")
    p.add_argument(
        "--summary", type=Path, default=REPO / "bench-results" / "soak_mesh_summary.json"
    )
    args = p.parse_args(argv)
    if args.agents < 2:
        p.error("--agents must be at least 2")
    if args.ad_ttl < args.announce_interval:
        p.error("--ad-ttl must be at least --announce-interval")
    if args.duration < args.warmup + 2 * args.sample_interval:
        p.error("--duration must leave at least two samples after --warmup")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as out:
        cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_line(out, {"kind": "config", "machine": mesh_machine_info(), "config": cfg})
        try:
            summary = run(args, out)
        except FAILURES as exc:
            print(f"soak_mesh: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("soak_mesh: interrupted; every agent was stopped", file=sys.stderr)
            return 130
        write_line(out, summary)
    write_json(args.summary, summary)
    print_summary(summary)
    print(f"wrote {args.out} and {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
