#!/usr/bin/env python3
"""Mesh benchmark: how fast real agents (separate `shardmesh up` processes on loopback) see a
peer join and leave, how much they gossip, and how much memory each one holds.

For every N in --sizes, a fresh mesh of N agents is started. Topology: agent 0 starts alone;
agent i >= 1 bootstraps to agent 0 and, for i >= 2, also to one random earlier agent in
1..i-1 (seeded by --seed). Peer exchange then dials every peer learned from ads, up to the
agent's connection target (24), so meshes of N <= 24 end up fully connected. Once every agent
lists all the others, it measures:

  (d) gossip bytes/s per agent over --window s: the agent's own gossip_bytes_in/out counters
      (ad payload bytes delivered to / published by the agent), plus wire bytes (everything
      the process sent over TCP: noise, yamux, gossipsub control and duplicates) from `ss`;
      CPU % per agent over the same window;
  (e) RSS per agent (MiB) at the end of that window;
  then --repeats times, with fresh extra agents so the N-agent mesh itself stays intact:
  (a) join: start agent X bootstrapped to one random member; time from X's control socket
      first answering ("online") until X is in every member's table (also from spawn);
  (b) leave on SIGKILL: kill X; time until X is gone from every table. Expected ("TTL-age"):
      the TTL less the age of X's last ad in the tables at the kill, plus up to 0.25 s (the
      expiry loop's period) and one poll sweep;
  (a') join of a second extra agent Y (another join sample);
  (c) leave on SIGTERM: signal Y; time until it is gone from every table (leaving ad).

Tables are polled through each agent's control socket every --poll s (one agent after the
other; the sweep time bounds the resolution and is reported). All agents, the tables'
pollers and this script share the machine's cores: on a 2-core machine a 20-agent mesh is
CPU-bound, and the times include that queueing.

Every process started here is stopped by pid at the end, also on Ctrl-C or an error, and is
told by the kernel (PR_SET_PDEATHSIG) to stop if this script dies first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing.agents import AgentError, AgentProcess, stop_all  # noqa: E402
from agent.testing.report import machine_info, markdown_table, write_json  # noqa: E402

EXPIRE_LOOP_S = 0.25  # agent.daemon.discovery.Discovery.expire_loop's period
MESH_PACKAGES = ("libp2p", "trio")  # the versions a mesh-only run depends on


class BenchError(Exception):
    """The mesh did not reach a state the benchmark waits for; one line for the user."""


# A failed wait here, or an agent that would not start (agent.testing's AgentError).
FAILURES = (BenchError, AgentError)


# --- agent processes --------------------------------------------------------------------------
@dataclass
class GossipConfig:
    announce_interval: float
    ad_ttl: float

    def flags(self) -> list[str]:
        return ["--announce-interval", str(self.announce_interval), "--ad-ttl", str(self.ad_ttl)]


class Fleet:
    """Every agent this run started, so all of them are stopped however the run ends."""

    def __init__(self, root: Path, gossip: GossipConfig) -> None:
        self.root = root
        self.gossip = gossip
        self.all: list[AgentProcess] = []

    def new(self, name: str, bootstrap: Sequence[str]) -> AgentProcess:
        args = self.gossip.flags()
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        agent = AgentProcess(self.root / name, args, cwd=REPO, die_with_parent=True)
        self.all.append(agent)
        return agent

    def stop_all(self) -> None:
        stop_all(self.all, drain=True)
        self.all.clear()


def peer_ids(agent: AgentProcess) -> set[str] | None:
    """The agent's table, or None while it cannot answer."""
    peers = agent.request_or_none("peers")
    return None if peers is None else {p["peer_id"] for p in peers["peers"]}


