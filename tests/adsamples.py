"""A minimal capacity ad for tests that send ads over a real mesh (hostile or not)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from protocol import CapacityAd
from protocol.ids import PROTOCOL_VERSION


def bare_ad(peer_id: str, seq: int, **changes: Any) -> CapacityAd:
    """An online ad serving nothing, fresh now, with `changes` applied."""
    ad = CapacityAd(
        version=PROTOCOL_VERSION,
        peer_id=peer_id,
        addrs=(),
        devices=(),
        model=None,
        model_name=None,
        n_blocks=None,
        span=None,
        throughput=0.0,
        kv_free_tokens=0,
        sessions=0,
        state="online",
        seq=seq,
        timestamp=time.time(),
        ttl=30.0,
    )
    return dataclasses.replace(ad, **changes)
