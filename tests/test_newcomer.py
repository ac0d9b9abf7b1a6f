"""A newcomer's first hour (issue 13), in-process: ports in use named with who holds them,
the API on port 0, the identity key's messages, every unknown config key with a guess,
`--blocks` without `--model`, the line auto placement logs before it listens, and the way
out on a second signal. tests/test_newcomer_live.py does the same with real agents."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from agent.api.guards import HostNames
from agent.api.httpapi import check_api_port, serve_api
from agent.config import AgentConfig, ApiConfig, ConfigError, ServeConfig, load_config
from agent.daemon.lifecycle import Lifecycle
from agent.errors import ShardmeshError
from agent.net.identity import IdentityError, load_or_create_identity
from agent.net.mesh import bind_error, check_listen_addrs

NEW_IDENTITY = "delete it to make a new one (a new identity: this agent's peer id changes)"


@contextmanager
def listening(*, reuseport: bool = False) -> Iterator[int]:
    """A TCP port this process listens on (with SO_REUSEPORT, as py-libp2p listens)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


# --- the mesh's listen ports ---------------------------------------------------------------------
def test_a_listen_port_in_use_is_refused_naming_who_holds_it() -> None:
    with listening(reuseport=True) as port:  # py-libp2p itself would share it
        addr = f"/ip4/127.0.0.1/tcp/{port}"
        with pytest.raises(ShardmeshError) as err:
            check_listen_addrs(["/ip4/127.0.0.1/tcp/0", addr])
        line = _one_line(err.value)
        assert f"cannot listen on {addr}: TCP port {port} is in use" in line
        assert f"pid {os.getpid()}" in line and "--listen" in line
        # A wildcard listen on the same port collides too.
        with pytest.raises(ShardmeshError, match=f"TCP port {port} is in use"):
            check_listen_addrs([f"/ip4/0.0.0.0/tcp/{port}"])
    check_listen_addrs([addr])  # free again


def test_port_zero_and_free_ports_pass() -> None:
    check_listen_addrs(["/ip4/127.0.0.1/tcp/0", "/ip4/0.0.0.0/tcp/0"])
    with socket.socket() as sock:  # bound but not listening, and closed: free
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    check_listen_addrs([f"/ip4/127.0.0.1/tcp/{port}"])


def test_an_address_not_on_this_machine_is_one_line() -> None:
    with pytest.raises(ShardmeshError) as err:
        check_listen_addrs(["/ip4/192.0.2.1/tcp/4001"])  # TEST-NET-1: never local
    assert "cannot listen on /ip4/192.0.2.1/tcp/4001: " in _one_line(err.value)


def test_bind_error_says_in_use() -> None:
    with listening() as port:
        exc = bind_error("127.0.0.1", port)
        assert exc is not None and exc.errno == errno.EADDRINUSE
    assert bind_error("127.0.0.1", 0) is None


# --- the API's port ------------------------------------------------------------------------------
class NoModels:
    """An ApiNode with nothing on the mesh: enough for /v1/models."""

    def known_models(self) -> dict[str, Any]:
        return {}

    def coverage(self) -> list[dict[str, Any]]:
        return []


def test_host_names_wait_for_the_bound_port() -> None:
    api = ApiConfig(listen="127.0.0.1:0")
    before = HostNames(api)  # was: ValueError "not a port" at start-up
    assert before.enforced and not before.allows("127.0.0.1:0")
    assert not before.allows("localhost")
    after = HostNames(api, 43117)
    assert after.allows("127.0.0.1:43117") and after.allows("localhost:43117")
    named = HostNames(ApiConfig(listen="127.0.0.1:0", server_names=("llm.lan",)))
    assert named.allows("llm.lan") and not named.allows("localhost:80")


def test_check_api_port_names_the_port_and_who_holds_it() -> None:
    check_api_port(ApiConfig(listen="127.0.0.1:0"))
    with listening() as port:
        with pytest.raises(ShardmeshError) as err:
            check_api_port(ApiConfig(listen=f"127.0.0.1:{port}"))
        line = _one_line(err.value)
        assert line.startswith(f"the API port 127.0.0.1:{port} is in use (by ")
        assert f"pid {os.getpid()}" in line


def _get(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


async def test_serve_api_on_port_zero_answers_on_the_bound_port(tmp_path: Path) -> None:
    cfg = AgentConfig(state_dir=tmp_path, api=ApiConfig(listen="127.0.0.1:0"))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_api, NoModels(), cfg)
        port = int(url.rpartition(":")[2])
        assert port != 0
        status = await trio.to_thread.run_sync(_get, f"{url}/v1/models", f"localhost:{port}")
        assert status == 200
        nursery.cancel_scope.cancel()


async def test_serve_api_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with listening() as port:
        cfg = AgentConfig(state_dir=tmp_path, api=ApiConfig(listen=f"127.0.0.1:{port}"))
        with pytest.RaisesGroup(ShardmeshError, flatten_subgroups=True) as group:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_api, NoModels(), cfg)
        (exc,) = _leaves(group.value)
        line = _one_line(exc)
        assert line.startswith(f"the API port 127.0.0.1:{port} is in use")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


# --- the identity key ----------------------------------------------------------------------------
def test_a_directory_at_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.mkdir(mode=0o755)  # was: "accessible to other users (mode 755)"
    with pytest.raises(IdentityError) as err:
        load_or_create_identity(path)
    line = _one_line(err.value)
    assert f"identity key {path} is a directory, not a key file; {NEW_IDENTITY}" == line


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_an_empty_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as err:
        load_or_create_identity(path)
    assert _one_line(err.value) == f"identity key {path} is empty; {NEW_IDENTITY}"


