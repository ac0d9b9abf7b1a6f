"""What the serving part needs from the agent that runs it (the daemon's Node provides it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent.hw.devices import DeviceReport
from agent.policy.snapshot import PeerSpan


class ServingHost(Protocol):
    """What the serving part needs from the agent that runs it."""

    @property
    def peer_id(self) -> str: ...

    def spans_for(self, model_id: str) -> list[PeerSpan]: ...

    def devices(self) -> DeviceReport | None: ...

    def set_stream_handler(
        self, protocol_id: str, handler: Callable[[Any], Awaitable[None]]
    ) -> None: ...

    async def publish_ad(self, state: str | None = None) -> None: ...