@contextlib.contextmanager
def fleet(gossip: GossipConfig, keep_logs: Path | None = None) -> Iterator[Fleet]:
    root = Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
    f = Fleet(root, gossip)
    # SIGTERM/SIGHUP to this script: unwind through the finally below like Ctrl-C does.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        yield f
    finally:
        # A second Ctrl-C must not cut the cleanup short and orphan agents.
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            f.stop_all()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in root.glob("*.log"):
                shutil.copy(log, keep_logs / log.name)
        shutil.rmtree(root, ignore_errors=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def start_mesh(
    f: Fleet,
    n: int,
    rng: random.Random,
    ready_timeout: float,
    prepare: Callable[[int, AgentProcess], None] | None = None,
) -> list[AgentProcess]:
    """Agent 0 alone; agent i bootstraps to agent 0 and one random agent in 1..i-1.
    `prepare(i, agent)` may adjust an agent (interpreter options, env) before it starts."""
    agents: list[AgentProcess] = []
    for i in range(n):
        boot = [] if i == 0 else [agents[0].addr]
        if i >= 2:
            boot.append(agents[rng.randrange(1, i)].addr)
        a = f.new(f"n{n}-a{i}", boot)
        if prepare is not None:
            prepare(i, a)
        a.launch()
        a.wait_ready(ready_timeout, interval=0.02)
        agents.append(a)
    return agents


# --- watching tables ----------------------------------------------------------------------------
def watch(
    agents: Sequence[AgentProcess],
    done: Callable[[set[str]], bool],
    timeout: float,
    poll: float,
    what: str,
) -> tuple[dict[str, float], list[float]]:
    """Poll every agent's table until `done(peer_ids)` holds for each; returns when each agent
    first satisfied it (monotonic) and the sweep durations. An agent is not asked again once
    done, so the pollers' load shrinks as the event spreads."""
    first: dict[str, float] = {}
    sweeps: list[float] = []
    deadline = time.monotonic() + timeout
    while len(first) < len(agents):
        if time.monotonic() > deadline:
            late = [a.name for a in agents if a.name not in first]
            raise BenchError(f"timed out after {timeout:g} s waiting for {what} at {late}")
        t0 = time.monotonic()
        for a in agents:
            if a.name in first:
                continue
            ids = peer_ids(a)
            if ids is not None and done(ids):
                first[a.name] = time.monotonic()
        sweeps.append(time.monotonic() - t0)
        time.sleep(max(0.0, poll - (time.monotonic() - t0)))
    return first, sweeps


def incomplete_tables(agents: Sequence[AgentProcess]) -> dict[str, int]:
    """Agents whose table lacks some other agent -> how many it lacks (N-1: no answer)."""
    everyone = {a.peer_id for a in agents}
    out = {}
    for a in agents:
        others = everyone - {a.peer_id}
        ids = peer_ids(a)
        missing = len(others) if ids is None else len(others - ids)
        if missing:
            out[a.name] = missing
    return out


def wait_full_mesh(agents: Sequence[AgentProcess], timeout: float, poll: float) -> float:
    """Wait for one sweep in which every table lists every other agent."""
    t0 = time.monotonic()
    while True:
        bad = incomplete_tables(agents)
        if not bad:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"no full mesh within {timeout:g} s; tables missing peers: {bad}")
        time.sleep(poll)


def join(
    f: Fleet,
    members: Sequence[AgentProcess],
    name: str,
    rng: random.Random,
    args: argparse.Namespace,
) -> tuple[AgentProcess, dict[str, Any]]:
    via = rng.choice(list(members))
    x = f.new(name, [via.addr])
    x.launch()
    x.wait_ready(args.ready_timeout, interval=0.02)  # fine-grained: joins time from it
    first, sweeps = watch(
        members, lambda ids: x.peer_id in ids, args.event_timeout, args.poll, "a join"
    )
    last = max(first.values())
    return x, {
        "bootstrap_via": via.name,
        "from_online_s": round(last - x.ready_at, 3),
        "from_spawn_s": round(last - x.started_at, 3),
        "per_agent_from_online_s": sorted(round(t - x.ready_at, 3) for t in first.values()),
        "sweep_s": round(statistics.median(sweeps), 4),
    }


