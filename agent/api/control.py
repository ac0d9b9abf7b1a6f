"""The local control API: JSON lines over a Unix socket in the state dir (owner-only).

Request: one JSON object `{"cmd": NAME, ...}` on a line. Reply: one or more JSON lines;
the last has `"event": "result"` (`{"ok": true, "result": ...}`) or `"event": "error"`
(`{"ok": false, "error": "one line"}`, with a `"code"` when the failure has one, e.g.
`"model_loading"`). Streaming commands (generate) send `"event": "token"` lines before the
result, and `"event": "waiting"` lines (`"message"`: one line) while the model's blocks are
still loading on their peers.

The client half uses blocking sockets only, so `shardmesh status` starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from agent.errors import ShardmeshError

MAX_REQUEST_BYTES = 1 << 20
log = logging.getLogger("shardmesh.control")


class ControlError(ShardmeshError):
    """Talking to the daemon failed, or the daemon answered an error; the message is one line
    for the user. `code`: the error line's code, when it had one ("model_loading")."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


# --- client ----------------------------------------------------------------------------------
def request(socket_path: Path, cmd: str, *, timeout: float = 10.0, **args: Any) -> Any:
    """Send one command and return its result (non-streaming)."""
    for event in stream_request(socket_path, cmd, timeout=timeout, **args):
        if event.get("event") == "result":
            return event.get("result")
    raise ControlError("the agent closed the connection without an answer")


def stream_request(
    socket_path: Path, cmd: str, *, timeout: float = 10.0, **args: Any
) -> Iterator[dict[str, Any]]:
    """Yield every reply line; raises ControlError for an error reply or no daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"no agent is running (nothing listens on {socket_path}); start one with "
                "'shardmesh up'"
            ) from None
        except PermissionError:
            raise ControlError(f"permission denied on control socket {socket_path}") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the agent at {socket_path}: {exc}") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reader = sock.makefile("rb")
        while True:
            try:
                # No cap on a reply line: it comes from our own agent over an owner-only
                # socket, and a mesh's peer table may well exceed any fixed size.
                line = reader.readline()
            except TimeoutError:
                raise ControlError(f"the agent did not answer within {timeout:g} s") from None
            if not line:
                raise ControlError("the agent closed the connection without an answer")
            try:
                event = json.loads(line)
            except ValueError:
                raise ControlError("the agent sent a reply that is not JSON") from None
            if not isinstance(event, dict):
                raise ControlError("the agent sent a reply that is not a JSON object")
            if event.get("event") == "error":
                code = event.get("code")
                raise ControlError(
                    str(event.get("error", "unknown error")),
                    code if isinstance(code, str) else None,
                )
            yield event
            if event.get("event") == "result":
                return
    finally:
        sock.close()


# --- server ----------------------------------------------------------------------------------
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Emit = Callable[[dict[str, Any]], Awaitable[None]]
# A streaming handler sends events with `emit` as it goes and returns the final result.
StreamHandler = Callable[[dict[str, Any], Emit], Awaitable[Any]]


class CommandError(Exception):
    """A handler's expected failure: sent to the client as an error line."""


def prepare_socket_path(path: Path) -> None:
    """Refuse to start over a live agent; remove a stale socket left by a crash."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ControlError(f"another agent is already running with control socket {path}")


async def serve_control(
    path: Path,
    handlers: dict[str, Handler],
    stream_handlers: dict[str, StreamHandler],
    *,
    task_status: Any = None,
) -> None:
    import trio

    prepare_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600: only the owner may talk
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(64)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                req = await _read_request(stream)
                cmd = req.get("cmd")
                if cmd in stream_handlers:

                    async def emit(event: dict[str, Any]) -> None:
                        # A token unless the event names its own kind ("waiting").
                        await _send(stream, {"event": "token", **event})

                    result = await stream_handlers[cmd](req, emit)
                elif cmd in handlers:
                    result = await handlers[cmd](req)
                else:
                    raise CommandError(f"unknown command {cmd!r}")
                await _send(stream, {"event": "result", "ok": True, "result": result})
            except (CommandError, ShardmeshError) as exc:
                reply: dict[str, Any] = {"event": "error", "ok": False, "error": str(exc)}
                code = getattr(exc, "code", None)
                if isinstance(code, str):
                    reply["code"] = code
                await _send_quietly(stream, reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the CLI went away (Ctrl-C); what it asked for was cancelled with it
            except Exception as exc:  # a bug must not take the agent down with one request
                log.exception("control command failed")
                await _send_quietly(
                    stream, {"event": "error", "ok": False, "error": f"internal error: {exc!r}"}
                )

    if task_status is not None:
        task_status.started()
    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _read_request(stream: Any) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise CommandError("empty request")
        buf += chunk
        if len(buf) > MAX_REQUEST_BYTES:
            raise CommandError("request too large")
    try:
        req = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise CommandError("request is not JSON") from None
    if not isinstance(req, dict):
        raise CommandError("request must be a JSON object")
    return req


async def _send(stream: Any, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


async def _send_quietly(stream: Any, obj: dict[str, Any]) -> None:
    import trio

    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _send(stream, obj)
