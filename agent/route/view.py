"""What the routing client is given: its config, the view of the mesh it routes over, and
the agent's own serving part when the client runs inside an agent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

# The [client] table of the config file; defined in the base layer so the CLI and the agent
# read it from a file, and re-exported here, where the client's modules (and tests) import it.
from agent.config import ClientConfig
from agent.errors import ShardmeshError
from agent.policy.snapshot import PeerSpan
from protocol import ErrorReply, OpenSession, SessionOpened, Step, StepResult

if TYPE_CHECKING:
    from libp2p.abc import IHost

    from agent.net.mesh import Mesh

__all__ = ["ClientConfig", "GenerationError", "LocalForward", "MeshView"]


class GenerationError(ShardmeshError):
    """Generation could not complete (no coverage, every replica failed, ...)."""


class LocalForward(Protocol):
    """The hosting agent's own serving part (agent.serve.local.LocalEndpoint): the forward
    protocol's messages without a stream."""

    async def open(self, msg: OpenSession) -> tuple[Any, SessionOpened] | ErrorReply: ...

    async def step(self, session: Any, msg: Step) -> StepResult | ErrorReply: ...

    def close(self, session: Any) -> None: ...


class MeshView(Protocol):
    """What the client needs from whoever hosts it (the agent, or a standalone node)."""

    host: IHost
    mesh: Mesh
    self_id: str
    local: LocalForward | None  # the agent's own blocks, when it serves some

    def spans(self, model_id: str) -> list[PeerSpan]: ...

    def peer_addrs(self, peer_id: str) -> list[str]: ...