def leave(
    members: Sequence[AgentProcess], x: AgentProcess, sig: int, args: argparse.Namespace
) -> dict[str, Any]:
    predicted: list[float] = []
    if sig == signal.SIGKILL:
        # When each table's entry for x should expire: the ad's age now tells us.
        for a in members:
            t = time.monotonic()
            peers = a.request_or_none("peers")
            for p in peers["peers"] if peers else []:
                if p["peer_id"] == x.peer_id:
                    predicted.append(t - p["age_s"] + args.ad_ttl)
    t_sig = time.monotonic()
    x.signal(sig)
    first, sweeps = watch(
        members, lambda ids: x.peer_id not in ids, args.event_timeout, args.poll, "a leave"
    )
    try:
        code = x.wait(timeout=15)
    except subprocess.TimeoutExpired:
        code = None
    out: dict[str, Any] = {
        "signal": signal.Signals(sig).name,
        "gone_s": round(max(first.values()) - t_sig, 3),
        "per_agent_s": sorted(round(t - t_sig, 3) for t in first.values()),
        "exit_code": code,
        "sweep_s": round(statistics.median(sweeps), 4),
    }
    if predicted:
        # The last table's entry expires then; its expiry loop notices within EXPIRE_LOOP_S.
        out["expected_s"] = round(max(predicted) - t_sig, 3)
    return out


# --- gossip and memory ------------------------------------------------------------------------
_SS_PID = re.compile(r"pid=(\d+),")
_SS_SENT = re.compile(r"\bbytes_sent:(\d+)")


