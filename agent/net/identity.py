"""The agent's persistent Ed25519 identity: one key file in the state dir, owner-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity

from agent.errors import ShardmeshError


class IdentityError(ShardmeshError):
    """The key file is unusable; the message is one line for the user."""


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the key at `path`, creating it (mode 0600) on first start.

    A key that group or others can read is refused: anyone who can read it can impersonate
    this peer, and silently fixing the mode would hide that it was exposed.
    """
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"identity key {path} is readable by other users (mode {mode:o}); "
                f"run 'chmod 600 {path}' if it was never exposed, or delete it to make a new one"
            )
        try:
            return load_identity(path)
        except (ValueError, OSError) as exc:
            raise IdentityError(f"identity key {path} is unreadable or corrupt: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pair = create_new_key_pair()
    # Write to a private temp file then rename, so a crash never leaves a half-written key.
    tmp = path.with_name(path.name + ".tmp")
    old_umask = os.umask(0o077)
    try:
        save_identity(key_pair, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        os.umask(old_umask)
    return key_pair


def private_seed(key_pair: KeyPair) -> bytes:
    """The raw 32-byte Ed25519 seed, for signing ads with `cryptography`."""
    raw = key_pair.private_key.to_bytes()
    return raw[:32]