@pytest.mark.parametrize("content", [b"hello world", b"\x08\x00", b"\x08\x01garbage"])
def test_a_file_that_is_no_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as err:  # b"\x08\x00": was "Invalid RSA private key"
        load_or_create_identity(path)
    line = _one_line(err.value)
    assert f"identity key {path} is not a shardmesh identity key (" in line
    assert line.endswith(NEW_IDENTITY) and "RSA private key" not in line


def test_a_key_of_another_type(tmp_path: Path) -> None:
    from libp2p.crypto.secp256k1 import create_new_key_pair

    path = tmp_path / "identity.key"
    path.write_bytes(create_new_key_pair().private_key.serialize())
    path.chmod(0o600)
    with pytest.raises(IdentityError) as err:
        load_or_create_identity(path)
    line = _one_line(err.value)
    assert "is not a shardmesh identity key (its key type is Secp256k1, not Ed25519)" in line
    path.unlink()  # what the message says to do works: a new identity
    load_or_create_identity(path)


# --- the config ----------------------------------------------------------------------------------
def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_every_unknown_key_is_named_with_a_guess(tmp_path: Path) -> None:
    text = (
        'annouce_interval = 1.0\ncolour = "blue"\nmax_sessions = 3\n'
        '[api]\nlisen = "127.0.0.1:8080"\n[limits]\nmax_session = 3\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, text), {})
    line = _one_line(err.value)
    assert line.startswith("unknown config keys ")
    for part in (
        "'annouce_interval' (did you mean 'announce_interval'?)",
        "'colour', ",
        "'max_sessions' (did you mean 'limits.max_sessions'?)",  # a key of another table
        "'api.lisen' (did you mean 'api.listen'?)",
        "'limits.max_session' (did you mean 'limits.max_sessions'?)",
    ):
        assert part in line, part
    assert "'colour' (" not in line  # nothing close: no guess


def test_one_unknown_key_and_a_misspelt_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, "[lmits]\nmax_sessions = 3\n"), {})
    assert _one_line(err.value) == "unknown config key 'lmits' (did you mean 'limits'?)"


def test_blocks_without_a_model_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"blocks": "0:10", "state_dir": tmp_path})
    line = _one_line(err.value)
    assert line.startswith("blocks: 0:10 names blocks to serve, but no model is set")
    assert "--model" in line
    assert load_config(None, {"state_dir": tmp_path}).blocks == "auto"  # the default is fine
    with pytest.raises(ConfigError, match="blocks: expected"):  # a bad span says so first
        load_config(None, {"blocks": "5:2", "state_dir": tmp_path})


def test_the_cli_exits_2_for_blocks_without_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli.main import main

    assert main(["up", "--blocks", "0:10", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no model is set" in err


# --- auto placement says that it listens ----------------------------------------------------------
class FakeHost:
    peer_id = "12D3KooWselfselfselfselfselfselfselfselfselfself"

    def spans_for(self, model_id: str) -> list[Any]:
        return []

    async def publish_ad(self, state: str | None = None) -> None:
        return None


async def test_auto_placement_logs_how_long_it_listens(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from agent.serve import placing

    monkeypatch.setattr(placing, "block_param_bytes", lambda info, dtype: 1)
    monkeypatch.setattr(placing, "weights_budget", lambda device: 100)
    info: Any = SimpleNamespace(name="tiny-llama", model_id="tiny-llama@abc", n_blocks=6)
    cfg = ServeConfig(announce_interval=0.02)
    announced: list[tuple[int, int]] = []

    async def announce(host: Any, span: tuple[int, int]) -> None:
        announced.append(span)

    caplog.set_level(logging.INFO, logger="shardmesh.serving")
    host: Any = FakeHost()
    span = await placing.auto_place(host, cfg, info, "cpu", announce)
    assert span == (0, 6) and announced == [(0, 6)]
    first = caplog.records[0].getMessage()
    assert first.startswith("choosing blocks of tiny-llama: listening to the mesh for ")
    assert "s first (--blocks START:END skips this)" in first


# --- the way out: a further signal once leaving ends it now -------------------------------------
class SlowPublisher:
    """Its ads take their time: the leaving ad's wait is what a second signal cuts."""

    async def publish_ad(self, state: str | None = None) -> None:
        await trio.sleep(10)


async def test_a_second_signal_while_leaving_exits_at_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.daemon import node as node_mod

    monkeypatch.setattr(node_mod.service, "notify_stopping", lambda why: None)  # a global

    node = SimpleNamespace(
        lifecycle=Lifecycle(SlowPublisher()), cfg=AgentConfig(state_dir=Path("/nonexistent"))
    )
    send, signals = trio.open_memory_channel[int](8)
    leaving = trio.Event()
    caplog.set_level(logging.INFO, logger="shardmesh.agent")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node_mod._leave_on_signal, signals, node, scope, leaving)
            await send.send(signal.SIGINT)
            await leaving.wait()
            await trio.sleep(0.2)  # leaving: the ad's wait (up to 1.5 s) has begun
            assert node.lifecycle.state == "leaving" and not scope.cancel_called
            t0 = time.monotonic()
            await send.send(signal.SIGINT)
            await trio.sleep_forever()  # until _leave_on_signal cancels the scope
    assert scope.cancel_called and time.monotonic() - t0 < 0.5
    assert "received SIGINT again: exiting now" in caplog.text
