"""The control socket without an agent: replies of any size reach the CLI's client, and a
broken reply is one ControlError, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.api.control import ControlError, request, serve_control


async def _serve(path: Path, result: Any, nursery: trio.Nursery) -> None:
    async def handler(req: dict[str, Any]) -> Any:
        return result

    await nursery.start(serve_control, path, {"peers": handler}, {})


async def test_a_reply_larger_than_any_line_cap_arrives(tmp_path: Path) -> None:
    # A big mesh's peer table: several MiB of JSON on one line (the client once capped
    # reply lines at 1 MiB and ended in a traceback).
    table = {"peers": [{"peer_id": f"p{i}", "addrs": ["x" * 200] * 5} for i in range(5000)]}
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await _serve(path, table, nursery)
        got = await trio.to_thread.run_sync(lambda: request(path, "peers", timeout=20))
        nursery.cancel_scope.cancel()
    assert got == table


async def test_a_reply_that_is_not_json_is_one_control_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.sock"
    server = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await server.bind(str(path))
    server.listen(1)

    async def answer_garbage() -> None:
        conn, _ = await server.accept()
        with conn:
            await conn.recv(65536)
            await conn.send(b"this is not json\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_garbage)
        with pytest.raises(ControlError, match="not JSON"):
            await trio.to_thread.run_sync(lambda: request(path, "status", timeout=5))
    server.close()
