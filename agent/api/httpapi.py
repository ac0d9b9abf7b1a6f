"""The OpenAI-compatible HTTP API and Prometheus `/metrics`, served by hypercorn on the
agent's own trio loop (a task in the agent's nursery, like the control socket).

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
GET /metrics. Generations run through the same client path as `shardmesh generate`
(agent.route.generation.run_generation), so equal settings give equal tokens. Each generation
watches its connection: a client that goes away cancels it, and the route's hop sessions
close at once instead of running to max_tokens.

A model whose blocks peers are still loading is listed with `shardmesh.state` "loading"; a
completion for it waits up to `[client] loading_wait` (within `api.request_timeout`) for the
blocks, then runs, or answers 503 `model_loading` with a Retry-After header.

Starlette does routing and request parsing; a generation writes its own ASGI messages, so
the disconnect watch, the stream and its errors live in one nursery.

In front of every route (`_Front`, docs/SECURITY.md): the Host header must name the API
(`HostNames`: api.listen, localhost on loopback, api.server_names), else 421, so a web page
whose name was rebound to 127.0.0.1 gets nothing; then the bearer key, where keys are set.
A POST body must say it is JSON (`Content-Type: application/json`), else 415: a browser
sends a cross-site form or `text/plain` POST without asking, never a JSON one.

The API knows the agent only through `ApiNode` (the daemon's Node provides it): agent.api
never imports the daemon.
"""

from __future__ import annotations

import errno
import json
import logging
import secrets
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from agent.api.apikeys import check_bearer, load_api_keys
from agent.api.apimodels import ApiModels, Checkpoint, Models, load_checkpoints
from agent.api.guards import HostNames, check_json_type
from agent.api.metrics import CONTENT_TYPE, ApiMetrics, MetricsSource
from agent.api.openai_format import (
    ApiError,
    Reply,
    Settings,
    StopText,
    bad_request,
    completion_budget,
    finish_reason,
    model_entry,
    model_list,
    parse_chat,
    parse_completion,
    usage,
)
from agent.api.responses import (
    GenerationResponse,
    Job,
    OnText,
    Outcome,
    api_error_response,
    http_error_response,
)
from agent.config import AgentConfig, ApiConfig, ClientConfig, api_address
from agent.errors import ShardmeshError
from agent.route.loading import loading_now, wait_while_loading
from agent.route.view import MeshView, ModelPeer

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from agent.route.generation import ClientParts
    from agent.route.health import PeerHealth

log = logging.getLogger("shardmesh.api")
MAX_BODY_BYTES = 8 * 1024 * 1024
# Paths counted under their own label in shardmesh_api_requests; anything else is "other".
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics")


class ApiNode(MeshView, MetricsSource, Protocol):
    """What the API reads of the agent: the mesh view its generations route over, the head
    cache and failure history shared with the control socket's `generate`, the models known
    on the mesh and their coverage, and what /metrics shows."""

    def client_state(self) -> tuple[ClientParts, PeerHealth]: ...

    def failovers(self) -> int: ...

    def known_models(self) -> Models: ...

    def model_peers(self, model_id: str) -> list[ModelPeer]: ...


