"""Generation requests (from the control socket, the HTTP API or a standalone CLI): load the
client-side parts and tokenizer once, run `agent.route.generate.generate_ids`, stream text."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from agent.config import ClientConfig
from agent.model.modelinfo import ModelError, read_model_info
from agent.model.sampling import SamplingParams
from agent.route.generate import generate_ids
from agent.route.health import PeerHealth
from agent.route.loading import Loading, wait_while_loading
from agent.route.view import GenerationError, MeshView

log = logging.getLogger("shardmesh.generate")
MAX_LOADING_WAIT_S = 86_400.0


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    prompt: str | None
    prompt_ids: list[int] | None
    max_new_tokens: int
    sampling: SamplingParams
    model_dir: Path | None
    # Share of steps verified on independent peers (agent.route.verify); 0: the client
    # config's share ([client] verify, off by default).
    verify: float = 0.0
    verify_tolerance: float | None = None  # None: the client config's
    # Seconds to wait for blocks that peers are still loading (agent.route.loading); None:
    # the client config's ([client] loading_wait). `shardmesh generate` sends its --timeout.
    loading_wait_s: float | None = None

    @classmethod
    def from_json(cls, req: dict[str, Any]) -> GenerateRequest:
        try:
            ids = req.get("prompt_ids")
            if ids is not None and (
                not isinstance(ids, list) or not all(isinstance(i, int) for i in ids)
            ):
                raise ValueError("prompt_ids must be a list of integers")
            if (req.get("prompt") is None) == (ids is None):
                raise ValueError("give exactly one of prompt and prompt_ids")
            max_new = int(req.get("max_new_tokens", 32))
            if not 1 <= max_new <= 100_000:
                raise ValueError("max_new_tokens must be between 1 and 100000")
            sampling = SamplingParams(
                temperature=float(req.get("temperature", 0.0)),
                top_p=float(req.get("top_p", 1.0)),
                seed=int(req.get("seed", 0)),
            )
            model = req.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("model is required")
            verify = float(req.get("verify") or 0.0)
            if not 0.0 <= verify <= 1.0:
                raise ValueError("verify must be a fraction between 0 and 1")
            tol = req.get("verify_tolerance")
            tol = None if tol is None else float(tol)
            if tol is not None and not (tol > 0 and math.isfinite(tol)):
                raise ValueError("verify_tolerance must be a positive number")
            wait = req.get("loading_wait")
            if wait is not None:
                if isinstance(wait, bool) or not isinstance(wait, int | float):
                    wait = math.nan
                wait = float(wait)
                if not 0 <= wait <= MAX_LOADING_WAIT_S:
                    raise ValueError(
                        f"loading_wait must be seconds between 0 and {MAX_LOADING_WAIT_S:g}"
                    )
        except (TypeError, ValueError) as exc:
            raise GenerationError(f"bad generate request: {exc}") from None
        model_dir = req.get("model_dir")
        return cls(
            model=model,
            prompt=req.get("prompt"),
            prompt_ids=ids,
            max_new_tokens=max_new,
            sampling=sampling,
            model_dir=Path(model_dir) if model_dir else None,
            verify=verify,
            verify_tolerance=tol,
            loading_wait_s=wait,
        )


class TextStream:
    """Incremental detokenisation: the text each new token adds (none for a tokenizer-less
    model)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        delta, self.text = full[len(self.text) :], full
        return delta


class ClientParts:
    """Head + tokenizer per checkpoint dir, loaded on first use (imports torch then)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[Any, Any]] = {}
        self._blocks: dict[Path, tuple[str, int]] = {}

    async def n_blocks(self, model_dir: Path, model_id: str) -> int:
        """The checkpoint's block count from its headers (no torch, no model lock: known
        before the head loads, which waits for the lock an agent's own loading blocks hold)."""
        key = model_dir.resolve()
        if key not in self._blocks:
            try:
                info = await trio.to_thread.run_sync(read_model_info, key)
            except ModelError as exc:
                raise GenerationError(str(exc)) from None
            self._blocks[key] = (info.model_id, info.n_blocks)
        found, n = self._blocks[key]
        if found != model_id:
            raise GenerationError(f"the checkpoint at {model_dir} is {found}, not {model_id}")
        return n

    async def get(self, model_dir: Path, model_id: str) -> tuple[Any, Any]:
        key = model_dir.resolve()
        if key not in self._cache:
            self._cache[key] = await trio.to_thread.run_sync(_load_parts, key, model_id)
        head, tok = self._cache[key]
        if head.info.model_id != model_id:
            raise GenerationError(
                f"the checkpoint at {model_dir} is {head.info.model_id}, not {model_id}"
            )
        return head, tok


