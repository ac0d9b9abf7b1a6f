"""Per-peer round-trip times and recent failures, shared by every session of one client."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class PeerHealth:
    """Round-trip times seen per peer, and peers that failed recently (avoided a while)."""

    rtt_ms: dict[str, float] = field(default_factory=dict)
    failed_until: dict[str, float] = field(default_factory=dict)
    failovers: int = 0  # failovers over every session using this object (/metrics)

    def observe(self, peer_id: str, ms: float) -> None:
        old = self.rtt_ms.get(peer_id)
        self.rtt_ms[peer_id] = ms if old is None else 0.7 * old + 0.3 * ms

    def mark_failed(self, peer_id: str, cooldown_s: float) -> None:
        self.failed_until[peer_id] = time.monotonic() + cooldown_s

    def avoid(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in self.failed_until.items() if until > now}
