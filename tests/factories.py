"""Builders shared by the tests: signing keys and peer ids, capacity ads (signed or not) with
keyword overrides, and the peer-table rows that placement and routing read.

A plain module, imported by name (`from factories import ad, signed_ad`); conftest.py cannot be
imported reliably, so it only wraps some of these as fixtures.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import PROTOCOL_VERSION, CapacityAd, DeviceSummary, pack
from protocol.ads import AD_SIGNING_PREFIX, _ad_to_map, encode_signed_ad
from protocol.ads import peer_id_from_ed25519 as _peer_id_of_raw
from protocol.ads import public_key_raw as _raw

if TYPE_CHECKING:  # the protocol tests import this module without the agent package
    from agent.policy.snapshot import PeerSpan

# A fixed "now" for ads that never meet a real clock (validators are given the time).
NOW = 1_700_000_000.0


def key(seed: int = 0) -> Ed25519PrivateKey:
    """A deterministic Ed25519 key: bytes seed, seed+1, ... seed+31 (mod 256) as its seed.

    Different seeds in 0..255 give different keys; key(0) is KEY, key(1) is OTHER_KEY.
    """
    return Ed25519PrivateKey.from_private_bytes(bytes((seed + i) % 256 for i in range(32)))


def peer_id(k: Ed25519PrivateKey) -> str:
    """The libp2p peer id ("12D3KooW...") that `k` owns."""
    return _peer_id_of_raw(_raw(k))


KEY = key(0)
OTHER_KEY = key(1)
PEER = peer_id(KEY)
OTHER_PEER = peer_id(OTHER_KEY)


def addrs_of(pid: str, *hosts: str, port: int = 4001) -> tuple[str, ...]:
    """Listen addresses of `pid` as ads carry them: each ends in the peer's own /p2p/ id."""
    hosts = hosts or ("/ip4/127.0.0.1", "/ip6/::1")
    return tuple(f"{h}/tcp/{port}/p2p/{pid}" for h in hosts)


def ad(who: str | Ed25519PrivateKey = KEY, /, **changes: Any) -> CapacityAd:
    """A valid ad (encode_signed_ad accepts it) from `who`: a peer id, or the key whose peer id
    it carries. It serves blocks 2:6 of the 8-block "tiny-llama@ab12cd34" with one GPU and a
    CPU, is online at seq 7, stamped NOW for 60 s, with a reason; `changes` replace fields.
    """
    pid = changes.get("peer_id") or (who if isinstance(who, str) else peer_id(who))
    base = CapacityAd(
        version=PROTOCOL_VERSION,
        peer_id=pid,
        addrs=addrs_of(pid),
        devices=(
            DeviceSummary("gpu", "NVIDIA H100 80GB HBM3", 85_899_345_920, 80_000_000_000, 12.0),
            DeviceSummary("cpu", "x86_64", 25_769_803_776, 20_000_000_000, None),
        ),
        model="tiny-llama@ab12cd34",
        model_name="tiny-llama",
        n_blocks=8,
        span=(2, 6),
        throughput=1234.5,
        kv_free_tokens=65_536,
        sessions=3,
        state="online",
        seq=7,
        timestamp=NOW,
        ttl=60.0,
        reason="serving the least-covered span",
    )
    return dataclasses.replace(base, **changes)


def bare_ad(who: str | Ed25519PrivateKey, /, **changes: Any) -> CapacityAd:
    """An online ad serving nothing (no model, devices or addrs), fresh on the real clock for
    30 s: what tests publish into a real mesh, where a served span would attract clients."""
    fields: dict[str, Any] = {
        "addrs": (),
        "devices": (),
        "model": None,
        "model_name": None,
        "n_blocks": None,
        "span": None,
        "throughput": 0.0,
        "kv_free_tokens": 0,
        "sessions": 0,
        "reason": "",
        "timestamp": time.time(),
        "ttl": 30.0,
    }
    return ad(who, **{**fields, **changes})


def signed_ad(k: Ed25519PrivateKey = KEY, /, **changes: Any) -> bytes:
    """The signed envelope of ad(k, **changes), through encode_signed_ad (so it checks)."""
    return encode_signed_ad(ad(k, **changes), k)


def envelope(body: bytes | dict[str, Any] | CapacityAd, k: Ed25519PrivateKey = KEY) -> bytes:
    """A correctly signed envelope around anything, bypassing encode_signed_ad's checks: raw ad
    bytes, an ad map, or an ad (which may claim a peer id that is not k's)."""
    if isinstance(body, CapacityAd):
        body = _ad_to_map(body)
    ad_bytes = body if isinstance(body, bytes) else pack(body)
    sig = k.sign(AD_SIGNING_PREFIX + ad_bytes)
    return pack({"ad": ad_bytes, "key": _raw(k), "sig": sig})


def libp2p_identity() -> tuple[Any, Ed25519PrivateKey]:
    """A fresh libp2p key pair (for open_mesh) and the same key for signing ads."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from agent.net.identity import private_seed

    key_pair = create_new_key_pair()
    return key_pair, Ed25519PrivateKey.from_private_bytes(private_seed(key_pair))


def peer_span(
    peer_id: str,
    start: int,
    end: int,
    *,
    throughput: float = 0.0,
    state: str = "online",
    sessions: int = 0,
    kv_free_tokens: int = 4096,
) -> PeerSpan:
    """A peer-table row as placement and routing see it: serving [start, end), idle, with KV
    room, throughput not measured yet unless given."""
    from agent.policy.snapshot import PeerSpan

    return PeerSpan(peer_id, start, end, throughput, state, sessions, kv_free_tokens)
