"""Capacity ads: what a peer serves and how much room it has, gossiped on CAPACITY_TOPIC.

An ad travels as a signed msgpack envelope {"ad": <packed ad map>, "key": <Ed25519 public key>,
"sig": <signature over AD_SIGNING_PREFIX + ad bytes>}. The key must be the one the ad's libp2p
peer id embeds, so only the owner of a peer id can speak for it. `AdValidator` adds freshness
and replay checks on top and counts why it dropped each ad.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import multiaddr
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.codec import (
    as_int,
    as_map,
    as_str,
    get_bytes,
    get_float,
    get_int,
    get_list,
    get_opt_float,
    get_opt_int,
    get_opt_list,
    get_opt_str,
    get_str,
    pack,
    unpack_map,
)
from protocol.errors import (
    AdRejected,
    BadSignature,
    DecodeError,
    FrameTooLarge,
    ProtocolError,
    VersionMismatch,
)
from protocol.ids import PROTOCOL_MAJOR, PROTOCOL_VERSION, parse_version

MAX_AD_SIZE = 16 * 1024
MAX_TTL = 3600.0
MAX_ADDRS = 32
MAX_ADDR_LEN = 320  # room for a DNS name and the /p2p/ id every address ends in
MAX_DEVICES = 64
MAX_NAME_LEN = 256
MAX_PEER_ID_LEN = 128
MAX_REASON_LEN = 512
# Blocks a model may have: the deepest open models have ~100-200 transformer blocks. A
# realistic bound keeps everything per block (coverage, `peers --json` replicas) small.
# protocol.forward.MAX_BLOCK_INDEX is the same number.
MAX_BLOCKS = 4096
MAX_COUNT = (1 << 63) - 1
MAX_THROUGHPUT = 1e15
# Generous upper bound on unix time (year ~2255): rejects absurd values without a clock.
MAX_TIMESTAMP = 9e9

AD_SIGNING_PREFIX = b"shardmesh-ad/1:"
AD_STATES = ("joining", "online", "draining", "leaving")
DEVICE_KINDS = ("gpu", "cpu")
AD_REJECT_REASONS = (
    "oversized",
    "malformed",
    "version",
    "bad_signature",
    "wrong_sender",
    "replayed",
    "expired",
    "future",
)

_ED25519_KEY_LEN = 32
_ED25519_SIG_LEN = 64
# Envelope map header, three keys, bin headers, key and signature.
_ENVELOPE_OVERHEAD = 1 + 4 + 4 + 4 + 5 + 2 + _ED25519_KEY_LEN + 2 + _ED25519_SIG_LEN


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """One compute device; memory in bytes, utilization in percent (0..100) if known."""

    kind: str
    name: str
    memory_total: int
    memory_free: int
    utilization: float | None


@dataclass(frozen=True, slots=True)
class CapacityAd:
    """A peer's signed statement of what it serves; valid from `timestamp` for `ttl` seconds."""

    version: str
    peer_id: str
    addrs: tuple[str, ...]
    devices: tuple[DeviceSummary, ...]
    model: str | None
    model_name: str | None
    n_blocks: int | None
    span: tuple[int, int] | None
    throughput: float
    kv_free_tokens: int
    sessions: int
    state: str
    seq: int
    timestamp: float
    ttl: float
    reason: str = ""

    @property
    def expires_at(self) -> float:
        return self.timestamp + self.ttl


# --- peer ids -----------------------------------------------------------------------------------

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# protobuf PublicKey{Type: Ed25519 (1), Data: <32 bytes>}, as libp2p serializes it.
_PB_ED25519_PREFIX = b"\x08\x01\x12\x20"
_MULTIHASH_IDENTITY = 0x00


def _base58btc(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(out))


