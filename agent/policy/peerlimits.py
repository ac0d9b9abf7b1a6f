"""Per-peer limits on what one peer may ask of this agent, so that nobody else notices it.

Pure bookkeeping with the clock passed in (no trio, no sockets): token buckets for requests
and bytes per second, counts of open forward streams, open sessions and reserved KV-cache
bytes per peer, and the connection caps checked when a connection arrives. The forward
protocol (agent.serve) and the swarm gate (agent.net.swarm) ask it and act on the answer:
wait, refuse, reset or disconnect.

Bytes are charged as they are read (`charge_bytes`, per chunk), not once a frame is whole, so
a frame in progress costs its sender from its first byte; requests are charged per message
(`admit`). A peer's shares of the agent's sessions and KV budget are fractions of them
(`per_peer_session_share`, `per_peer_kv_share`), so a few peer ids cannot take it all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import LimitsConfig

# A request may be slowed down by at most this much; past it, it is refused ("rate_limited").
MAX_WAIT_S = 1.0
# Refusals a peer may collect without pausing (its request bucket never refilling) before
# its streams are dropped rather than answered.
MAX_STRIKES = 32
# Idle peers (no streams, no sessions, buckets full) are forgotten beyond this many remembered.
MAX_TRACKED_PEERS = 4096
# The session share never leaves a peer fewer than this many (per_peer_sessions still caps
# it): an agent routing its HTTP API's generations (api.max_concurrent, 8 by default) holds
# one session per generation on a server.
MIN_SHARE_SESSIONS = 4


class LimitExceeded(Exception):
    """A request over a limit; `code` is its forward-protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`. A request may take more than is there
    (the balance goes negative): it then waits until the debt is repaid, which keeps a large
    frame from being refused forever and makes the long-run rate exact."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` would be paid for, taking nothing."""
        self._refill(now)
        after = self._tokens - amount
        return 0.0 if after >= 0 else -after / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self._tokens -= amount

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self.burst


@dataclass
class _Peer:
    requests: TokenBucket
    bytes: TokenBucket
    sessions: int = 0
    kv_bytes: int = 0
    strikes: int = 0
    streams: int = 0


@dataclass
class PeerLimits:
    """Limits for every peer of one agent. The KV cap is known once blocks are loaded."""

    limits: LimitsConfig
    clock: Callable[[], float] = time.monotonic
    max_wait_s: float = MAX_WAIT_S
    kv_cap_bytes: int = 0  # 0 until set_kv_budget: no per-peer KV cap yet
    throttled: int = 0  # requests slowed down
    throttled_reads: int = 0  # reads slowed down (the peer was over its byte rate)
    bytes_charged: int = 0  # bytes read from peers and charged to their byte rates
    refused: dict[str, int] = field(default_factory=dict)  # by error code (or stream cap)
    _peers: dict[str, _Peer] = field(default_factory=dict)

    def set_kv_budget(self, budget_bytes: int, bytes_per_token: int) -> None:
        """Per-peer cap: `per_peer_kv_tokens` tokens when set, else `per_peer_kv_share` of
        the agent's budget."""
        tokens = self.limits.per_peer_kv_tokens
        if tokens:
            self.kv_cap_bytes = tokens * bytes_per_token
        else:
            share = int(budget_bytes * self.limits.per_peer_kv_share)
            self.kv_cap_bytes = max(1, share) if budget_bytes > 0 else 0

    @property
    def session_cap(self) -> int:
        """Sessions one peer may hold: its share of max_sessions (at least
        MIN_SHARE_SESSIONS), at most per_peer_sessions."""
        lim = self.limits
        share = max(MIN_SHARE_SESSIONS, int(lim.max_sessions * lim.per_peer_session_share))
        return min(lim.per_peer_sessions, share)

    def trusted(self, peer: str) -> bool:
        """`limits.trusted_peers`: agents the owner runs (an HTTP API agent routing many
        users' generations shows up here as one peer). They are held to the agent's own
        limits (max_sessions, the KV budget), not to a stranger's share; rates still apply."""
        return peer in self.limits.trusted_peers

    def _session_cap(self, peer: str) -> int:
        return self.limits.max_sessions if self.trusted(peer) else self.session_cap

    def _kv_cap(self, peer: str) -> int:
        return 0 if self.trusted(peer) else self.kv_cap_bytes

    def _peer(self, peer: str, now: float) -> _Peer:
        entry = self._peers.get(peer)
        if entry is None:
            if len(self._peers) >= MAX_TRACKED_PEERS:
                self._forget_idle(now)
            rate = self.limits.per_peer_requests_per_s
            byte_rate = self.limits.per_peer_bytes_per_s
            # One second of burst: a client's prefill chunks come back to back.
            entry = _Peer(
                requests=TokenBucket(rate, max(1.0, rate), now),
                bytes=TokenBucket(byte_rate, byte_rate, now),
            )
            self._peers[peer] = entry
        return entry

    def _forget_idle(self, now: float) -> None:
        idle = [
            p
            for p, e in self._peers.items()
            if e.sessions == 0 and e.streams == 0 and e.requests.full(now) and e.bytes.full(now)
        ]
        for p in idle:
            del self._peers[p]

    def _refuse(self, code: str, message: str) -> LimitExceeded:
        self.refused[code] = self.refused.get(code, 0) + 1
        return LimitExceeded(code, message)

    # --- requests -----------------------------------------------------------------------
    def admit(self, peer: str, nbytes: int) -> float:
        """Charge one request of `nbytes`: the seconds to wait before serving it (0 = now).
        Raises LimitExceeded("rate_limited") when it would wait longer than max_wait_s; a
        refused request is not charged."""
        now = self.clock()
        entry = self._peer(peer, now)
        if entry.requests.full(now):
            entry.strikes = 0  # it paused for a second: past refusals are forgiven
        wait = max(entry.requests.wait_for(1, now), entry.bytes.wait_for(nbytes, now))
        if wait > self.max_wait_s:
            entry.strikes += 1
            raise self._refuse(
                "rate_limited",
                f"over {self.limits.per_peer_requests_per_s:g} requests/s or "
                f"{self.limits.per_peer_bytes_per_s:g} bytes/s for this peer; slow down",
            )
        entry.requests.take(1, now)
        entry.bytes.take(nbytes, now)
        if wait > 0:
            self.throttled += 1
        return wait

    def charge_bytes(self, peer: str, nbytes: int) -> float:
        """Charge `nbytes` just read from `peer` to its byte rate (never refused: they have
        arrived): the seconds to wait before reading more of what it sends (0 = now)."""
        now = self.clock()
        entry = self._peer(peer, now)
        entry.bytes.take(nbytes, now)
        self.bytes_charged += nbytes
        wait = entry.bytes.wait_for(0, now)
        if wait > 0:
            self.throttled_reads += 1
        return wait

    def should_drop(self, peer: str) -> bool:
        """True once a peer kept sending through MAX_STRIKES refusals: stop answering it.
        (One stream is paced, never refused: refusals need many streams in parallel.)"""
        entry = self._peers.get(peer)
        return entry is not None and entry.strikes >= MAX_STRIKES

    # --- streams ------------------------------------------------------------------------
    def open_stream(self, peer: str) -> None:
        """Count a new forward stream of `peer`, or raise LimitExceeded("too_many_streams")
        (counted in `refused`; the stream is reset, no error code goes on the wire)."""
        entry = self._peer(peer, self.clock())
        cap = self.limits.max_sessions if self.trusted(peer) else self.limits.per_peer_streams
        if entry.streams >= cap:
            raise self._refuse(
                "too_many_streams", f"this peer already has {cap} forward streams open here"
            )
        entry.streams += 1

    def close_stream(self, peer: str) -> None:
        entry = self._peers.get(peer)
        if entry is not None:
            entry.streams = max(0, entry.streams - 1)

    def streams_of(self, peer: str) -> int:
        entry = self._peers.get(peer)
        return entry.streams if entry else 0

    # --- sessions -----------------------------------------------------------------------
    def open_session(self, peer: str, kv_bytes: int) -> None:
        """Count a new session of `peer` reserving `kv_bytes`, or raise LimitExceeded."""
        entry = self._peer(peer, self.clock())
        cap = self._session_cap(peer)
        if entry.sessions >= cap:
            raise self._refuse(
                "too_many_sessions", f"this peer already has {cap} sessions open here"
            )
        self._check_kv(peer, entry, kv_bytes)
        entry.sessions += 1
        entry.kv_bytes += kv_bytes

    def grow_session(self, peer: str, kv_bytes: int) -> None:
        """One of `peer`'s sessions reserves `kv_bytes` more (its cache grew by a page), or
        LimitExceeded when that would pass the peer's KV share."""
        entry = self._peer(peer, self.clock())
        self._check_kv(peer, entry, kv_bytes)
        entry.kv_bytes += kv_bytes

    def _check_kv(self, peer: str, entry: _Peer, kv_bytes: int) -> None:
        cap = self._kv_cap(peer)
        if cap and entry.kv_bytes + kv_bytes > cap:
            raise self._refuse(
                "kv_budget",
                f"this peer's sessions would hold {entry.kv_bytes + kv_bytes} bytes of "
                f"KV cache; its share here is {cap}",
            )

    def close_session(self, peer: str, kv_bytes: int) -> None:
        entry = self._peers.get(peer)
        if entry is not None:
            entry.sessions = max(0, entry.sessions - 1)
            entry.kv_bytes = max(0, entry.kv_bytes - kv_bytes)

    def sessions_of(self, peer: str) -> int:
        entry = self._peers.get(peer)
        return entry.sessions if entry else 0

    def status(self) -> dict[str, object]:
        return {
            "throttled_requests": self.throttled,
            "throttled_reads": self.throttled_reads,
            "bytes_charged": self.bytes_charged,
            "refused": dict(self.refused),
            "peers_with_sessions": sum(1 for e in self._peers.values() if e.sessions),
            "open_streams": sum(e.streams for e in self._peers.values()),
        }


def connection_verdict(total: int, for_peer: int, limits: LimitsConfig) -> str | None:
    """Whether a connection that makes `total` connections in all and `for_peer` with its peer
    goes over a cap: the reason to refuse it ("max_connections", "peer_connections"), or None."""
    if total > limits.max_connections:
        return "max_connections"
    if for_peer > limits.per_peer_connections:
        return "peer_connections"
    return None
