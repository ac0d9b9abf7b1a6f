"""One row of the peer table as placement and routing see it: a peer's span of one model.

The mesh layer turns verified capacity ads into these; placement and routing are pure functions over
a sequence of them, so both can be tested without any network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

JOINING = "joining"
ONLINE = "online"
DRAINING = "draining"
LEAVING = "leaving"
# Every state an agent (and its ads) can be in, in lifecycle order.
AGENT_STATES: tuple[str, ...] = (JOINING, ONLINE, DRAINING, LEAVING)
STATES = frozenset(AGENT_STATES)
# Peers whose span counts as a replica when choosing what to serve: online ones, and joining
# ones (about to serve; counting them keeps agents started together from piling up).
SERVING_STATES = frozenset({JOINING, ONLINE})
# Peers that take sessions now: routers pick only these, and the peers table's coverage
# counts only these.
ROUTABLE_STATES = frozenset({ONLINE})


@dataclass(frozen=True)
class PeerSpan:
    """A peer serving blocks [start, end) of a model.

    throughput: advertised blocks*tokens/s, 0 when not measured yet.
    sessions: active inference sessions (load).
    kv_free_tokens: free KV-cache room, in tokens.
    """

    peer_id: str
    start: int
    end: int
    throughput: float
    state: str
    sessions: int
    kv_free_tokens: int

    def __post_init__(self) -> None:
        # Rejected here so that placement and routing never reason about impossible rows.
        if not self.peer_id:
            raise ValueError("peer_id must not be empty")
        if not 0 <= self.start < self.end:
            raise ValueError(
                f"span [{self.start}, {self.end}) of {self.peer_id} is empty or negative"
            )
        if not math.isfinite(self.throughput) or self.throughput < 0:
            raise ValueError(f"throughput of {self.peer_id} must be finite and >= 0")
        if self.state not in STATES:
            raise ValueError(f"unknown state {self.state!r} of {self.peer_id}")
        if self.sessions < 0 or self.kv_free_tokens < 0:
            raise ValueError(f"sessions and kv_free_tokens of {self.peer_id} must be >= 0")

    @property
    def length(self) -> int:
        return self.end - self.start