def wire_bytes_sent(pids: set[int]) -> dict[int, int] | None:
    """TCP bytes each process has sent on its open connections (from `ss -ti`), or None."""
    if shutil.which("ss") is None:
        return None
    try:
        out = subprocess.run(
            ["ss", "-tinpH", "state", "established"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sent = dict.fromkeys(pids, 0)
    owner: int | None = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's first line names its process
            m = _SS_PID.search(line)
            owner = int(m.group(1)) if m else None
            continue
        m = _SS_SENT.search(line)
        if owner in sent and m:
            sent[owner] += int(m.group(1))
    return sent


def gossip_window(agents: Sequence[AgentProcess], window: float) -> dict[str, Any]:
    """Counters over `window` s; meanwhile each table is checked once a second."""

    def counters() -> tuple[float, dict[str, dict[str, Any]], dict[str, float]]:
        t = time.monotonic()
        status = {}
        for a in agents:
            s = a.request_or_none("status")
            if s is None:
                raise BenchError(f"{a.name} stopped answering")
            status[a.name] = s
        return t, status, {a.name: a.cpu_seconds() for a in agents}

    pids = {a.pid for a in agents}
    w0 = wire_bytes_sent(pids)
    t0, s0, c0 = counters()
    checks = complete = 0
    while time.monotonic() < t0 + window:
        tick = time.monotonic()
        checks += len(agents)
        complete += len(agents) - len(incomplete_tables(agents))
        time.sleep(max(0.0, min(1.0 - (time.monotonic() - tick), t0 + window - time.monotonic())))
    t1, s1, c1 = counters()
    w1 = wire_bytes_sent(pids)
    dt = t1 - t0
    app_in = [(s1[a.name]["gossip_bytes_in"] - s0[a.name]["gossip_bytes_in"]) / dt for a in agents]
    app_out = [
        (s1[a.name]["gossip_bytes_out"] - s0[a.name]["gossip_bytes_out"]) / dt for a in agents
    ]
    cpu = [100 * (c1[a.name] - c0[a.name]) / dt for a in agents]
    rss = [a.rss_mib() for a in agents]
    out: dict[str, Any] = {
        "window_s": round(dt, 2),
        "app_in_Bps_mean": round(statistics.fmean(app_in), 1),
        "app_out_Bps_mean": round(statistics.fmean(app_out), 1),
        "cpu_pct_mean": round(statistics.fmean(cpu), 1),
        "cpu_pct_total": round(sum(cpu), 1),
        "rss_mib_median": round(statistics.median(rss), 1),
        "rss_mib_max": round(max(rss), 1),
        "rss_mib": [round(r, 1) for r in rss],
        "connected_peers": [s1[a.name]["connected_peers"] for a in agents],
        "tables_complete_fraction": round(complete / checks, 3) if checks else None,
        "rejected_ads": sum(sum(s1[a.name]["rejected_ads"].values()) for a in agents),
    }
    if w0 is not None and w1 is not None:
        wire = [(w1[a.pid] - w0[a.pid]) / dt for a in agents]
        out["wire_out_Bps_mean"] = round(statistics.fmean(wire), 1)
    return out


# --- one mesh size ------------------------------------------------------------------------------
def count_expiries(agents: Sequence[AgentProcess]) -> int:
    """'peer expired' lines in the agents' logs (agent.daemon.node logs one per TTL expiry)."""
    total = 0
    for a in agents:
        with contextlib.suppress(OSError):
            total += a.log_path.read_text(errors="replace").count("peer expired:")
    return total


def bench_size(n: int, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """One mesh size. A BenchError mid-way is recorded in the result with what was measured
    before it, so an overloaded size does not lose the others."""
    gossip = GossipConfig(args.announce_interval, args.ad_ttl)
    logs = Path(args.keep_logs) / f"n{n}" if args.keep_logs else None
    result: dict[str, Any] = {"n": n, "load_avg_before": _load(), "joins": [], "kills": []}
    result["terms"] = []
    with fleet(gossip, logs) as f:
        members: list[AgentProcess] = []
        try:
            t0 = time.monotonic()
            members = start_mesh(f, n, rng, args.ready_timeout)
            result["start_s"] = round(time.monotonic() - t0, 2)
            result["full_mesh_after_start_s"] = round(
                wait_full_mesh(members, args.mesh_timeout, args.poll), 2
            )
            print(
                f"  N={n}: started in {result['start_s']:.1f} s, full mesh "
                f"{result['full_mesh_after_start_s']:.1f} s later",
                flush=True,
            )
            time.sleep(args.settle)
            result["gossip"] = gossip_window(members, args.window)
            run_events(f, members, result, rng, args)
            dead = [a.name for a in members if not a.alive()]
            if dead:
                raise BenchError(f"members died during the run: {dead}")
        except FAILURES as exc:
            result["error"] = str(exc)
            print(f"  N={n}: FAILED: {exc}", flush=True)
        result["member_exit_codes"] = stop_members(members)
        # Expiries beyond the killed agents' (one per member per kill) are tables flapping.
        expected = len(members) * len(result["kills"])
        result["unexpected_expiries"] = count_expiries(members) - expected
        result["load_avg_after"] = _load()
    return summarize(result)


def stop_members(members: Sequence[AgentProcess]) -> dict[str, int]:
    """SIGTERM every member at once (as a host shutdown would); exit code -> how many."""
    codes: dict[str, int] = {}
    for code in stop_all(members, timeout=15, drain=True):
        codes[str(code)] = codes.get(str(code), 0) + 1
    return codes


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_events(
    f: Fleet,
    members: Sequence[AgentProcess],
    result: dict[str, Any],
    rng: random.Random,
    args: argparse.Namespace,
) -> None:
    """Join X, SIGKILL X, join Y, SIGTERM Y; --repeats times, appending to `result`."""
    n = len(members)
    for r in range(args.repeats):
        x, j = join(f, members, f"n{n}-x{r}", rng, args)
        result["joins"].append(j)
        time.sleep(args.announce_interval)  # let x's ads settle in every table
        result["kills"].append(leave(members, x, signal.SIGKILL, args))
        y, j = join(f, members, f"n{n}-y{r}", rng, args)
        result["joins"].append(j)
        time.sleep(args.announce_interval)
        result["terms"].append(leave(members, y, signal.SIGTERM, args))
        print(
            f"  N={n} repeat {r + 1}: join {result['joins'][-2]['from_online_s']:.2f}/"
            f"{j['from_online_s']:.2f} s, kill {result['kills'][-1]['gone_s']:.2f} s, "
            f"term {result['terms'][-1]['gone_s']:.2f} s",
            flush=True,
        )


def _med_max(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    kills, terms = result["kills"], result["terms"]
    sweeps = [x["sweep_s"] for x in result["joins"] + kills]
    result["summary"] = {
        "join_s": _med_max([j["from_online_s"] for j in result["joins"]]),
        "join_from_spawn_s": _med_max([j["from_spawn_s"] for j in result["joins"]]),
        "kill_gone_s": _med_max([k["gone_s"] for k in kills]),
        "kill_expected_s": _med_max([k["expected_s"] for k in kills if "expected_s" in k]),
        "term_gone_s": _med_max([t["gone_s"] for t in terms]),
        "expire_loop_s": EXPIRE_LOOP_S,
        "term_exit_codes": sorted({t["exit_code"] for t in terms}, key=str),
        "poll_sweep_s": round(statistics.median(sweeps), 4) if sweeps else None,
    }
    return result


# --- report -----------------------------------------------------------------------------------
def mesh_machine_info() -> dict[str, Any]:
    return {
        **machine_info(MESH_PACKAGES),
        "note": "all agents, the pollers and this script share these cores",
    }


def _mm(x: dict[str, float] | None) -> str:
    return "-" if x is None else f"{x['median']:.2f}/{x['max']:.2f}"


TABLE_HEADERS = (
    "N",
    "join s",
    "kill-gone s",
    "(TTL-age)",
    "term-gone s",
    "gossip B/s in/out",
    "wire B/s out",
    "CPU%/agent",
    "RSS MiB",
    "tables ok",
    "flaps",
    "load",
)


def print_table(results: Sequence[dict[str, Any]], info: dict[str, Any]) -> None:
    rows, notes = [], []
    for r in results:
        s, g = r["summary"], r.get("gossip", {})
        expected = s["kill_expected_s"]
        rows.append(
            (
                r["n"],
                _mm(s["join_s"]),
                _mm(s["kill_gone_s"]),
                "-" if expected is None else f"{expected['median']:.2f}",
                _mm(s["term_gone_s"]),
                f"{g['app_in_Bps_mean']:.0f}/{g['app_out_Bps_mean']:.0f}" if g else "-",
                f"{g['wire_out_Bps_mean']:.0f}" if "wire_out_Bps_mean" in g else "-",
                f"{g['cpu_pct_mean']:.1f}" if g else "-",
                f"{g['rss_mib_median']:.0f}/{g['rss_mib_max']:.0f}" if g else "-",
                f"{100 * g['tables_complete_fraction']:.0f}%" if g else "-",
                r["unexpected_expiries"],
                f"{r['load_avg_after'][0]:.1f}",
            )
        )
        if "error" in r:
            notes.append(f"N={r['n']} failed: {r['error']}")
        if set(r.get("member_exit_codes", {})) - {"0"}:
            notes.append(f"N={r['n']} members' exit codes on SIGTERM: {r['member_exit_codes']}")
    print()
    print(markdown_table(TABLE_HEADERS, rows))
    for note in notes:
        print(note)
    print(
        "\njoin/kill-gone/term-gone: median/max s over the repeats; (TTL-age): expected kill-gone;"
        "\nCPU% per agent, RSS median/max, 'tables ok' over the gossip window; flaps: TTL expiries"
        "\nof live peers in the members' logs over the whole run; load: 1-min load after the size."
        f"\n{info['cpu_model']}, {info['logical_cores']} logical cores shared by every agent; "
        f"python {info['python']}, libp2p {info['libp2p']}, trio {info['trio']}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5,10,20", help="comma-separated mesh sizes")
    p.add_argument("--announce-interval", type=float, default=1.0, metavar="S")
    p.add_argument("--ad-ttl", type=float, default=4.0, metavar="S")
    p.add_argument("--repeats", type=int, default=3, help="join/kill/term samples per size")
    p.add_argument("--window", type=float, default=10.0, help="gossip measurement window, s")
    p.add_argument("--settle", type=float, default=3.0, help="wait after the full mesh, s")
    p.add_argument("--poll", type=float, default=0.05, help="table poll period, s")
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--mesh-timeout", type=float, default=120.0)
    p.add_argument("--event-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench_mesh.json")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the agents' logs here")
    args = p.parse_args(argv)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: expected integers like 5,10,20, got {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 2:
        p.error("--sizes: every size must be at least 2")
    if args.ad_ttl < args.announce_interval:
        p.error("--ad-ttl must be at least --announce-interval")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = mesh_machine_info()
    rng = random.Random(args.seed)
    results = []
    try:
        for n in args.size_list:
            print(f"mesh of {n} agents ...", flush=True)
            results.append(bench_size(n, args, rng))
    except KeyboardInterrupt:
        print("bench_mesh: interrupted; every agent was stopped", file=sys.stderr)
        return 130
    print_table(results, info)
    report = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "topology": "agent 0 alone; agent i bootstraps to agent 0 and one random agent in "
        "1..i-1; joiners bootstrap to one random member; peer exchange dials the rest",
        "results": results,
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")
    failed = [r["n"] for r in results if "error" in r]
    if failed:
        print(
            f"bench_mesh: sizes {failed} did not complete (see 'error' in the JSON)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
