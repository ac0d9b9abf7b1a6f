"""Bearer keys for the HTTP API: one key a line in a file only its owner can read (or a
systemd credential), read through agent.net.secrets as every secret file."""

from __future__ import annotations

import hmac
from pathlib import Path

from agent.errors import ShardmeshError
from agent.net.secrets import read_secret_file


class ApiKeyError(ShardmeshError):
    """The key file is unusable; the message is one line for the user."""


def load_api_keys(path: Path) -> frozenset[str]:
    """The keys in `path`: blank lines and `#` comments are skipped, at least one is needed.

    A file that group or others can read is refused, as for the identity key: anyone who
    read it can use the API, and quietly fixing the mode would hide that. A systemd
    credential (`LoadCredential=`, README) is accepted as systemd leaves it.
    """
    data = read_secret_file(
        path,
        "api.key_file:",
        error=ApiKeyError,
        chmod_note=" if its keys were never exposed (else replace them)",
        make="put one bearer key a line in it",
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiKeyError(f"api.key_file: {path} is not UTF-8 text") from None
    keys = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line) or not line.isprintable():
            raise ApiKeyError(f"api.key_file: {path} line {n}: a key is one word of printable text")
        keys.add(line)
    if not keys:
        raise ApiKeyError(f"api.key_file: {path} holds no key")
    return frozenset(keys)


def check_bearer(header: str | None, keys: frozenset[str]) -> bool:
    """True if `Authorization: Bearer KEY` names one of `keys` (compared in constant time)."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    token = given.strip().encode()
    # Compare with every key, not stopping at a match, so timing says nothing about which.
    return sum(hmac.compare_digest(token, k.encode()) for k in keys) > 0
