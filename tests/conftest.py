"""Fixtures shared across the tests.

The builders themselves live in factories.py, a plain module that tests import by name
(`from factories import ad, signed_ad, KEY`); a conftest.py cannot be imported reliably. Those
builders are plain functions so that module-level tables and Hypothesis strategies can use
them; the fixtures here wrap the ones that hand out something fresh per test.

Tests that start `shardmesh` processes carry the `procs` marker (see pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factories import libp2p_identity


@pytest.fixture
def identity() -> tuple[Any, Ed25519PrivateKey]:
    """A fresh libp2p key pair (for open_mesh) and the same key as a signer of ads."""
    return libp2p_identity()


@pytest.fixture
def fresh_key() -> Ed25519PrivateKey:
    """A random Ed25519 key that no other test uses."""
    return Ed25519PrivateKey.generate()
