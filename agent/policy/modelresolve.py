"""Finding a model on the mesh by id or by name (no torch: used by the CLI path too)."""

from __future__ import annotations

from agent.errors import ShardmeshError


class UnknownModel(ShardmeshError):
    """No model, or more than one, matches what the user asked for."""


def resolve_model(want: str, models: dict[str, tuple[str | None, int | None]]) -> tuple[str, int]:
    """`models`: model id -> (name, n_blocks), as the peer table reports them.

    An exact id wins; otherwise a name that matches exactly one id."""
    if want in models and models[want][1]:
        return want, int(models[want][1] or 0)
    by_name = [(mid, n) for mid, (name, n) in models.items() if name == want and n]
    if len(by_name) == 1:
        return by_name[0][0], int(by_name[0][1] or 0)
    if len(by_name) > 1:
        ids = ", ".join(sorted(mid for mid, _ in by_name))
        raise UnknownModel(f"model name {want!r} is ambiguous on this mesh: use one of {ids}")
    known = ", ".join(sorted(models)) or "none"
    raise UnknownModel(f"unknown model {want!r}: the mesh serves {known}")
