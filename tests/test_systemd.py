"""Running under systemd: the notify protocol (against a real datagram socket and real agent
processes), journald-friendly logging, the unit's verification and security score, and the
installer into a temporary root."""

from __future__ import annotations

import configparser
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from agentproc import Agent, free_port

from agent import config
from agent.config import paths as config_paths
from agent.daemon import logs, sdnotify, service
from agent.daemon.service import status_line

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "shardmesh.service"
INSTALL = REPO / "scripts" / "install.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


# --- a notify socket, as systemd would listen on ---------------------------------------------
class NotifyListener:
    """Binds an AF_UNIX datagram socket; a thread stamps each message on arrival and keeps
    (time, {key: value}) in `messages`."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))

    def wait_for(
        self, pred: Callable[[dict[str, str]], bool], timeout: float, what: str
    ) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            for t, m in list(self.messages):
                if pred(m):
                    return t, m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} in {timeout:g} s; got {self.messages[-5:]!r}")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path):
    lst = NotifyListener(str(tmp_path / "notify.sock"))
    yield lst
    lst.close()


# --- Notifier ------------------------------------------------------------------------------------
def test_notifier_sends_each_message_as_one_datagram(listener: NotifyListener) -> None:
    n = sdnotify.Notifier({"NOTIFY_SOCKET": listener.address})
    assert n.enabled
    assert n.ready("online: serving\nblocks 0:4")
    assert n.watchdog()
    assert n.stopping("stopping: received SIGTERM")
    assert n.status("draining")
    listener.wait_for(lambda m: m.get("STATUS") == "draining", 5, "the last message")
    got = [m for _, m in listener.messages]
    assert got == [
        {"READY": "1", "STATUS": "online: serving blocks 0:4"},  # one line, never two fields
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "stopping: received SIGTERM"},
        {"STATUS": "draining"},
    ]
    n.close()


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"@shardmesh-test-{os.getpid()}-{time.monotonic_ns()}"
    lst = NotifyListener(name)
    try:
        assert sdnotify.Notifier({"NOTIFY_SOCKET": name}).ready()
        assert lst.wait_for(lambda m: True, 5, "READY=1")[1] == {"READY": "1"}
    finally:
        lst.close()


def test_notifier_is_a_no_op_outside_systemd() -> None:
    n = sdnotify.Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    assert not n.ready() and not n.watchdog() and not n.stopping()


def test_a_failed_send_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with caplog.at_level(logging.WARNING, "shardmesh.sdnotify"):
        assert not n.ready()
        assert not n.watchdog()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_a_non_unix_notify_socket_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "shardmesh.sdnotify"):
        n = sdnotify.Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and "not a Unix socket" in caplog.text


@pytest.mark.parametrize(
    "env, interval",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),  # ping at half the timeout
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert sdnotify.Notifier(env).watchdog_interval == interval


@pytest.mark.parametrize(
    "value, timeout, grace30",
    [
        ("45", 45.0, 30.0),  # room for the whole grace and the margin
        ("20", 20.0, 15.0),  # grace cut to end STOP_MARGIN_S before SIGKILL
        ("3", 3.0, 0.0),
        ("infinity", None, 30.0),
        ("", None, 30.0),
        ("1min", None, 30.0),  # not a number of seconds: ignored, not guessed
    ],
)
def test_stop_timeout_bounds_the_drain_grace(
    value: str, timeout: float | None, grace30: float
) -> None:
    env = {sdnotify.STOP_TIMEOUT_ENV: value}
    assert sdnotify.stop_timeout_s(env) == timeout
    assert sdnotify.bounded_grace(30.0, env) == grace30


def test_status_line_reads_well() -> None:
    status = {
        "state": "online",
        "reason": "serving blocks 0:4 of tiny-llama",
        "known_peers": 3,
        "connected_peers": 2,
        "sessions": 1,
    }
    assert status_line(status) == (
        "online: serving blocks 0:4 of tiny-llama; 3 peers (2 connected); 1 session"
    )
    quiet = {"state": "joining", "reason": "", "known_peers": 1, "connected_peers": 1}
    assert status_line(quiet) == "joining; 1 peer; 0 sessions"
    assert status_line(quiet, joined=False).endswith("; no bootstrap peer reached yet")


class FakeNode:
    """What agent.service reads of a Node (service.Supervised)."""

    def __init__(self, bootstrap_wait: float) -> None:
        self.bootstrap_wait = bootstrap_wait
        self.started = time.monotonic()
        self.joined = trio.Event()

    def status(self) -> dict[str, object]:
        return {"state": "online", "reason": "test", "known_peers": 0, "connected_peers": 0}


@pytest.fixture
def sd(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> NotifyListener:
    """The process-wide notifier pointed at the listener, for agent.service in this process."""
    monkeypatch.setattr(
        sdnotify, "_default", sdnotify.Notifier({"NOTIFY_SOCKET": listener.address})
    )
    monkeypatch.setattr(service, "_stopping", False)
    return listener


async def test_ready_as_soon_as_a_bootstrap_peer_answers(sd: NotifyListener) -> None:
    node = FakeNode(bootstrap_wait=30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.announce_ready, node)
        await trio.sleep(0.3)
        assert not sd.messages  # still waiting for the mesh
        node.joined.set()
    sd.wait_for(lambda m: m.get("READY") == "1", 5, "READY=1")
    assert sd.messages[0][1]["STATUS"] == "online: test; 0 peers; 0 sessions"


async def test_ready_after_bootstrap_wait_runs_out(
    sd: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    node = FakeNode(bootstrap_wait=0.5)
    t0 = time.monotonic()
    await service.announce_ready(node)
    assert time.monotonic() - t0 >= 0.45
    _, ready = sd.wait_for(lambda m: m.get("READY") == "1", 5, "READY=1")
    assert ready["STATUS"].endswith("no bootstrap peer reached yet")
    assert "no bootstrap peer answered in 0.5 s; ready without them" in caplog.text


async def test_no_ready_once_stopping(sd: NotifyListener) -> None:
    node = FakeNode(bootstrap_wait=0.2)
    service.notify_stopping("received SIGTERM")
    await service.announce_ready(node)  # the wait ran out while the agent was stopping
    sd.wait_for(lambda m: m.get("STOPPING") == "1", 5, "STOPPING=1")
    await trio.sleep(0.2)
    assert [m for _, m in sd.messages] == [
        {"STOPPING": "1", "STATUS": "stopping: received SIGTERM"}
    ]


# --- logging ---------------------------------------------------------------------------------
def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("shardmesh.agent", level, __file__, 1, msg, (), exc_info)


@pytest.mark.parametrize(
    "level, prio",
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (logging.INFO + 5, 6),
        (1, 7),
    ],
)
def test_syslog_priority(level: int, prio: int) -> None:
    assert logs.syslog_priority(level) == prio


def test_journal_format_prefixes_every_line_and_has_no_timestamp() -> None:
    fmt = logs.make_formatter(json_lines=False, journal=True)
    assert fmt.format(_record(logging.WARNING, "peer left")) == (
        "<4>WARNING shardmesh.agent: peer left"
    )
    lines = fmt.format(_record(logging.ERROR, "failed", exc=True)).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_terminal_format_has_a_timestamp_and_json_is_unchanged() -> None:
    line = logs.make_formatter(json_lines=False, journal=False).format(
        _record(logging.INFO, "agent online")
    )
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO shardmesh.agent: agent online", line)
    obj = json.loads(
        logs.make_formatter(json_lines=True, journal=True).format(_record(logging.INFO, "hi"))
    )
    assert obj["level"] == "info" and obj["msg"] == "hi" and obj["logger"] == "shardmesh.agent"


def test_journal_is_detected_by_the_stream_not_the_variable(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        ident = f"{st.st_dev}:{st.st_ino}"
        assert logs.stream_is_journal(a, ident)
        assert not logs.stream_is_journal(b, ident)  # a terminal that inherited the variable
        assert not logs.stream_is_journal(a, None)
        assert not logs.stream_is_journal(a, "junk")


@pytest.mark.parametrize("journal", [True, False])
def test_setup_logging_in_a_process(tmp_path: Path, journal: bool) -> None:
    """What a process writes to stderr with and without stderr being the journal."""
    err = tmp_path / "stderr"
    code = (
        "import logging; from agent.daemon.logs import setup_logging; setup_logging('info'); "
        "logging.getLogger('shardmesh.agent').warning('no bootstrap peer answered')"
    )
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else ""}
        subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, cwd=REPO)
    out = err.read_text()
    if journal:
        assert out == "<4>WARNING shardmesh.agent: no bootstrap peer answered\n"
    else:
        assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING shardmesh.agent: no bootstrap.*\n", out)


@pytest.mark.procs
def test_a_failed_start_is_an_error_in_the_journal(tmp_path: Path) -> None:
    """The CLI's one-line failure (here: a missing config file) carries priority <3> when
    stderr is the journal, so `journalctl -p err` shows why the service did not start."""
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        cmd = [sys.executable, "-m", "agent.cli", "up", "--config", str(tmp_path / "none.toml")]
        code = subprocess.run(cmd, stderr=f, env=env, cwd=REPO, timeout=60).returncode
    assert code == 2
    assert err.read_text().startswith("<3>shardmesh: error: config file not found")


# --- config ------------------------------------------------------------------------------------
def test_bootstrap_wait_is_configurable(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("bootstrap_wait = 2.5\n")
    assert config.load_config(cfg_file, {}).bootstrap_wait == 2.5
    assert config.AgentConfig().bootstrap_wait == 30.0
    cfg_file.write_text("bootstrap_wait = -1\n")
    with pytest.raises(config.ConfigError, match="bootstrap_wait"):
        config.load_config(cfg_file, {})


def test_the_cli_finds_the_service_socket_when_it_has_no_agent_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service_sock = tmp_path / "run" / "control.sock"
    monkeypatch.setattr(config_paths, "SERVICE_CONTROL_SOCKET", service_sock)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SHARDMESH_CONTROL", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # a user's own default state dir
    own = tmp_path / "state" / "shardmesh" / "control.sock"
    assert config.default_control_socket() == own  # no service running
    service_sock.parent.mkdir()
    service_sock.touch()
    assert config.default_control_socket() == service_sock
    own.parent.mkdir(parents=True)
    own.touch()
    assert config.default_control_socket() == own  # the user's own agent comes first
    monkeypatch.setenv("SHARDMESH_CONTROL", "/x/y.sock")
    assert config.default_control_socket() == Path("/x/y.sock")


# --- real agents on a notify socket -------------------------------------------------------------
def _dead_bootstrap(tmp_path: Path) -> str:
    """A well-formed bootstrap address nobody answers on."""
    from libp2p.peer.id import ID

    from agent.net.identity import load_or_create_identity

    key = load_or_create_identity(tmp_path / "ghost" / "identity.key")
    return f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{ID.from_pubkey(key.public_key).to_base58()}"


def _stop_and_expect_stopping(agent: Agent, listener: NotifyListener) -> None:
    agent.signal(signal.SIGTERM)
    listener.wait_for(lambda m: m.get("STOPPING") == "1", 15, "STOPPING=1")
    assert agent.wait(30) == 0, agent.log()


@pytest.mark.procs
def test_ready_waits_for_bootstrap_then_watchdog_and_stopping(
    tmp_path: Path, listener: NotifyListener
) -> None:
    """No model, a bootstrap peer that never answers: READY=1 after bootstrap_wait, said so
    in the log; WATCHDOG=1 at half of WATCHDOG_USEC; STOPPING=1 on SIGTERM, exit 0."""
    wait_s = 3.0
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"bootstrap_wait = {wait_s}\n")
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "2000000"}
    args = ["--config", str(cfg), "--bootstrap", _dead_bootstrap(tmp_path)]
    agent = Agent(tmp_path / "a", args, env=env)
    t0 = time.monotonic()
    agent.launch()
    try:
        t_first, _ = listener.wait_for(lambda m: True, 60, "a first notification")
        t_ready, ready = listener.wait_for(lambda m: m.get("READY") == "1", 60, "READY=1")
        # Not ready before bootstrap_wait ran out (counted from the agent's start, which is
        # after our launch and before its first notification).
        assert t_ready - t0 >= wait_s - 0.1
        assert t_ready - t_first >= wait_s - 1.5, (t_first - t0, t_ready - t0)
        assert ready["STATUS"] == (
            "online: no model configured: routing and relaying only; 0 peers; 0 sessions; "
            "no bootstrap peer reached yet"
        )
        assert f"no bootstrap peer answered in {wait_s:g} s; ready without them" in agent.log()
        before = [m for t, m in listener.messages if t < t_ready]
        assert before and all("READY" not in m for m in before)
        assert all(
            m["STATUS"].endswith("no bootstrap peer reached yet") for m in before if "STATUS" in m
        )
        assert agent.status()["state"] == "online"
        # Pings at half the watchdog timeout, never as late as the timeout itself.
        time.sleep(4.5)
        pings = [t for t, m in listener.messages if m.get("WATCHDOG") == "1" and t >= t_ready]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 3, listener.messages
        assert 0.7 <= sorted(gaps)[len(gaps) // 2] <= 1.4, gaps
        assert max(gaps) < 2.0, gaps
        _stop_and_expect_stopping(agent, listener)
    finally:
        agent.kill()


@pytest.mark.procs
def test_sigterm_before_ready_stops_without_ever_saying_ready(
    tmp_path: Path, listener: NotifyListener
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("bootstrap_wait = 60\n")
    env = {"NOTIFY_SOCKET": listener.address}
    args = ["--config", str(cfg), "--bootstrap", _dead_bootstrap(tmp_path)]
    agent = Agent(tmp_path / "a", args, env=env)
    agent.launch()
    try:
        listener.wait_for(lambda m: "STATUS" in m, 60, "a first STATUS=")
        _stop_and_expect_stopping(agent, listener)
        assert not [m for _, m in listener.messages if "READY" in m], listener.messages
    finally:
        agent.kill()


@pytest.mark.procs
def test_ready_only_after_the_blocks_are_loaded(tmp_path: Path, listener: NotifyListener) -> None:
    from agent.model.tiny import ensure_tiny_model

    model = ensure_tiny_model("llama", tmp_path / "models")
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "10000000"}
    args = ["--model", str(model), "--blocks", "0:3", "--threads", "1"]
    agent = Agent(tmp_path / "a", args, env=env)
    agent.launch()
    try:
        _, ready = listener.wait_for(lambda m: m.get("READY") == "1", 120, "READY=1")
        status = agent.status()
        assert status["loaded"] and status["state"] == "online"
        # What systemd shows at READY was computed then: blocks loaded and served.
        assert ready["STATUS"].startswith(f"online: serving blocks 0:3 of {model.name};")
        earlier = [m["STATUS"] for _, m in listener.messages[:-1] if "STATUS" in m]
        # Before READY: "joining" while loading; the status loop may already have said
        # "online" in the moment between the blocks loading and READY going out.
        assert earlier and earlier[0].startswith("joining"), earlier
        assert all(s.startswith("joining") or s == ready["STATUS"] for s in earlier), earlier
        _stop_and_expect_stopping(agent, listener)
    finally:
        agent.kill()


# --- the unit ----------------------------------------------------------------------------------
def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_states_its_stop_timeout_to_the_agent() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    stop = re.fullmatch(r"(\d+)s?", service["TimeoutStopSec"])
    assert stop, "TimeoutStopSec= must be plain seconds so the agent can be told it"
    env = dict(
        item.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if line.startswith("Environment=")
        for item in line.removeprefix("Environment=").split()
    )
    assert float(env[sdnotify.STOP_TIMEOUT_ENV]) == float(stop.group(1))
    assert service["WatchdogSec"] and service["DynamicUser"] == "yes"


def _unit_with_real_exec(tmp_path: Path) -> Path:
    """A copy whose ExecStart= names an executable that exists here (verify checks it)."""
    exe = Path(sys.executable).parent / "shardmesh"
    if not exe.exists():
        exe = Path(shutil.which("true") or "/bin/true")
    copy = tmp_path / "shardmesh.service"
    copy.write_text(UNIT.read_text().replace("/opt/shardmesh/venv/bin/shardmesh", str(exe)))
    return copy


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(_unit_with_real_exec(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        out.stdout + out.stderr
    )


@needs_analyze
def test_systemd_analyze_security_scores_two_or_lower(tmp_path: Path) -> None:
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(_unit_with_real_exec(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for shardmesh\.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.0, out.stdout
    # The README states the score; keep it honest.
    assert f"exposure {match.group(1)}" in (REPO / "README.md").read_text()


# --- the installer -----------------------------------------------------------------------------
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shardmesh as a wheel, built from a copy (no build/ in the checkout) without network."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("agent", "protocol"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [*PIP_WHEEL, "-w", str(root), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return next(root.glob("shardmesh-*.whl"))


def _install(root: Path, wheel: Path, *extra: str) -> list[str]:
    args = ["--root", str(root), "--prefix", "/opt/sm", "--source", str(wheel), "--no-deps"]
    out = subprocess.run(
        ["bash", str(INSTALL), *args, *extra],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.startswith("install: ") for line in lines), out.stdout
    return [line.removeprefix("install: ").replace(str(root), "ROOT") for line in lines]


@pytest.mark.procs
def test_install_into_a_temporary_root(tmp_path: Path, wheel: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = _install(root, wheel)
    assert first[0] == "created venv ROOT/opt/sm/venv"
    assert "wrote ROOT/etc/shardmesh/config.toml from the commented example" in first
    assert "installed ROOT/etc/systemd/system/shardmesh.service" in first
    assert first[-1] == "done"
    venv_cli = root / "opt/sm/venv/bin/shardmesh"
    assert subprocess.run([venv_cli, "--help"], capture_output=True).returncode == 0
    config_file = root / "etc/shardmesh/config.toml"
    assert config_file.read_text() == (REPO / "systemd/config.example.toml").read_text()
    unit = (root / "etc/systemd/system/shardmesh.service").read_text()
    assert "ExecStart=/opt/sm/venv/bin/shardmesh up " in unit and "/opt/shardmesh" not in unit
    assert os.readlink(root / "usr/local/bin/shardmesh") == "/opt/sm/venv/bin/shardmesh"
    # The package came from the given source, and the config file parses.
    assert config.load_config(config_file, {}).bootstrap_wait == 30.0

    # A second run keeps what is there, the admin's config above all.
    config_file.write_text("bootstrap_wait = 5.0\n")
    second = _install(root, wheel)
    assert second[0] == "kept venv ROOT/opt/sm/venv"
    assert "kept existing ROOT/etc/shardmesh/config.toml" in second
    assert "kept ROOT/etc/systemd/system/shardmesh.service (up to date)" in second
    assert "kept ROOT/usr/local/bin/shardmesh -> /opt/sm/venv/bin/shardmesh" in second
    assert config_file.read_text() == "bootstrap_wait = 5.0\n"
    assert _install(root, wheel) == second  # and a third run says the same

    # Uninstall: everything goes but the state dir (and a config with local changes).
    state = root / "var/lib/shardmesh"
    state.mkdir(parents=True)
    (state / "identity.key").write_bytes(b"k")
    (root / "var/cache/shardmesh").mkdir(parents=True)
    gone = _install(root, wheel, "--uninstall")
    assert "kept ROOT/etc/shardmesh/config.toml: it has local changes" in gone
    assert (state / "identity.key").exists()
    for path in ("opt/sm", "etc/systemd/system/shardmesh.service", "var/cache/shardmesh"):
        assert not (root / path).exists(), path
    assert not (root / "usr/local/bin/shardmesh").is_symlink()

    # Uninstalling again is harmless, and an unedited config goes with the rest.
    shutil.copy(REPO / "systemd/config.example.toml", config_file)
    gone = _install(root, wheel, "--uninstall")
    assert "removed ROOT/etc/shardmesh/config.toml (unchanged from the example)" in gone
    assert not (root / "etc/shardmesh").exists() and state.exists()


def test_installer_refuses_bad_arguments(tmp_path: Path) -> None:
    for args, code, text in [
        (["--prefix", "relative/dir"], 1, "absolute path"),
        (["--prefix", "/opt/with space"], 1, "absolute path"),
        (["--bogus"], 2, "unknown option"),
        (["--root", str(tmp_path / "missing")], 1, "not a directory"),
    ]:
        out = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True)
        assert out.returncode == code and text in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


def _percent(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    assert match, f"{value!r}: expected a share of RAM, e.g. 80%"
    return float(match.group(1))


def test_unit_caps_memory_and_tasks() -> None:
    """A peer that fills memory meets the unit's own cap, not the host's OOM killer: a share
    of RAM, with MemoryHigh= (reclaim, slow down) below MemoryMax= (kill in the cgroup; the
    unit restarts); TasksMax= leaves torch's threads headroom (a serving agent runs about two
    threads per torch thread plus a few dozen). The README says how to change them."""
    service = _unit()["Service"]
    high, most = _percent(service["MemoryHigh"]), _percent(service["MemoryMax"])
    assert 50 <= high < most < 100
    assert 256 <= int(service["TasksMax"]) <= 4096
    assert service["Restart"] == "on-failure"  # an agent killed at MemoryMax comes back
    readme = (REPO / "README.md").read_text()
    for key in ("MemoryMax=", "MemoryHigh=", "TasksMax="):
        assert key in readme, key
    assert "systemctl edit shardmesh" in UNIT.read_text()
