"""Private-swarm admission, sans-I/O: prove a shared secret on every new connection.

One stream (SWARM_AUTH_PROTOCOL_ID) per connection, opened by the side that dialled:

    initiator -> responder: Hello(nonce_i)
    responder -> initiator: Challenge(nonce_r)
    initiator -> responder: Proof(mac_i)        responder checks it, then
    responder -> initiator: Proof(mac_r)        initiator checks it
    either side, instead:   Refused(reason)     and the connection is closed

mac = HMAC-SHA256(key, role || protocol id || initiator id || responder id || nonce_i ||
nonce_r), key = HKDF-SHA256(secret). The peer ids are the ones Noise authenticated for this
connection, so a proof cannot be relayed to another connection (a man in the middle has a
different peer id), replayed (fresh nonces from both sides) or reflected (the role is in the
MAC). The initiator proves first: a stranger who dials us learns nothing computed from the
secret; only a peer that already proved it gets our proof.

Frames are a 2-byte big-endian length and a msgpack map; every decoding failure raises
`DecodeError` or `FrameTooLarge`, and every handshake failure `AuthFailed` with a reason.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.codec import get_bytes, get_str, pack, unpack_map
from protocol.errors import DecodeError, FrameTooLarge, ProtocolError
from protocol.ids import protocol_id

SWARM_AUTH_PROTOCOL_ID = protocol_id("swarm-auth")
NONCE_LEN = 32
MAC_LEN = 32
# A secret shorter than this is refused: anyone we dial sees one MAC of it, enough for an
# offline guess at a short passphrase.
MIN_SECRET_LEN = 32
MAX_SECRET_LEN = 4096
MAX_AUTH_FRAME = 256
MAX_REASON_LEN = 32
FRAME_PREFIX_LEN = 2

# Why a connection was refused, as counted in `status` ("swarm_refused").
REFUSE_REASONS = (
    "denied",  # on our deny list
    "not_allowed",  # our allow list is not empty and does not name it
    "bad_proof",  # its proof (or its answer to ours) does not verify: another secret
    "no_proof",  # did not complete the handshake within auth_timeout
    "no_secret",  # it answered that it is not in a private swarm
    "peer_private",  # we are in an open swarm and it asked us for a proof
    "malformed",  # broke the handshake protocol
    "refused_by_peer",  # the peer refused us (its reason is logged)
    "max_connections",  # our global connection limit
    "peer_connections",  # our per-peer connection limit
)

_ROLE_INITIATOR = b"initiator"
_ROLE_RESPONDER = b"responder"
_PREFIX = struct.Struct(">H")


class AuthFailed(ProtocolError):
    """The handshake failed. `reason` is one of REFUSE_REASONS (counted locally); `reply`, when
    set, is the reason to send the peer in a Refused message before closing."""

    code = "auth_failed"

    def __init__(self, reason: str, message: str = "", reply: str | None = None) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.reply = reply


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Proof:
    mac: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


AuthMessage = Hello | Challenge | Proof | Refused


def encode_auth(msg: AuthMessage) -> bytes:
    """The complete frame for `msg`."""
    if type(msg) is Hello:
        body = pack({"t": "hello", "nonce": msg.nonce})
    elif type(msg) is Challenge:
        body = pack({"t": "challenge", "nonce": msg.nonce})
    elif type(msg) is Proof:
        body = pack({"t": "proof", "mac": msg.mac})
    elif type(msg) is Refused:
        body = pack({"t": "refused", "reason": msg.reason[:MAX_REASON_LEN]})
    else:
        raise TypeError(f"not a swarm-auth message: {type(msg).__name__}")
    if len(body) > MAX_AUTH_FRAME:
        raise FrameTooLarge(f"swarm-auth frame of {len(body)} bytes")
    return _PREFIX.pack(len(body)) + body


def _nonce(m: dict[str, Any]) -> bytes:
    return get_bytes(m, "nonce", min_len=NONCE_LEN, max_len=NONCE_LEN)


_DECODERS: dict[str, Callable[[dict[str, Any]], AuthMessage]] = {
    "hello": lambda m: Hello(nonce=_nonce(m)),
    "challenge": lambda m: Challenge(nonce=_nonce(m)),
    "proof": lambda m: Proof(mac=get_bytes(m, "mac", min_len=MAC_LEN, max_len=MAC_LEN)),
    "refused": lambda m: Refused(reason=get_str(m, "reason", min_len=1, max_len=MAX_REASON_LEN)),
}


def decode_auth(body: bytes | bytearray | memoryview) -> AuthMessage:
    """One frame body (without its prefix) as a message; unknown keys are ignored."""
    m = unpack_map(body, max_size=MAX_AUTH_FRAME)
    tag = get_str(m, "t", max_len=16)
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise DecodeError(f"unknown swarm-auth message type {tag!r}")
    return decoder(m)


class AuthDecoder:
    """Incremental frames: feed() received bytes, then drain next_message(). Never buffers more
    than one frame's worth (MAX_AUTH_FRAME); an oversized prefix fails at once."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= FRAME_PREFIX_LEN:
            (n,) = _PREFIX.unpack_from(self._buf)
            if n > MAX_AUTH_FRAME:
                raise FrameTooLarge(f"swarm-auth frame of {n} bytes")
        # A handshake is four small frames: more buffered than two frames is a flood.
        if len(self._buf) > 2 * (FRAME_PREFIX_LEN + MAX_AUTH_FRAME):
            raise FrameTooLarge("too many swarm-auth bytes buffered")

    def next_message(self) -> AuthMessage | None:
        if len(self._buf) < FRAME_PREFIX_LEN:
            return None
        (n,) = _PREFIX.unpack_from(self._buf)
        end = FRAME_PREFIX_LEN + n
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[FRAME_PREFIX_LEN:end])
        del self._buf[:end]
        return decode_auth(body)