def peer_id_from_ed25519(public_key_raw: bytes) -> str:
    """The libp2p peer id (base58btc, "12D3KooW...") of a raw 32-byte Ed25519 public key."""
    if len(public_key_raw) != _ED25519_KEY_LEN:
        raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(public_key_raw)}")
    serialized = _PB_ED25519_PREFIX + public_key_raw
    # Keys this small are inlined with the identity multihash instead of hashed.
    multihash = bytes((_MULTIHASH_IDENTITY, len(serialized))) + serialized
    return _base58btc(multihash)


def public_key_raw(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --- encoding -----------------------------------------------------------------------------------


def _ad_to_map(ad: CapacityAd) -> dict[str, Any]:
    return {
        "version": ad.version,
        "peer_id": ad.peer_id,
        "addrs": list(ad.addrs),
        "devices": [
            {
                "kind": d.kind,
                "name": d.name,
                "memory_total": d.memory_total,
                "memory_free": d.memory_free,
                "utilization": d.utilization,
            }
            for d in ad.devices
        ],
        "model": ad.model,
        "model_name": ad.model_name,
        "n_blocks": ad.n_blocks,
        "span": None if ad.span is None else list(ad.span),
        "throughput": float(ad.throughput),
        "kv_free_tokens": ad.kv_free_tokens,
        "sessions": ad.sessions,
        "state": ad.state,
        "seq": ad.seq,
        "timestamp": float(ad.timestamp),
        "ttl": float(ad.ttl),
        # Free text: truncated rather than letting it make the whole ad invalid.
        "reason": ad.reason[:MAX_REASON_LEN],
    }


def encode_signed_ad(ad: CapacityAd, private_key: Ed25519PrivateKey) -> bytes:
    """The signed envelope for `ad`.

    ValueError if the key does not own ad.peer_id, or if a field is out of the range receivers
    of this major version accept (they would all drop the ad silently; better the publisher
    hears about it).
    """
    key = public_key_raw(private_key)
    if peer_id_from_ed25519(key) != ad.peer_id:
        raise ValueError("ad.peer_id is not the peer id of the signing key")
    ad_bytes = pack(_ad_to_map(ad))
    try:
        _ad_from_map(unpack_map(ad_bytes, max_size=MAX_AD_SIZE))
    except VersionMismatch:
        pass  # another major's rules are not ours to check (tests and newer peers sign these)
    except ProtocolError as e:
        raise ValueError(f"peers would reject this ad: {e}") from None
    if len(ad_bytes) + _ENVELOPE_OVERHEAD > MAX_AD_SIZE:
        raise ValueError(f"ad of {len(ad_bytes)} bytes exceeds the {MAX_AD_SIZE}-byte limit")
    sig = private_key.sign(AD_SIGNING_PREFIX + ad_bytes)
    return pack({"ad": ad_bytes, "key": key, "sig": sig})


# --- decoding -----------------------------------------------------------------------------------


def _decode_device(obj: Any) -> DeviceSummary:
    m = as_map(obj, "devices")
    kind = get_str(m, "kind", max_len=8)
    if kind not in DEVICE_KINDS:
        raise DecodeError(f"field 'kind': unknown device kind {kind!r}")
    total = get_int(m, "memory_total", min=0, max=MAX_COUNT)
    return DeviceSummary(
        kind=kind,
        name=get_str(m, "name", max_len=MAX_NAME_LEN),
        memory_total=total,
        memory_free=get_int(m, "memory_free", min=0, max=total),
        utilization=get_opt_float(m, "utilization", min=0.0, max=100.0),
    )


def _decode_addr(obj: Any, peer_id: str) -> str:
    """A listen address: a multiaddr that ends in the ad's own /p2p/ id.

    Checked here, where the ad is decoded, so nothing that uses an ad (peer exchange, a
    route's dial) ever meets a string that is not an address, or one that names another
    peer: an ad cannot send us to dial somebody else's id."""
    text = as_str(obj, "addrs", min_len=1, max_len=MAX_ADDR_LEN)
    head, sep, tail = text.rpartition("/p2p/")
    if not sep or tail != peer_id or not head:
        raise DecodeError(f"field 'addrs': {text[:80]!r} does not end in /p2p/<the ad's peer id>")
    try:
        # Parsed, and read back (multiaddr parses some texts it cannot decode again).
        last = list(multiaddr.Multiaddr(text).items())[-1]
    except Exception as e:  # the multiaddr package raises several unrelated types
        raise DecodeError(f"field 'addrs': not a multiaddr: {text[:80]!r} ({e})") from None
    # As a multiaddr, not only as text: in /unix/a/p2p/<id> the "/p2p/<id>" is a path.
    if last[0].name != "p2p" or last[1] != peer_id:
        raise DecodeError(f"field 'addrs': {text[:80]!r} does not end in /p2p/<the ad's peer id>")
    return text


def _ad_from_map(m: dict[str, Any]) -> CapacityAd:
    # Version first: a different major may have changed every other field.
    version = get_str(m, "version", max_len=32)
    try:
        major = parse_version(version)[0]
    except ValueError:
        raise DecodeError(f"field 'version': not a version: {version!r}") from None
    if major != PROTOCOL_MAJOR:
        raise VersionMismatch(f"ad speaks protocol {version}, we speak {PROTOCOL_VERSION}")

    n_blocks = get_opt_int(m, "n_blocks", min=1, max=MAX_BLOCKS)
    raw_span = get_opt_list(m, "span", max_len=2)
    span: tuple[int, int] | None = None
    if raw_span is not None:
        if len(raw_span) != 2 or n_blocks is None:
            raise DecodeError("field 'span': expected [start, end) with n_blocks given")
        start = as_int(raw_span[0], "span", min=0, max=n_blocks - 1)
        end = as_int(raw_span[1], "span", min=start + 1, max=n_blocks)
        span = (start, end)
    model = get_opt_str(m, "model", min_len=1, max_len=MAX_NAME_LEN)
    if span is not None and model is None:
        raise DecodeError("field 'model': a span needs a model")
    state = get_str(m, "state", max_len=16)
    if state not in AD_STATES:
        raise DecodeError(f"field 'state': unknown state {state!r}")
    addrs = get_list(m, "addrs", max_len=MAX_ADDRS)
    devices = get_list(m, "devices", max_len=MAX_DEVICES)
    reason = m.get("reason", "")
    peer_id = get_str(m, "peer_id", min_len=1, max_len=MAX_PEER_ID_LEN)
    return CapacityAd(
        version=version,
        peer_id=peer_id,
        addrs=tuple(_decode_addr(a, peer_id) for a in addrs),
        devices=tuple(_decode_device(d) for d in devices),
        model=model,
        model_name=get_opt_str(m, "model_name", max_len=MAX_NAME_LEN),
        n_blocks=n_blocks,
        span=span,
        throughput=get_float(m, "throughput", min=0.0, max=MAX_THROUGHPUT),
        kv_free_tokens=get_int(m, "kv_free_tokens", min=0, max=MAX_COUNT),
        sessions=get_int(m, "sessions", min=0, max=MAX_COUNT),
        state=state,
        seq=get_int(m, "seq", min=0, max=MAX_COUNT),
        timestamp=get_float(m, "timestamp", min=0.0, max=MAX_TIMESTAMP),
        ttl=get_float(m, "ttl", min=0.0, max=MAX_TTL, min_exclusive=True),
        reason=as_str(reason, "reason", max_len=MAX_REASON_LEN),
    )


def decode_signed_ad(data: bytes, *, max_size: int = MAX_AD_SIZE) -> CapacityAd:
    """Verify and decode a signed ad envelope.

    Raises FrameTooLarge, DecodeError, BadSignature (also when the key does not own the ad's
    peer id) or VersionMismatch.
    """
    env = unpack_map(data, max_size=max_size)
    ad_bytes = get_bytes(env, "ad", max_len=max_size)
    key = get_bytes(env, "key", min_len=_ED25519_KEY_LEN, max_len=_ED25519_KEY_LEN)
    sig = get_bytes(env, "sig", min_len=_ED25519_SIG_LEN, max_len=_ED25519_SIG_LEN)
    # Check the signature before parsing the ad: unsigned content is never interpreted.
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, AD_SIGNING_PREFIX + ad_bytes)
    except (InvalidSignature, ValueError):
        raise BadSignature("ad signature does not verify") from None
    ad = _ad_from_map(unpack_map(ad_bytes, max_size=max_size))
    if ad.peer_id != peer_id_from_ed25519(key):
        raise BadSignature(f"signing key does not own peer id {ad.peer_id}")
    return ad


