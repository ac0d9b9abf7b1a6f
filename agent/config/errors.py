"""The one error type of configuration: a bad flag, key or value, one line naming it."""

from __future__ import annotations

from agent.errors import UsageError


class ConfigError(UsageError):
    """A bad flag, config key or value; the message is one line for the user."""
