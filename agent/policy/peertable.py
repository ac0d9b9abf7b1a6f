"""The mesh as this node sees it: one entry a peer, from its latest accepted capacity ad.

Pure and clock-injected: the caller passes `now` (monotonic seconds), so expiry is tested
without sleeping. An entry expires `ttl` seconds after its ad arrived, measured on our own
clock, so a peer with a skewed clock cannot keep a stale entry alive; the TTL a peer may
claim is capped by our own expiry policy (`TableLimits.ttl_cap`), so a flood of ads that
claim an hour drains out on our schedule.

The table is bounded (issue "Valid signatures, hostile values"): at most
`TableLimits.max_peers` entries; a new peer arriving at a full table evicts the least
recently heard peer that is not protected (the caller's predicate: peers we are connected
to, peers that served us); when every entry is protected the newcomer is refused. Each
relaying peer may introduce only so many new peer ids a minute (`RelayBudget`, asked by
`AdIntake` from the gossip validator, where the relaying peer is known).

`version` counts changes, so views built from the table (coverage, the peers list) are
computed once per change and cached, not per request.

This module also holds the agent's own ad timing (`announce_interval`, `announce_ttl`):
stretched with the mesh, but always inside the protocol's bounds whatever the table holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.config import LimitsConfig
from agent.policy.peerlimits import TokenBucket
from agent.policy.snapshot import PeerSpan
from protocol import CapacityAd
from protocol.ads import MAX_TTL

# Mesh-wide capacity ads per second we aim to stay under. py-libp2p's gossipsub delivered
# ads in ~25-80 ms at up to ~6 ads/s mesh-wide on a 2-core box, but at 17 ads/s (17 agents
# announcing every second) delivery fell to seconds and tables flapped. So each agent
# stretches its interval as the mesh grows, and its TTL with it.
MESH_AD_RATE = 5.0
TTL_PER_INTERVAL = 4.0
# The longest interval whose TTL (TTL_PER_INTERVAL intervals) peers still accept.
MAX_ANNOUNCE_INTERVAL = MAX_TTL / TTL_PER_INTERVAL
# The TTL cap never goes below this (a small table must not expire honest peers that
# announce every few seconds with the default 20 s TTL... or a slow 30 s interval).
MIN_TTL_CAP = 4 * 30.0

DEFAULT_MAX_PEERS = 1024
DEFAULT_NEW_PEERS_PER_MINUTE = 120.0
# Relaying peers whose budgets are remembered; beyond it the least recently charged go.
MAX_TRACKED_RELAYS = 4096

# Why the intake or the table refused an ad (status `rejected_ads`, /metrics).
RELAY_BUDGET = "relay_budget"  # a new peer id over the relaying peer's budget
TABLE_FULL = "table_full"  # a new peer id while every entry is protected
N_BLOCKS_MISMATCH = "n_blocks_mismatch"  # a model id we know, with another block count
INTAKE_REASONS: tuple[str, ...] = (RELAY_BUDGET, TABLE_FULL, N_BLOCKS_MISMATCH)

Predicate = Callable[[str], bool]


def announce_interval(base: float, n_peers: int) -> float:
    """Seconds between this agent's ads: `base`, stretched so a mesh of `n_peers` others
    stays under MESH_AD_RATE ads/s, and never so long that its TTL would pass MAX_TTL."""
    return min(max(base, (n_peers + 1) / MESH_AD_RATE), MAX_ANNOUNCE_INTERVAL)


def announce_ttl(base: float, interval: float) -> float:
    """This agent's ad TTL: at least TTL_PER_INTERVAL intervals, at most MAX_TTL (peers
    refuse more, the "leaving" ad too)."""
    return min(max(base, TTL_PER_INTERVAL * interval), MAX_TTL)


def _safe(predicate: Predicate | None, peer_id: str) -> bool:
    # A caller's predicate that fails counts as False: one peer's bad state must not stop
    # expiry or eviction for everyone else.
    if predicate is None:
        return False
    try:
        return bool(predicate(peer_id))
    except Exception:
        return False


@dataclass(frozen=True)
class TableLimits:
    """max_peers: entries the table holds. new_peers_per_minute: new peer ids one relaying
    peer may introduce a minute (with a minute's worth as burst, so an agent that joins
    through one bootstrap peer still learns a mesh of that size at once). max_ttl: the most
    an entry lives after its ad; None = TTL_PER_INTERVAL intervals of a mesh of max_peers,
    within [MIN_TTL_CAP, MAX_TTL]."""

    max_peers: int = DEFAULT_MAX_PEERS
    new_peers_per_minute: float = DEFAULT_NEW_PEERS_PER_MINUTE
    max_ttl: float | None = None

    def __post_init__(self) -> None:
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {self.max_peers}")
        if not self.new_peers_per_minute > 0:
            raise ValueError("new_peers_per_minute must be positive")
        if self.max_ttl is not None and not self.max_ttl > 0:
            raise ValueError("max_ttl must be positive")

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> TableLimits:
        """From [limits] max_known_peers and new_peers_per_minute (values that make no sense
        are raised to the smallest that works: a table of 1, one new id a minute)."""
        return cls(
            max_peers=max(1, int(limits.max_known_peers)),
            new_peers_per_minute=max(1.0, float(limits.new_peers_per_minute)),
        )

    def ttl_cap(self) -> float:
        if self.max_ttl is not None:
            return min(self.max_ttl, MAX_TTL)
        mesh_ttl = TTL_PER_INTERVAL * (self.max_peers + 1) / MESH_AD_RATE
        return min(max(mesh_ttl, MIN_TTL_CAP), MAX_TTL)


@dataclass(frozen=True)
class PeerEntry:
    ad: CapacityAd
    first_seen: float
    received: float
    ttl: float  # the ad's TTL as we honour it: min(ad.ttl, our cap)

    def expires(self) -> float:
        return self.received + self.ttl


class PeerTable:
    def __init__(
        self,
        self_id: str,
        limits: TableLimits | None = None,
        protected: Predicate | None = None,
    ) -> None:
        self.self_id = self_id
        self.limits = limits or TableLimits()
        self._ttl_cap = self.limits.ttl_cap()
        # Never evicted to make room: peers we are connected to, peers that served us.
        self.protected = protected
        # Least recently heard first: an update moves its peer to the end.
        self._entries: OrderedDict[str, PeerEntry] = OrderedDict()
        self.version = 0  # +1 on every change; views cache on it
        self.evicted = 0
        self.refused: dict[str, int] = {TABLE_FULL: 0}
        self._cache_version = -1
        self._sorted: list[PeerEntry] = []
        self._models: dict[str, tuple[str | None, int | None]] = {}
        self._spans: dict[str, list[PeerSpan]] = {}

    def update(self, ad: CapacityAd, now: float) -> str | None:
        """Record an accepted ad. Returns "joined" for a new peer, "left" when a known peer
        announced that it is leaving (dropped at once), "refused" when the table is full of
        protected peers (counted under TABLE_FULL), else None."""
        if ad.peer_id == self.self_id:
            return None
        if ad.state == "leaving":
            if self._entries.pop(ad.peer_id, None) is None:
                return None
            self.version += 1
            return "left"
        old = self._entries.pop(ad.peer_id, None)
        if old is None and len(self._entries) >= self.limits.max_peers:
            victim = self._victim()
            if victim is None:
                self.refused[TABLE_FULL] += 1
                return "refused"
            del self._entries[victim]
            self.evicted += 1
        first = old.first_seen if old else now
        self._entries[ad.peer_id] = PeerEntry(
            ad=ad, first_seen=first, received=now, ttl=min(ad.ttl, self._ttl_cap)
        )
        self.version += 1
        return "joined" if old is None else None

    def _victim(self) -> str | None:
        """The least recently heard peer that is not protected, or None."""
        for pid in self._entries:
            if not _safe(self.protected, pid):
                return pid
        return None

    def has_room(self, peer_id: str) -> bool:
        """Whether an ad from `peer_id` would be recorded (known, or room, or evictable)."""
        return (
            peer_id in self._entries
            or len(self._entries) < self.limits.max_peers
            or self._victim() is not None
        )

    def expire(self, now: float, connected: Predicate | None = None) -> list[str]:
        """Drop entries past their TTL; returns the dropped peer ids.

        A peer we still hold a live connection to gets one more TTL of grace: its ads may
        just be late (gossip under load), while a dead peer's connection closes at once.
        """
        gone = [
            pid
            for pid, e in self._entries.items()
            if e.expires() <= now and not (e.expires() + e.ttl > now and _safe(connected, pid))
        ]
        for pid in gone:
            del self._entries[pid]
        if gone:
            self.version += 1
        return gone

    def get(self, peer_id: str) -> PeerEntry | None:
        return self._entries.get(peer_id)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def addrs(self, peer_id: str) -> list[str]:
        """The addresses the peer advertised last, or [] for an unknown peer."""
        entry = self._entries.get(peer_id)
        return list(entry.ad.addrs) if entry else []

    def _refresh(self) -> None:
        if self._cache_version == self.version:
            return
        self._sorted = sorted(self._entries.values(), key=lambda e: e.ad.peer_id)
        models: dict[str, tuple[str | None, int | None]] = {}
        for e in self._sorted:
            if e.ad.model:
                models[e.ad.model] = (e.ad.model_name, e.ad.n_blocks)
        self._models = models
        self._spans = {}
        self._cache_version = self.version

    def __iter__(self) -> Iterator[PeerEntry]:
        """Entries in peer id order (sorted once per change)."""
        self._refresh()
        return iter(list(self._sorted))

    def __len__(self) -> int:
        return len(self._entries)

    def spans_for(self, model_id: str) -> list[PeerSpan]:
        """The snapshot that placement and routing work on, for one model (built once per
        change; the caller gets its own list)."""
        self._refresh()
        spans = self._spans.get(model_id)
        if spans is None:
            spans = [
                PeerSpan(
                    peer_id=e.ad.peer_id,
                    start=e.ad.span[0],
                    end=e.ad.span[1],
                    throughput=e.ad.throughput,
                    state=e.ad.state,
                    sessions=e.ad.sessions,
                    kv_free_tokens=e.ad.kv_free_tokens,
                )
                for e in self._sorted
                if e.ad.model == model_id and e.ad.span is not None
            ]
            self._spans[model_id] = spans
        return list(spans)

    def models(self) -> dict[str, tuple[str | None, int | None]]:
        """model id -> (name, n_blocks) for every model some peer serves."""
        self._refresh()
        return dict(self._models)


class RelayBudget:
    """New peer ids each relaying peer may introduce: a token bucket per relaying peer,
    `per_minute` a minute with a minute's worth of burst. Pure: the caller passes `now`."""

    def __init__(self, per_minute: float, max_relays: int = MAX_TRACKED_RELAYS) -> None:
        if not per_minute > 0:
            raise ValueError("per_minute must be positive")
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute)
        self.max_relays = max_relays
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, relay: str, now: float) -> TokenBucket:
        bucket = self._buckets.pop(relay, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) >= self.max_relays:
                self._buckets.popitem(last=False)
        self._buckets[relay] = bucket
        return bucket

    def allows(self, relay: str, now: float) -> bool:
        """Whether `relay` may introduce one more new peer id now (takes nothing)."""
        bucket = self._buckets.get(relay)
        return bucket is None or bucket.wait_for(1.0, now) == 0.0

    def charge(self, relay: str, now: float) -> None:
        self._bucket(relay, now).take(1.0, now)

    def __len__(self) -> int:
        return len(self._buckets)


