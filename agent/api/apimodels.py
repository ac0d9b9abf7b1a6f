"""Which models the HTTP API offers: local checkpoints (for the tokenizer, embeddings and
head) crossed with what the mesh covers right now.

A model is listed when this agent has its checkpoint (`--model` or `api.model_dirs`) and
every block is served by an online peer (`shardmesh.state` "ready"), or the blocks missing are
being loaded by peers that announce themselves joining ("loading": a completion for it waits
up to `[client] loading_wait`, then answers 503 with Retry-After). Its `id` is the name users
type (the checkpoint directory's name) unless two models on the mesh share that name; then the
full model id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from agent.api.openai_format import ApiError
from agent.config import AgentConfig
from agent.errors import ShardmeshError
from agent.model.modelinfo import ModelError, ModelInfo, read_model_info
from agent.policy.modelresolve import UnknownModel, resolve_model

Models = dict[str, tuple[str | None, int | None]]  # model id -> (name, n_blocks)
# Whether a model (id, n_blocks) is loading on its peers right now (agent.route.loading).
IsLoading = Callable[[str, int], bool]
State = Literal["ready", "loading"]
READY: State = "ready"
LOADING: State = "loading"
log = logging.getLogger("shardmesh.api")


@dataclass(frozen=True)
class Checkpoint:
    info: ModelInfo


@dataclass(frozen=True)
class Resolved:
    api_id: str  # what responses name the model
    checkpoint: Checkpoint
    state: State = READY


def load_checkpoints(cfg: AgentConfig) -> dict[str, Checkpoint]:
    """Read every local checkpoint once (headers only); a bad `api.model_dirs` directory
    stops the start. A bad `--model` does not: the agent stays up and says "load failed"
    (agent.daemon.lifecycle), so the API just has no checkpoint of it."""
    out: dict[str, Checkpoint] = {}
    if cfg.model is not None:
        try:
            info = read_model_info(cfg.model)
            out[info.model_id] = Checkpoint(info)
        except ModelError as exc:
            # The agent's own "load failed" error line says why; this is a note.
            log.info("the API has no checkpoint of --model: %s", exc)
    for d in cfg.api.model_dirs:
        try:
            info = read_model_info(d)
        except ModelError as exc:
            raise ShardmeshError(f"api.model_dirs: {exc}") from None
        out[info.model_id] = Checkpoint(info)
    return out


class ApiModels:
    """Listing and resolution over the node's live view (`known`, `coverage`)."""

    def __init__(
        self,
        checkpoints: dict[str, Checkpoint],
        known: Callable[[], Models],
        coverage: Callable[[], Iterable[dict[str, Any]]],
        loading: IsLoading | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self._known = known
        self._coverage = coverage
        self._loading = loading

    def _all(self) -> Models:
        models = dict(self._known())
        for mid, ck in self.checkpoints.items():
            models.setdefault(mid, (ck.info.name, ck.info.n_blocks))
        return models

    def _covered(self) -> set[str]:
        return {row["model"] for row in self._coverage() if row["complete"]}

    @staticmethod
    def _api_id(model_id: str, models: Models) -> str:
        name = models.get(model_id, (None, None))[0]
        if name and sum(1 for n, _ in models.values() if n == name) == 1:
            return name
        return model_id

    def _state(self, model_id: str, covered: set[str]) -> State | None:
        """ "ready" (every block online), "loading" (peers are loading what is missing), or
        None (the API cannot run it now)."""
        if model_id in covered:
            return READY
        ck = self.checkpoints.get(model_id)
        loading = self._loading
        if ck is not None and loading is not None and loading(model_id, ck.info.n_blocks):
            return LOADING
        return None

    def listed_states(self) -> list[tuple[str, Checkpoint, State]]:
        """(api id, checkpoint, state) for every model the API can run now or once loaded."""
        models = self._all()
        covered = self._covered()
        rows = []
        for m, ck in self.checkpoints.items():
            state = self._state(m, covered)
            if state is not None:
                rows.append((self._api_id(m, models), ck, state))
        return sorted(rows, key=lambda row: row[0])

    def listed(self) -> list[tuple[str, Checkpoint]]:
        """(api id, checkpoint) for every model the API lists (see `listed_states`)."""
        return [(api_id, ck) for api_id, ck, _ in self.listed_states()]

    def resolve(self, want: str) -> Resolved:
        """The model a request names, or the ApiError that explains why it cannot run."""
        models = self._all()
        try:
            model_id, _ = resolve_model(want, models)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), code="model_not_found", param="model") from None
        ck = self.checkpoints.get(model_id)
        if ck is None:
            raise ApiError(
                404,
                f"this agent has no local checkpoint of {model_id} (it needs the tokenizer, "
                "embeddings and head): add its directory to api.model_dirs",
                code="model_not_found",
                param="model",
            )
        state = self._state(model_id, self._covered())
        if state is None:
            raise ApiError(
                503,
                f"model {want!r} is not fully served on the mesh right now: some blocks have "
                "no online peer",
                type="server_error",
                code="model_not_covered",
            )
        # A loading model is accepted: the generation waits for its blocks (bounded).
        return Resolved(self._api_id(model_id, models), ck, state)