# --- keys and proofs ----------------------------------------------------------------------------


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF-SHA256 with a fixed salt (the secret is the only input that varies)."""
    prk = hmac.new(b"shardmesh swarm secret", secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def check_secret(secret: bytes) -> None:
    """DecodeError naming the problem if `secret` is unusable (never quoting it)."""
    if len(secret) < MIN_SECRET_LEN:
        raise DecodeError(
            f"the swarm secret is {len(secret)} bytes; at least {MIN_SECRET_LEN} are needed"
        )
    if len(secret) > MAX_SECRET_LEN:
        raise DecodeError(f"the swarm secret is longer than {MAX_SECRET_LEN} bytes")


def derive_key(secret: bytes) -> bytes:
    """The handshake key; the secret itself is used for nothing else."""
    check_secret(secret)
    return _hkdf(secret, SWARM_AUTH_PROTOCOL_ID.encode() + b" handshake")


def fingerprint(secret: bytes) -> str:
    """8 hex digits that tell two agents' secrets apart without revealing them."""
    check_secret(secret)
    key = _hkdf(secret, b"shardmesh fingerprint")
    return hmac.new(key, b"shardmesh-fingerprint", hashlib.sha256).hexdigest()[:8]


def _field(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def compute_proof(
    key: bytes,
    role: bytes,
    initiator: bytes,
    responder: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
) -> bytes:
    """The MAC one side sends. Ids are the raw peer-id bytes Noise authenticated."""
    msg = b"".join(
        _field(x)
        for x in (role, SWARM_AUTH_PROTOCOL_ID.encode(), initiator, responder, nonce_i, nonce_r)
    )
    return hmac.new(key, msg, hashlib.sha256).digest()


# --- the handshake state machine ----------------------------------------------------------------


class Handshake:
    """One side of one handshake. Drive it: send `start()`'s messages, then for each message
    received send what `receive()` returns, until `verified` (or AuthFailed is raised).

    `key` None means this agent is in an open swarm: as responder it answers a Hello with
    Refused("no_secret"); it never initiates.
    """

    def __init__(
        self,
        *,
        key: bytes | None,
        initiator: bool,
        local_id: bytes,
        remote_id: bytes,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if initiator and key is None:
            raise ValueError("an agent without a swarm secret does not initiate")
        self._key = key
        self.initiator = initiator
        self._ids = (local_id, remote_id) if initiator else (remote_id, local_id)
        self._random = random_bytes
        self._nonce_i = b""
        self._nonce_r = b""
        self._state = "start"
        self.verified = False

    def _proof(self, role: bytes) -> bytes:
        assert self._key is not None
        return compute_proof(self._key, role, *self._ids, self._nonce_i, self._nonce_r)

    def start(self) -> list[AuthMessage]:
        if self._state != "start":
            raise RuntimeError("handshake already started")
        if self.initiator:
            self._nonce_i = self._random(NONCE_LEN)
            self._state = "wait_challenge"
            return [Hello(nonce=self._nonce_i)]
        self._state = "wait_hello"
        return []

    def receive(self, msg: AuthMessage) -> list[AuthMessage]:
        if self._state == "start":
            raise RuntimeError("start() the handshake before feeding it messages")
        if isinstance(msg, Refused):
            self._state = "failed"
            # Its own view of a mistake both sides should count alike: another secret, or none.
            reason = msg.reason if msg.reason in ("no_secret", "bad_proof") else "refused_by_peer"
            raise AuthFailed(reason, f"the peer refused us ({msg.reason})")
        state = self._state
        if state == "wait_hello" and isinstance(msg, Hello):
            if self._key is None:
                self._state = "failed"
                raise AuthFailed("peer_private", "it wants a private swarm", reply="no_secret")
            self._nonce_i = msg.nonce
            self._nonce_r = self._random(NONCE_LEN)
            self._state = "wait_proof"
            return [Challenge(nonce=self._nonce_r)]
        if state == "wait_challenge" and isinstance(msg, Challenge):
            self._nonce_r = msg.nonce
            self._state = "wait_proof"
            return [Proof(mac=self._proof(_ROLE_INITIATOR))]
        if state == "wait_proof" and isinstance(msg, Proof):
            theirs = _ROLE_RESPONDER if self.initiator else _ROLE_INITIATOR
            if not hmac.compare_digest(msg.mac, self._proof(theirs)):
                self._state = "failed"
                raise AuthFailed("bad_proof", "its proof does not verify", reply="bad_proof")
            self._state = "done"
            self.verified = True
            return [] if self.initiator else [Proof(mac=self._proof(_ROLE_RESPONDER))]
        self._state = "failed"
        raise AuthFailed(
            "malformed", f"unexpected {type(msg).__name__} in state {state}", reply="malformed"
        )
