"""The agent's expected-failure types: the CLI prints their message as one line, no traceback."""

from __future__ import annotations


class ShardmeshError(Exception):
    """An expected runtime failure (exit 1): daemon not running, model not covered, ..."""


class UsageError(ShardmeshError):
    """A bad flag, config key or value (exit 2)."""


def expected_errors() -> tuple[type[BaseException], ...]:
    return (ShardmeshError,)
