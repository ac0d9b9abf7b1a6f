"""The agent's persistent Ed25519 identity: one key file in the state dir, owner-only (read
through agent.net.secrets, as every secret file; written here)."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.identity_utils import save_identity

from agent.errors import ShardmeshError
from agent.net.secrets import read_secret_file


class IdentityError(ShardmeshError):
    """The key file is unusable; the message is one line for the user."""


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the key at `path`, creating it (mode 0600) on first start.

    A key that group or others can read is refused: anyone who can read it can impersonate
    this peer, and silently fixing the mode would hide that it was exposed.
    """
    if path.exists():
        data = read_secret_file(
            path,
            "identity key",
            error=IdentityError,
            chmod_note=" if it was never readable by other users, or delete it to make a new one",
            make="delete it to make a new one",
        )
        try:
            private_key = deserialize_private_key(data)
            public_key = private_key.get_public_key()
            public_key.serialize()  # as libp2p's load_identity: a key that cannot is corrupt
            return KeyPair(private_key, public_key)
        except Exception as exc:  # protobuf and key decoding raise many kinds
            raise IdentityError(
                f"identity key {path} is corrupt ({type(exc).__name__}); "
                "delete it to make a new one"
            ) from None
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
