"""The mesh as this node sees it: one entry a peer, from its latest accepted capacity ad.

Pure and clock-injected: the caller passes `now` (monotonic seconds), so expiry is tested
without sleeping. An entry expires `ttl` seconds after its ad arrived, measured on our own
clock, so a peer with a skewed clock cannot keep a stale entry alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.policy.snapshot import PeerSpan
from protocol import CapacityAd


@dataclass(frozen=True)
class PeerEntry:
    ad: CapacityAd
    first_seen: float
    received: float

    def expires(self) -> float:
        return self.received + self.ad.ttl


class PeerTable:
    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self._entries: dict[str, PeerEntry] = {}

    def update(self, ad: CapacityAd, now: float) -> str | None:
        """Record an accepted ad. Returns "joined" for a new peer, "left" when a known peer
        announced that it is leaving (dropped at once), else None."""
        if ad.peer_id == self.self_id:
            return None
        old = self._entries.get(ad.peer_id)
        if ad.state == "leaving":
            return "left" if self._entries.pop(ad.peer_id, None) else None
        first = old.first_seen if old else now
        self._entries[ad.peer_id] = PeerEntry(ad=ad, first_seen=first, received=now)
        return "joined" if old is None else None

    def expire(self, now: float, connected: Callable[[str], bool] | None = None) -> list[str]:
        """Drop entries past their TTL; returns the dropped peer ids.

        A peer we still hold a live connection to gets one more TTL of grace: its ads may
        just be late (gossip under load), while a dead peer's connection closes at once.
        """
        gone = [
            pid
            for pid, e in self._entries.items()
            if e.expires() <= now
            and not (connected is not None and e.expires() + e.ad.ttl > now and connected(pid))
        ]
        for pid in gone:
            del self._entries[pid]
        return gone

    def get(self, peer_id: str) -> PeerEntry | None:
        return self._entries.get(peer_id)

    def addrs(self, peer_id: str) -> list[str]:
        """The addresses the peer advertised last, or [] for an unknown peer."""
        entry = self._entries.get(peer_id)
        return list(entry.ad.addrs) if entry else []

    def __iter__(self) -> Iterator[PeerEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.ad.peer_id))

    def __len__(self) -> int:
        return len(self._entries)

    def spans_for(self, model_id: str) -> list[PeerSpan]:
        """The snapshot that placement and routing work on, for one model."""
        return [
            PeerSpan(
                peer_id=e.ad.peer_id,
                start=e.ad.span[0],
                end=e.ad.span[1],
                throughput=e.ad.throughput,
                state=e.ad.state,
                sessions=e.ad.sessions,
                kv_free_tokens=e.ad.kv_free_tokens,
            )
            for e in self
            if e.ad.model == model_id and e.ad.span is not None
        ]

    def models(self) -> dict[str, tuple[str | None, int | None]]:
        """model id -> (name, n_blocks) for every model some peer serves."""
        out: dict[str, tuple[str | None, int | None]] = {}
        for e in self:
            if e.ad.model:
                out[e.ad.model] = (e.ad.model_name, e.ad.n_blocks)
        return out
