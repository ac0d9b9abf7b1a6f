"""Human tables for `status` and `peers` (rich), from the control API's JSON results."""

from __future__ import annotations

import io
import shutil
from typing import Any

from rich.console import Console
from rich.table import Table

GIB = 1024**3


def _console(buf: io.StringIO) -> Console:
    width = max(100, shutil.get_terminal_size((140, 40)).columns)
    return Console(file=buf, width=width, highlight=False, soft_wrap=False)


def short_id(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:6]}…{peer_id[-6:]}"


def _span(span: Any) -> str:
    return f"{span[0]}:{span[1]}" if span else "-"


def _gpus(devices: list[dict[str, Any]]) -> str:
    gpus = [d for d in devices if d.get("kind") == "gpu"]
    if not gpus:
        cpu = next((d for d in devices if d.get("kind") == "cpu"), None)
        return f"cpu, {cpu['memory_free'] / GIB:.1f} GiB free" if cpu else "-"
    free = sum(d.get("memory_free") or 0 for d in gpus)
    return f"{len(gpus)} GPU, {free / GIB:.1f} GiB free"


def _addr(addrs: list[str]) -> str:
    if not addrs:
        return "-"
    return addrs[0].split("/p2p/")[0]


def status_table(s: dict[str, Any]) -> str:
    buf = io.StringIO()
    con = _console(buf)
    t = Table(title="this node", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("peer id", s["peer_id"])
    t.add_row("state", f"{s['state']} ({s.get('reason', '')})")
    t.add_row("addrs", "\n".join(s["addrs"]))
    t.add_row("model", s.get("model_name") or s.get("model") or "-")
    t.add_row("span", _span(s.get("span")))
    t.add_row("sessions", str(s.get("sessions", 0)))
    batch = s.get("batch")
    if batch:
        t.add_row(
            "batching",
            f"last forward {batch['last_rows']} rows, {batch['waiting']} steps waiting; "
            f"{batch['mean_rows']} rows a forward over {batch['forwards']} forwards",
        )
    t.add_row("devices", _gpus(s.get("devices", [])))
    t.add_row("protocols", "\n".join(s.get("protocols", [])))
    t.add_row("peers", f"{s.get('known_peers', 0)} known, {s.get('connected_peers', 0)} connected")
    t.add_row("uptime", f"{s.get('uptime_s', 0):.0f} s")
    rejected = s.get("rejected_ads") or {}
    t.add_row("rejected ads", ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none")
    swarm = s.get("swarm")
    if swarm:
        private = f"yes (secret fingerprint {swarm['fingerprint']})" if swarm["private"] else "no"
        t.add_row("private swarm", private)
        refused = sorted((s.get("swarm_refused") or {}).items())
        t.add_row("refused peers", ", ".join(f"{k} {v}" for k, v in refused) or "none")
    con.print(t)
    return buf.getvalue()


def peers_table(p: dict[str, Any]) -> str:
    buf = io.StringIO()
    con = _console(buf)
    t = Table(title=f"peers seen by {short_id(p['self'])}")
    for col in ("peer", "address", "state", "devices", "model", "span", "sessions", "age"):
        t.add_column(col)
    for row in p["peers"]:
        t.add_row(
            short_id(row["peer_id"]),
            _addr(row["addrs"]),
            row["state"],
            _gpus(row["devices"]),
            row.get("model_name") or "-",
            _span(row.get("span")),
            str(row.get("sessions", 0)),
            f"{row['age_s']:.1f} s",
        )
    if not p["peers"]:
        t.add_row("(no peers yet)", "", "", "", "", "", "", "")
    con.print(t)
    for cov in p.get("coverage", []):
        reps = cov["replicas"]
        holes = [i for i, r in enumerate(reps) if r == 0]
        line = " ".join(str(r) for r in reps)
        state = "complete" if not holes else f"missing blocks {_ranges(holes)}"
        con.print(f"coverage of {cov.get('model_name') or cov['model']} ({state}): {line}")
    return buf.getvalue()


def _ranges(blocks: list[int]) -> str:
    out: list[str] = []
    start = prev = blocks[0]
    for b in [*blocks[1:], None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if b is not None:
            start = prev = b
    return ", ".join(out)
