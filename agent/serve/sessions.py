"""One forward session: the span it runs, its KV cache and what it reserved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from agent.model.blocks import SessionCache

LOCAL_PEER = "local"  # the agent's own client: its owner, held to the global limits only


@dataclass(eq=False)
class Session:
    id: str
    peer: str
    start: int
    end: int
    max_length: int
    batch: int
    dtype: str
    cache: SessionCache
    reserved_bytes: int  # KV memory reserved, grown a page at a time
    opened: float
    reserved_tokens: int = 0  # tokens (per row) that reservation covers
    steps: int = 0
    stream: Any = None  # the libp2p stream it lives on (None for the agent's own client)
    handler: trio.CancelScope | None = None  # cancels that stream's handler
