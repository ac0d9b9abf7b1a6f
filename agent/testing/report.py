"""What a benchmark writes about its run: the machine it ran on, a JSON report, a markdown
table (the form docs/BENCHMARKS.md quotes). Versions come from package metadata, so writing
a report imports neither torch nor transformers nor libp2p."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import psutil

PACKAGES: tuple[str, ...] = ("torch", "transformers", "libp2p", "trio")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def version(dist: str) -> str | None:
    """An installed distribution's version, None if it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and the versions of `packages` (one key each), and the
    load average now: a loaded machine makes the numbers worth less."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    info.update({p: version(p) for p in packages})
    info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    """The report, indented, parent folders made; values JSON lacks (paths) as strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub table with padded columns, so it also reads in a terminal. A short row (a
    failed setup: its name and the error) is filled with empty cells."""
    body = [[_cell(v) for v in row] for row in rows]
    if any(len(row) > len(headers) for row in body):
        raise ValueError("a row has more cells than there are headers")
    body = [row + [""] * (len(headers) - len(row)) for row in body]
    head = [_cell(h) for h in headers]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *(line(row) for row in body)])


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], file: TextIO | None = None
) -> None:
    print(markdown_table(headers, rows), file=file or sys.stdout)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