# --- validation with state ----------------------------------------------------------------------

_REASON_BY_ERROR: dict[type[ProtocolError], str] = {
    FrameTooLarge: "oversized",
    DecodeError: "malformed",
    VersionMismatch: "version",
    BadSignature: "bad_signature",
}


class AdValidator:
    """Accepts ads that decode, verify, are fresh and newer than the last one from their peer.

    Pure: the caller passes the time. Remembers the last accepted seq per peer until every ad
    accepted from that peer has expired (a replay of any of them would then fail as expired),
    and never for more than `max_peers` peers (least recently heard from go first).
    """

    def __init__(
        self,
        *,
        max_size: int = MAX_AD_SIZE,
        max_clock_skew: float = 30.0,
        max_peers: int = 10_000,
    ) -> None:
        self.max_size = max_size
        self.max_clock_skew = max_clock_skew
        self.max_peers = max_peers
        self.accepted = 0
        self.rejected: dict[str, int] = dict.fromkeys(AD_REJECT_REASONS, 0)
        # peer id -> (last accepted seq, latest expiry of any accepted ad); oldest first.
        self._last: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        """Peers whose last seq is remembered."""
        return len(self._last)

    def last_seq(self, peer_id: str) -> int | None:
        entry = self._last.get(peer_id)
        return None if entry is None else entry[0]

    def forget(self, peer_id: str) -> None:
        self._last.pop(peer_id, None)

    def _reject(self, reason: str, message: str) -> AdRejected:
        self.rejected[reason] += 1
        return AdRejected(reason, message)

    def check(self, data: bytes, *, sender: str | None, now: float) -> CapacityAd:
        """The ad in `data`, or AdRejected naming why it was dropped."""
        self._prune(now)
        try:
            ad = decode_signed_ad(data, max_size=self.max_size)
        except ProtocolError as e:
            reason = _REASON_BY_ERROR.get(type(e), "malformed")
            raise self._reject(reason, str(e)) from None
        if sender is not None and sender != ad.peer_id:
            raise self._reject("wrong_sender", f"ad for {ad.peer_id} relayed as from {sender}")
        if ad.timestamp > now + self.max_clock_skew:
            raise self._reject("future", f"timestamp {ad.timestamp - now:.1f}s ahead")
        if ad.expires_at < now:
            raise self._reject("expired", f"expired {now - ad.expires_at:.1f}s ago")
        entry = self._last.pop(ad.peer_id, None)
        if entry is not None:
            last_seq, expires = entry
            if ad.seq <= last_seq:
                self._last[ad.peer_id] = entry  # re-insert: still heard from
                raise self._reject("replayed", f"seq {ad.seq} <= last accepted {last_seq}")
            expires = max(expires, ad.expires_at)
        else:
            expires = ad.expires_at
            while len(self._last) >= self.max_peers:
                self._last.popitem(last=False)
        self._last[ad.peer_id] = (ad.seq, expires)
        self.accepted += 1
        return ad

    def _prune(self, now: float) -> None:
        # Amortised O(1): drop expired peers from the old end only.
        while self._last:
            peer_id, (_, expires) = next(iter(self._last.items()))
            if expires >= now:
                break
            del self._last[peer_id]
