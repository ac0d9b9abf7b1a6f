"""Which models the HTTP API offers: local checkpoints (for the tokenizer, embeddings and
head) crossed with what the mesh covers right now.

A model is listed when every block is served by an online peer and this agent has its
checkpoint (`--model` or `api.model_dirs`). Its `id` is the name users type (the checkpoint
directory's name) unless two models on the mesh share that name; then the full model id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.api.openai_format import ApiError
from agent.config import AgentConfig
from agent.errors import ShardmeshError
from agent.model.modelinfo import ModelError, ModelInfo, read_model_info
from agent.policy.modelresolve import UnknownModel, resolve_model

Models = dict[str, tuple[str | None, int | None]]  # model id -> (name, n_blocks)


@dataclass(frozen=True)
class Checkpoint:
    info: ModelInfo


@dataclass(frozen=True)
class Resolved:
    api_id: str  # what responses name the model
    checkpoint: Checkpoint


def load_checkpoints(cfg: AgentConfig) -> dict[str, Checkpoint]:
    """Read every local checkpoint once (headers only); a bad directory stops the start."""
    dirs = ([cfg.model] if cfg.model is not None else []) + list(cfg.api.model_dirs)
    out: dict[str, Checkpoint] = {}
    for d in dirs:
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
    ) -> None:
        self.checkpoints = checkpoints
        self._known = known
        self._coverage = coverage

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

    def listed(self) -> list[tuple[str, Checkpoint]]:
        """(api id, checkpoint) for every model the API can run right now."""
        models = self._all()
        covered = self._covered()
        rows = [(self._api_id(m, models), ck) for m, ck in self.checkpoints.items() if m in covered]
        return sorted(rows, key=lambda row: row[0])

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
        if model_id not in self._covered():
            raise ApiError(
                503,
                f"model {want!r} is not fully served on the mesh right now: some blocks have "
                "no online peer",
                type="server_error",
                code="model_not_covered",
            )
        return Resolved(self._api_id(model_id, models), ck)
