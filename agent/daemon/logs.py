"""Logging to stderr in a form journald shows well, or one JSON object a line.

Under systemd (stderr is the journal stream named by $JOURNAL_STREAM) each line starts with
its syslog priority, `<6>` for info, which journald strips and records (SyslogLevelPrefix=,
on by default): `journalctl -p warning` filters and colours by it. No timestamp there, as
journald stamps every line itself. On a terminal: time, level, logger, message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

# sd-daemon(3) priorities: <2> crit, <3> err, <4> warning, <6> info, <7> debug.
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels round to the next lower one)."""
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


class JournalFormatter(logging.Formatter):
    """`<6>INFO shardmesh.agent: message`. Every line of a multi-line record (a traceback)
    carries the prefix, since journald stores each line as its own entry."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stream_is_journal(stream: TextIO, journal_stream: str | None) -> bool:
    """True when `stream` is the journal connection systemd named in $JOURNAL_STREAM
    ("DEVICE:INODE"). A terminal opened from a systemd session inherits the variable, so
    the variable alone is not enough (systemd.exec(5))."""
    if not journal_stream:
        return False
    try:
        dev, ino = (int(x) for x in journal_stream.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def stderr_prefix(levelno: int = logging.ERROR) -> str:
    """`<3>` for a line written straight to stderr (the CLI's one-line errors) when stderr is
    the journal, so a failed start shows under `journalctl -p err`; '' anywhere else."""
    if stream_is_journal(sys.stderr, os.environ.get("JOURNAL_STREAM")):
        return f"<{syslog_priority(levelno)}>"
    return ""


def make_formatter(*, json_lines: bool, journal: bool) -> logging.Formatter:
    if json_lines:
        return JsonFormatter()
    if journal:
        return JournalFormatter()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    fmt.converter = time.localtime
    return fmt


def setup_logging(level: str, *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = stream_is_journal(sys.stderr, os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(make_formatter(json_lines=json_lines, journal=journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # py-libp2p logs chatty internals at INFO/WARNING (and sets propagate=False on import);
    # keep its records flowing through our handler but one level quieter than ours.
    lp = logging.getLogger("libp2p")
    lp.propagate = True
    lp.handlers[:] = []
    lp.setLevel(max(logging.WARNING, root.level + 10) if level != "debug" else logging.INFO)