class ApiServer:
    def __init__(
        self,
        node: ApiNode,
        cfg: ApiConfig,
        session_tokens: int,
        keys: frozenset[str],
        checkpoints: dict[str, Checkpoint],
        client: ClientConfig | None = None,
    ):
        self.node = node
        self.cfg = cfg
        self.client = client or ClientConfig()  # the agent's [client] table
        self.session_tokens = session_tokens  # limits.max_session_tokens: peers usually share it
        if cfg.require_key and not keys:  # validation refuses this config; never serve it
            raise ShardmeshError("api.require_key: no bearer keys: set api.key_file")
        self.keys = keys
        self.hosts = HostNames(cfg)  # serve_api sets the bound port when api.listen asks for 0
        self.models = ApiModels(checkpoints, node.known_models, node.coverage, self._is_loading)
        self.metrics = ApiMetrics(node, self._failovers)
        self.in_flight = 0
        self.started = int(time.time())
        routes = [
            Route("/v1/models", self._list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self._get_model, methods=["GET"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/metrics", self._metrics, methods=["GET"]),
        ]
        handlers: Any = {ApiError: api_error_response, HTTPException: http_error_response}
        self.app = _Front(self, Starlette(routes=routes, exception_handlers=handlers))

    # --- plain endpoints --------------------------------------------------------------------
    def _is_loading(self, model_id: str, n_blocks: int) -> bool:
        return loading_now(self.node, model_id, 0, n_blocks) is not None

    def _entry(self, api_id: str, ck: Checkpoint, state: str) -> dict[str, Any]:
        info = ck.info
        detail: dict[str, Any] = {"model_id": info.model_id, "n_blocks": info.n_blocks}
        detail["state"] = state
        if state == "loading":
            loading = loading_now(self.node, info.model_id, 0, info.n_blocks)
            if loading is not None:
                detail["loading"] = loading.to_json()
        return model_entry(api_id, self.started, {"shardmesh": detail})

    async def _list_models(self, request: Request) -> Response:
        rows = self.models.listed_states()
        return JSONResponse(model_list([self._entry(i, ck, st) for i, ck, st in rows]))

    async def _get_model(self, request: Request) -> Response:
        want = request.path_params["model"]
        for api_id, ck, state in self.models.listed_states():
            if want in (api_id, ck.info.model_id):
                return JSONResponse(self._entry(api_id, ck, state))
        raise ApiError(404, f"model {want!r} is not available", code="model_not_found")

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # --- generations -------------------------------------------------------------------------
    async def _chat(self, request: Request) -> Response:
        req = parse_chat(await _read_json(request))
        return self._accept(True, req.settings, req.messages)

    async def _completions(self, request: Request) -> Response:
        req = parse_completion(await _read_json(request))
        return self._accept(False, req.settings, req.prompt)

    def _accept(self, chat: bool, settings: Settings, prompt: Any) -> Response:
        model = self.models.resolve(settings.model)
        if self.in_flight >= self.cfg.max_concurrent:
            raise ApiError(
                429,
                f"this agent is running {self.in_flight} generations, its limit "
                "(api.max_concurrent); retry later",
                type="rate_limit_error",
                code="overloaded",
            )
        self.in_flight += 1  # released by GenerationResponse when the generation ends
        self.metrics.in_flight.set(self.in_flight)
        reply = Reply(
            chat=chat,
            id=("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
            created=int(time.time()),
            model=model.api_id,
            fingerprint="shardmesh-" + model.checkpoint.info.model_id.rpartition("@")[2],
        )
        job = Job(chat, settings, prompt, model, reply)
        return GenerationResponse(self, job, self.cfg.request_timeout)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    def _client_state(self) -> tuple[ClientParts, PeerHealth]:
        # The same head cache and failure history as the control socket's `generate`:
        # one head per checkpoint in memory, whichever way a request came.
        return self.node.client_state()

    def _failovers(self) -> int:
        return self.node.failovers()

    async def run(self, job: Job, on_text: OnText | None) -> Outcome:
        """Generate for `job`; `on_text` gets each token's new text (streaming)."""
        with trio.fail_after(self.cfg.request_timeout):
            return await self._run(job, on_text)

    async def _run(self, job: Job, on_text: OnText | None) -> Outcome:
        from agent.model.sampling import SamplingParams
        from agent.route.generation import GenerateRequest, end_token_ids, run_generation

        parts, health = self._client_state()
        info = job.model.checkpoint.info
        # Before the head: its load waits for the model lock this agent's own loading blocks
        # hold. Bounded by [client] loading_wait and, with a margin, api.request_timeout.
        await wait_while_loading(
            self.node, info.model_id, info.n_blocks, self.client.loading_wait_s, avoid=health.avoid
        )
        head, tok = await parts.get(info.path, info.model_id)
        prompt_ids = _prompt_ids(job, tok, head.info.vocab_size)
        context = _context(head.config, self.session_tokens)
        max_new = completion_budget(job.settings.max_tokens, job.chat, len(prompt_ids), context)
        eos = end_token_ids(info.path, head.config)  # what run_generation stops at
        stops = StopText(job.settings.stop)
        released: list[str] = []

        async def emit(event: dict[str, Any]) -> bool:
            if "token_id" not in event:  # "waiting" while the blocks load: nothing to send
                return False
            delta = stops.add(event["text"])
            if on_text is not None:
                released.append(delta)
                await on_text(delta)
            return stops.hit

        s = job.settings
        seed = s.seed if s.seed is not None else secrets.randbelow(2**63)
        request = GenerateRequest(
            model=info.model_id,
            prompt=None,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=seed),
            model_dir=info.path,
        )
        out = await run_generation(
            self.node, parts, request, info.model_id, info.path, emit,
            health=health, cfg=self.client,
        )  # fmt: skip
        text = stops.text if stops.hit else (out.get("text") or "")
        sent = "".join(released)
        counts = usage(len(prompt_ids), len(out["token_ids"]))
        self.metrics.count_tokens(counts)
        return Outcome(
            text=text,
            finish=finish_reason(out["token_ids"], eos, stops.hit, max_new),
            usage=counts,
            tail=text[len(sent) :] if text.startswith(sent) else "",
        )


def _prompt_ids(job: Job, tok: Any, vocab: int) -> list[int]:
    if isinstance(job.prompt, tuple) and job.prompt and isinstance(job.prompt[0], int):
        ids = list(job.prompt)
        if not all(0 <= t < vocab for t in ids):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids
    if tok is None:
        raise bad_request(
            f"{job.model.api_id} has no tokenizer here: send the prompt as token ids",
            param="prompt",
        )
    if job.chat:
        if not getattr(tok, "chat_template", None):
            raise bad_request(
                f"{job.model.api_id} has no chat template: use /v1/completions",
                param="messages",
            )
        try:
            text = tok.apply_chat_template(
                list(job.prompt), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # the template's own checks (role order, ...) end up here
            raise bad_request(
                f"the chat template refused the messages: {exc}", "messages"
            ) from None
        # The template writes the special tokens (BOS, ...) itself.
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tok(job.prompt)["input_ids"])  # as `shardmesh generate --prompt` does
    if not ids:
        raise bad_request("the prompt is empty", param="messages" if job.chat else "prompt")
    return ids


def _context(config: Any, session_limit: int) -> int:
    """Tokens one session may hold: the model's positions, and this agent's session limit
    (peers usually share it; past it a hop refuses the session)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return min(int(positions), session_limit) if positions else session_limit


async def _read_json(request: Request) -> Any:
    check_json_type(request.headers.get("content-type"))  # before a byte of the body is read
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


# --- ASGI pieces -------------------------------------------------------------------------------
class _Front:
    """Host check, bearer-key check and request counting in front of every route."""

    def __init__(self, server: ApiServer, app: Starlette) -> None:
        self.server = server
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = "/v1/models" if path.startswith("/v1/models/") else path
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = Headers(scope=scope)
            refused = self.server.hosts.refusal(headers.getlist("host"))
            if refused is not None:
                response = JSONResponse(refused.body(), refused.status)
                await response(scope, receive, counting_send)
                return
            keys = self.server.keys
            if keys and not check_bearer(headers.get("authorization"), keys):
                err = ApiError(
                    401,
                    "a valid API key is required (Authorization: Bearer KEY)",
                    code="invalid_api_key",
                )
                response = JSONResponse(
                    err.body(), err.status, headers={"www-authenticate": "Bearer"}
                )
                await response(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            label = endpoint if endpoint in ENDPOINTS else "other"
            self.server.metrics.count_request(label, status)


# --- serving -----------------------------------------------------------------------------------
def check_api_port(api: ApiConfig) -> None:
    """ShardmeshError with one line if api.listen cannot be listened on now (its port in use,
    an address not on this machine): the agent checks before it loads anything. Port 0 (any
    free one) is not checked."""
    from agent.net.mesh import bind_error

    host, port = api_address(api)
    if port:
        exc = bind_error(host, port)
        if exc is not None:
            raise listen_error(api, exc)


def listen_error(api: ApiConfig, exc: OSError) -> ShardmeshError:
    """The one line for an API that cannot listen: a port in use names who holds it."""
    host, port = api_address(api)
    if exc.errno == errno.EADDRINUSE:
        from agent.net.mesh import in_use_by

        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return ShardmeshError(
            f"the API port {where} is in use{in_use_by(port)}; stop it or choose another "
            "--api HOST:PORT (api.listen)"
        )
    return ShardmeshError(f"api.listen: cannot listen on {api.listen}: {exc.strerror or exc}")


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError in `exc` (itself, or a leaf of nested exception groups), if any."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _os_error(sub)
            if found is not None:
                return found
    return None


async def serve_api(
    node: ApiNode, cfg: AgentConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the API until cancelled; `started` gets the URL it listens on. Bad keys, an
    unusable checkpoint or a busy port raise ShardmeshError with one line. `cfg`: the [api]
    table, the session limit, and where the checkpoints are (`model`, `api.model_dirs`)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    api = cfg.api
    host, port = api_address(api)
    keys = load_api_keys(api.key_file) if api.key_file is not None else frozenset()
    checkpoints = await trio.to_thread.run_sync(load_checkpoints, cfg)
    server = ApiServer(node, api, cfg.limits.max_session_tokens, keys, checkpoints, cfg.client)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    quiet = logging.getLogger("shardmesh.api.server")
    quiet.setLevel(logging.WARNING)  # hypercorn's own "Running on ..." says what we say below
    config.errorlog = quiet
    async with trio.open_nursery() as nursery:
        try:
            app = cast("ASGIFramework", server.app)  # Starlette's ASGI types, not hypercorn's
            binds = await nursery.start(partial(serve, app, config))
        except (OSError, BaseExceptionGroup) as exc:  # hypercorn's nurseries wrap its bind's
            bind = _os_error(exc)
            if bind is None:
                raise
            raise listen_error(api, bind) from None
        url = binds[0] if binds else f"http://{config.bind[0]}"
        if port == 0:  # the port hypercorn picked is the one Host headers name
            server.hosts = HostNames(api, int(url.rpartition(":")[2]))
        log.info("API listening on %s%s", url, " (bearer keys required)" if keys else "")
        if not server.hosts.enforced:
            log.info(
                "the API answers to any Host name on %s (bearer keys guard it); list the "
                "names clients use in api.server_names to refuse the others",
                api.listen,
            )
        if not checkpoints:
            log.warning("the API has no local checkpoint to run: set --model or api.model_dirs")
        task_status.started(url)
