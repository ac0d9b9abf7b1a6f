"""What the routing client is given: its config, the view of the mesh it routes over, and
the agent's own serving part when the client runs inside an agent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

# The [client] table of the config file; defined in the base layer so the CLI and the agent
# read it from a file, and re-exported here, where the client's modules (and tests) import it.
from agent.config import ClientConfig
from agent.errors import ShardmeshError
from agent.policy.snapshot import PeerSpan
from protocol import ErrorReply, OpenSession, SessionOpened, Step, StepResult

if TYPE_CHECKING:
    from libp2p.abc import IHost

    from agent.net.mesh import Mesh

__all__ = [
    "ClientConfig",
    "GenerationError",
    "LocalForward",
    "MeshView",
    "ModelLoading",
    "ModelPeer",
    "ModelPeers",
]


class GenerationError(ShardmeshError):
    """Generation could not complete (no coverage, every replica failed, ...)."""


class ModelLoading(GenerationError):
    """The model is not fully served yet, but peers are loading its blocks (they announce
    themselves "joining"), and they did not finish within the caller's wait. The message
    says which peers load which blocks and contains the word "loading"; the HTTP API answers
    503 with a Retry-After header, the CLI one line."""

    code = "model_loading"  # in the control socket's error line and the API's error body


@dataclass(frozen=True)
class ModelPeer:
    """A peer whose ad names a model, whatever its state and whether or not it has chosen
    its blocks yet: what the client tells a user who asked for a model that is loading.

    span: the blocks it claims (None while it is still choosing, or when it serves none);
    reason: what its ad (or this agent's lifecycle) says, e.g. "loading blocks 0:4" or
    "load failed: ...".
    """

    peer_id: str
    state: str
    span: tuple[int, int] | None
    reason: str


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


@runtime_checkable
class ModelPeers(Protocol):
    """A view that can also list every peer naming a model (the agent's Node, the standalone
    client). Optional: a view without it only ever sees online spans, and a model whose
    peers are loading then reads as not served."""

    def model_peers(self, model_id: str) -> list[ModelPeer]: ...
