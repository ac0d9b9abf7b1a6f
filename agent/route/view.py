"""What the routing client is given: its config, the view of the mesh it routes over, and
the agent's own serving part when the client runs inside an agent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import ShardmeshError
from agent.policy.snapshot import PeerSpan
from protocol import ErrorReply, OpenSession, SessionOpened, Step, StepResult

if TYPE_CHECKING:
    from libp2p.abc import IHost

    from agent.net.mesh import Mesh


class GenerationError(ShardmeshError):
    """Generation could not complete (no coverage, every replica failed, ...)."""


@dataclass(frozen=True)
class ClientConfig:
    step_timeout_s: float = 30.0
    open_timeout_s: float = 10.0
    max_failovers: int = 6
    failed_peer_cooldown_s: float = 60.0
    reroute_wait_s: float = 10.0  # how long to wait for a replacement to appear in the table
    wire_dtype: str = "float32"
    max_chunk_bytes: int = 16 * 1024 * 1024  # prefill/replay chunks stay well under frames
    # Verified outputs (agent.verify): the share of steps each hop also runs on a witness
    # (0 = off, 1 = every step), the per-row relative error still counted as agreement
    # (absorbs bf16/fp16 vs fp32 peers), and the seed of the step draw (None: from the OS,
    # so a peer cannot know which steps are checked; set it only to reproduce a run).
    verify_fraction: float = 0.0
    verify_tolerance: float = 0.05
    verify_seed: int | None = None


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