class AdIntake:
    """What the gossip validator asks before an ad is accepted (and forwarded): a new peer
    id is charged to the peer that relayed it, and refused over its budget or when the
    table has no room; an ad for a model id whose block count we know (`known_blocks`: the
    model we serve) must carry that count. `screen` runs before the signature check (cheap:
    nothing decoded), `admit` after it."""

    def __init__(
        self,
        table: PeerTable,
        budget: RelayBudget,
        known_blocks: Callable[[str], int | None] | None = None,
    ) -> None:
        self.table = table
        self.budget = budget
        self.known_blocks = known_blocks

    def screen(self, relay: str, sender: str, now: float) -> str | None:
        """A reason to drop an ad from `sender` relayed by `relay` unread, or None."""
        if sender in self.table:
            return None
        if not self.budget.allows(relay, now):
            return RELAY_BUDGET
        return None

    def admit(self, relay: str, ad: CapacityAd, now: float) -> str | None:
        """A reason to drop this verified ad, or None (a new peer id is then charged)."""
        if ad.model is not None and ad.n_blocks is not None and self.known_blocks is not None:
            known = self.known_blocks(ad.model)
            if known is not None and known != ad.n_blocks:
                return N_BLOCKS_MISMATCH
        if ad.peer_id in self.table or ad.state == "leaving":
            return None
        if not self.budget.allows(relay, now):
            return RELAY_BUDGET
        if not self.table.has_room(ad.peer_id):
            return TABLE_FULL
        self.budget.charge(relay, now)
        return None
