"""The agent's persistent Ed25519 identity: one key file in the state dir, owner-only (read
through agent.net.secrets, as every secret file; written here)."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.identity_utils import save_identity

from agent.errors import ShardmeshError
from agent.net.secrets import read_secret_file


class IdentityError(ShardmeshError):
    """The key file is unusable; the message is one line for the user."""


# What deleting the key file does, for every message about an unusable one.
NEW_IDENTITY = "delete it to make a new one (a new identity: this agent's peer id changes)"


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the key at `path`, creating it (mode 0600) on first start.

    A key that group or others can read is refused: anyone who can read it can impersonate
    this peer, and silently fixing the mode would hide that it was exposed. A directory, an
    empty file or one that holds no Ed25519 libp2p key is refused saying so; deleting it
    makes a new identity (and a new peer id), which the message says too.
    """
    if path.exists():
        data = read_secret_file(
            path,
            "identity key",
            error=IdentityError,
            chmod_note=" if it was never readable by other users, or delete it to make a new one",
            make=NEW_IDENTITY,
            directory=f"is a directory, not a key file; {NEW_IDENTITY}",
        )
        return _parse_key(path, data)
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


def _parse_key(path: Path, data: bytes) -> KeyPair:
    """The key pair in a key file's bytes (libp2p's protobuf of an Ed25519 private key)."""
    try:
        private_key = deserialize_private_key(data)
        public_key = private_key.get_public_key()
        public_key.serialize()  # as libp2p's load_identity: a key that cannot is corrupt
    except Exception as exc:  # protobuf and key decoding raise many kinds
        raise IdentityError(
            f"identity key {path} is not a shardmesh identity key (corrupt: "
            f"{type(exc).__name__}); {NEW_IDENTITY}"
        ) from None
    if not isinstance(private_key, Ed25519PrivateKey):  # ads are signed with its Ed25519 seed
        kind = private_key.get_type().name
        raise IdentityError(
            f"identity key {path} is not a shardmesh identity key (its key type is {kind}, "
            f"not Ed25519); {NEW_IDENTITY}"
        )
    return KeyPair(private_key, public_key)


def private_seed(key_pair: KeyPair) -> bytes:
    """The raw 32-byte Ed25519 seed, for signing ads with `cryptography`."""
    raw = key_pair.private_key.to_bytes()
    return raw[:32]