def _load_parts(model_dir: Path, model_id: str) -> tuple[Any, Any]:
    """In a worker thread, under the lock every model load holds (agent.model.preload)."""
    from agent.model.preload import LOAD_LOCK, import_model_code

    try:
        info = read_model_info(model_dir)
    except ModelError as exc:
        raise GenerationError(str(exc)) from None
    if info.model_id != model_id:
        raise GenerationError(f"the checkpoint at {model_dir} is {info.model_id}, not {model_id}")
    with LOAD_LOCK:
        import_model_code(info.model_type)
        from agent.model.head import ClientHead

        head = ClientHead.load(model_dir, dtype="float32", device="cpu")
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:  # no tokenizer files: ids in, ids out
            log.info("no tokenizer in %s (%s); text output disabled", model_dir, type(exc).__name__)
    return head, tokenizer


def end_token_ids(model_dir: Path, config: Any) -> frozenset[int]:
    """Tokens that end a generation: the model config's eos ids and generation_config.json's,
    which chat models extend (Llama 3 Instruct ends turns with <|eot_id|> there). The CLI,
    the control socket and the HTTP API all stop at the same set."""
    ids: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), _generation_config_eos(model_dir)):
        items = [value] if isinstance(value, int) else value if isinstance(value, list) else []
        ids.update(i for i in items if isinstance(i, int) and not isinstance(i, bool))
    return frozenset(ids)


def _generation_config_eos(model_dir: Path) -> Any:
    try:
        data = json.loads((Path(model_dir) / "generation_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("eos_token_id") if isinstance(data, dict) else None


# Gets {"token_id", "text"} per token; returning True stops the generation early. While the
# model is loading it gets {"event": "waiting", "message": ..., ...} (Loading.to_json) first,
# once and then on every change and every few seconds (its return value is ignored): the
# control socket passes it on as a "waiting" line, the CLI prints its message once.
Emit = Callable[[dict[str, Any]], Awaitable[bool | None]]
WAITING = "waiting"


async def run_generation(
    view: MeshView,
    parts: ClientParts,
    req: GenerateRequest,
    model_id: str,
    model_dir: Path,
    emit: Emit | None,
    *,
    health: PeerHealth | None = None,
    cfg: ClientConfig | None = None,
) -> dict[str, Any]:
    """Run `req` and return its result as JSON. `cfg` is the client's [client] table (the
    defaults when None); the request's `verify` (when above 0) and `verify_tolerance`
    replace the table's.

    A model that is loading is waited for first (agent.route.loading: up to the request's
    `loading_wait`, else the table's), telling `emit` so; then the head loads."""
    cfg = cfg or ClientConfig()

    async def on_wait(loading: Loading) -> None:
        if emit is not None:
            await emit({"event": WAITING, **loading.to_json()})

    wait_s = req.loading_wait_s if req.loading_wait_s is not None else cfg.loading_wait_s
    await wait_while_loading(
        view,
        model_id,
        await parts.n_blocks(model_dir, model_id),
        wait_s,
        on_wait,
        avoid=health.avoid if health is not None else None,
    )
    head, tokenizer = await parts.get(model_dir, model_id)
    if req.prompt is not None:
        if tokenizer is None:
            raise GenerationError(f"no tokenizer in {model_dir}: use --prompt-ids")
        prompt_ids = list(tokenizer(req.prompt)["input_ids"])
    else:
        prompt_ids = list(req.prompt_ids or [])
    text = TextStream(tokenizer)

    async def on_token(token: int) -> bool:
        delta = text.add(token)
        if emit is None:
            return False
        return bool(await emit({"token_id": token, "text": delta}))

    eos = end_token_ids(model_dir, head.config)
    if req.verify > 0:
        cfg = replace(cfg, verify_fraction=req.verify)
    if req.verify_tolerance is not None:
        cfg = replace(cfg, verify_tolerance=req.verify_tolerance)
    result = await generate_ids(
        view,
        head,
        prompt_ids,
        max_new_tokens=req.max_new_tokens,
        sampling=req.sampling,
        eos_token_id=sorted(eos),
        on_token=on_token,
        cfg=cfg,
        health=health,
    )
    if tokenizer is not None:
        result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    out = result.to_json()
    out["prompt_ids"] = prompt_ids
    out["model"] = model_id
    return out
