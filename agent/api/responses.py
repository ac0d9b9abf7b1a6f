"""A generation's HTTP response: it runs inside the response, next to a watch on the
connection, so a client that goes away cancels it; one JSON body or server-sent events; and
what an exception becomes on the wire (OpenAI's error format)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from agent.api.apimodels import Resolved
from agent.api.openai_format import SSE_DONE, ApiError, Reply, Settings, sse
from agent.errors import ShardmeshError

log = logging.getLogger("shardmesh.api")

OnText = Callable[[str], Awaitable[None]]
# Seconds a client is told to wait (Retry-After) before asking again for a model that is
# loading: OpenAI's Python client honours it on its own retries.
LOADING_RETRY_AFTER_S = 10


@dataclass(frozen=True)
class Job:
    chat: bool
    settings: Settings
    prompt: str | tuple[int, ...] | tuple[dict[str, str], ...]  # messages for chat
    model: Resolved
    reply: Reply


@dataclass(frozen=True)
class Outcome:
    text: str
    finish: str
    usage: dict[str, int]
    tail: str  # text not streamed yet (held back for a possible stop sequence)


class JobRunner(Protocol):
    """Runs a job (agent.api.httpapi.ApiServer) and frees its slot when told."""

    async def run(self, job: Job, on_text: OnText | None) -> Outcome: ...

    def release(self) -> None: ...


class GenerationResponse(Response):
    """Runs the generation inside the response, next to a watch on the connection."""

    def __init__(self, server: JobRunner, job: Job, timeout: float) -> None:
        super().__init__(status_code=200)
        self.server = server
        self.job = job
        self.timeout = timeout  # api.request_timeout, named in a 504
        self._released = False

    def _release(self) -> None:
        # As soon as the generation ends, before the last bytes go out: a client that sends
        # its next request on reading them must find the slot free.
        if not self._released:
            self._released = True
            self.server.release()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = SseOut(send)
        gone = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope, gone)
                await self._respond(out)
                nursery.cancel_scope.cancel()
        finally:
            self._release()
        if gone.is_set() and not out.finished:
            log.info("client went away; generation %s cancelled", self.job.reply.id)

    async def _respond(self, out: SseOut) -> None:
        job = self.job
        stream = job.settings.stream
        first = True

        async def on_text(delta: str) -> None:
            nonlocal first
            await out.event(job.reply.chunk(delta, first=first))
            first = False

        try:
            outcome = await self.server.run(job, on_text if stream else None)
        except Exception as exc:
            self._release()
            err = as_api_error(exc, self.timeout)
            if out.started:  # mid-stream: OpenAI's clients raise on an error event
                await out.event(err.body())
                await out.end(b"")
            else:
                await out.json(err.status, err.body(), err.headers)
            return
        self._release()
        if not stream:
            await out.json(200, job.reply.full(outcome.text, outcome.finish, outcome.usage))
            return
        await out.event(job.reply.chunk(outcome.tail, first=first, finish=outcome.finish))
        if job.settings.include_usage:
            await out.event(job.reply.usage_chunk(outcome.usage))
        await out.end(SSE_DONE)


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope, gone: trio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            scope.cancel()
            return


class SseOut:
    """The response's ASGI messages: one JSON body, or server-sent events."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.finished = False

    async def _start(self, status: int, content_type: bytes, extra: list[Any]) -> None:
        headers = [(b"content-type", content_type), (b"cache-control", b"no-cache"), *extra]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True

    async def event(self, obj: dict[str, Any]) -> None:
        if not self.started:
            await self._start(200, b"text/event-stream; charset=utf-8", [])
        await self.send({"type": "http.response.body", "body": sse(obj), "more_body": True})

    async def end(self, last: bytes) -> None:
        self.finished = True
        await self.send({"type": "http.response.body", "body": last, "more_body": False})

    async def json(
        self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(obj).encode()
        extra = [(b"content-length", b"%d" % len(body))]
        extra += [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]
        await self._start(status, b"application/json", extra)
        self.finished = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


def loading_error(message: str) -> ApiError:
    """503 for a model whose blocks are still loading on their peers: retry shortly."""
    return ApiError(
        503,
        message,
        type="server_error",
        code="model_loading",
        headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
    )


def as_api_error(exc: Exception, timeout: float) -> ApiError:
    """What an exception from a generation becomes on the wire."""
    from agent.route.view import GenerationError, ModelLoading

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelLoading):
        return loading_error(str(exc))
    if isinstance(exc, trio.TooSlowError):
        return ApiError(
            504,
            f"the generation did not finish within api.request_timeout ({timeout:g} s)",
            type="server_error",
            code="timeout",
        )
    if isinstance(exc, GenerationError):
        return ApiError(503, str(exc), type="server_error", code="mesh_unavailable")
    if isinstance(exc, ShardmeshError):
        return ApiError(500, str(exc), type="server_error", code="generation_failed")
    log.exception("generation failed")
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")


async def api_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers or None)


async def http_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = ApiError(
        exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
    )
    return JSONResponse(err.body(), err.status, headers=exc.headers)
