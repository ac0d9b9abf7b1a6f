"""`shardmesh devices` as text: tables of the GPUs, their processes, the CPU and RAM."""

from __future__ import annotations

import io

from agent.hw.report import DeviceReport

_GIB = 1024**3


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / _GIB:.1f}"


def _or_dash(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render_devices(report: DeviceReport, width: int = 100) -> str:
    """Human-readable tables (memory in GiB) with the notes underneath."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def table(title: str) -> Table:
        return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, highlight=False, emoji=False)

    if report.gpus:
        gpu_table = table("GPUs (memory in GiB)")
        gpu_table.add_column("#")
        gpu_table.add_column("Name", min_width=12)
        for header in ("Used/Total", "Free", "Util", "Temp", "Power W", "CC", "Procs"):
            gpu_table.add_column(header, no_wrap=True)
        for gpu in report.gpus:
            power = (
                "-"
                if gpu.power_w is None and gpu.power_limit_w is None
                else f"{_or_dash(gpu.power_w, '{:.0f}')}/{_or_dash(gpu.power_limit_w, '{:.0f}')}"
            )
            gpu_table.add_row(
                str(gpu.index),
                Text(gpu.name),  # Text: a "[" in a name is not rich markup
                f"{_gib(gpu.memory_used)}/{_gib(gpu.memory_total)}",
                _gib(gpu.memory_free),
                _or_dash(gpu.utilization, "{}%"),
                _or_dash(gpu.temperature_c, "{}°C"),
                power,
                _or_dash(gpu.compute_capability),
                _or_dash(None if gpu.processes is None else len(gpu.processes)),
            )
        console.print(gpu_table)
        procs = [(g.index, p) for g in report.gpus for p in g.processes or []]
        if procs:
            proc_table = table("GPU processes")
            proc_table.add_column("GPU")
            proc_table.add_column("PID", justify="right")
            proc_table.add_column("Used GiB", justify="right")
            for index, proc in procs:
                proc_table.add_row(str(index), str(proc.pid), _gib(proc.used_memory))
            console.print()
            console.print(proc_table)
    else:
        console.print("GPUs: none found")

    cpu, mem = report.cpu, report.memory
    console.print()
    cpu_table = table("CPU and RAM (GiB)")
    cpu_table.add_column("Model", min_width=12)
    for header in ("Cores phys/log", "Load 1m", "RAM total", "RAM available"):
        cpu_table.add_column(header, no_wrap=True)
    cpu_table.add_row(
        Text(cpu.model),
        f"{_or_dash(cpu.cores_physical)}/{cpu.cores_logical}",
        f"{cpu.load_1m:.2f}",
        _gib(mem.total),
        _gib(mem.available),
    )
    console.print(cpu_table)

    if report.notes:
        console.print()
        console.print("Notes:")
        for note in report.notes:
            console.print(Text(f"  - {note}"))
    # rich pads titles to the table's width; drop that so the text diffs and pastes cleanly.
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
