"""The CLI's contract: exit codes, one-line errors, no tracebacks, config precedence."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from agentproc import Agent, cli

from agent.config import AgentConfig, ConfigError, load_config


def _one_line_error(out, code: int) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.procs
@pytest.mark.parametrize(
    "args, needle",
    [
        (["up", "--no-such-flag"], "unrecognized arguments"),
        (["up", "--log-level", "loud"], "invalid choice"),
        (["up", "--blocks", "5:2"], "blocks"),
        (["up", "--listen", "/ip4/1.2.3/tcp/1"], "listen"),
        (["up", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], "/p2p/"),
        (["up", "--announce-interval", "-1"], "announce_interval"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    line = _one_line_error(
        cli(*args, "--state-dir", str(tmp_path)) if args[0] == "up" else cli(*args), 2
    )
    assert needle in line


@pytest.mark.procs
@pytest.mark.parametrize(
    "text, needle",
    [
        ("colour = 'blue'\n", "unknown config key 'colour'"),
        ("mdns = 'yes'\n", "mdns: expected true or false"),
        ("listen = 5\n", "listen: expected a list"),
        ("[limits]\nmax_sessions = 0\n", "limits.max_sessions"),
        ("[limits]\nmax_session = 3\n", "unknown config key 'limits.max_session'"),
        ("this is not toml", "config file"),
    ],
)
def test_bad_config_file_exits_2(text: str, needle: str, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    line = _one_line_error(cli("up", "--config", str(cfg), "--state-dir", str(tmp_path)), 2)
    assert needle in line


@pytest.mark.procs
def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    line = _one_line_error(cli("up", "--config", str(tmp_path / "nope.toml")), 2)
    assert "not found" in line


def test_config_precedence_defaults_file_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'state-dir = "/tmp/x"\nlog_level = "debug"\nbootstrap = []\nmdns = false\n'
        "[limits]\nmax_sessions = 3\n"
    )
    cfg = load_config(f, {"log_level": "warning", "mdns": None})
    assert cfg.state_dir == Path("/tmp/x")
    assert cfg.log_level == "warning"  # flag beats file
    assert cfg.mdns is False  # file beats default; an absent flag changes nothing
    assert cfg.limits.max_sessions == 3
    assert AgentConfig().mdns is True
    with pytest.raises(ConfigError):
        load_config(None, {"ad_ttl": 1.0, "announce_interval": 5.0})


@pytest.mark.procs
def test_status_without_daemon_exits_1(tmp_path: Path) -> None:
    for cmd in ("status", "peers"):
        line = _one_line_error(cli(cmd, "--control", str(tmp_path / "none.sock")), 1)
        assert "no agent is running" in line
    env_line = _one_line_error(
        cli("status", "--json", env={"SHARDMESH_CONTROL": str(tmp_path / "env.sock")}), 1
    )
    assert "env.sock" in env_line


@pytest.mark.procs
def test_world_readable_identity_key_is_refused(tmp_path: Path) -> None:
    from agent.net.identity import load_or_create_identity

    key = tmp_path / "identity.key"
    load_or_create_identity(key)
    assert (key.stat().st_mode & 0o777) == 0o600
    os.chmod(key, 0o644)
    line = _one_line_error(
        cli("up", "--state-dir", str(tmp_path), "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"), 1
    )
    assert "readable by other users" in line


@pytest.mark.procs
def test_status_cli_is_fast_and_light(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "a").start()
    try:
        t0 = time.monotonic()
        out = cli("status", "--json", "--control", str(agent.control))
        elapsed = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["peer_id"] == agent.peer_id
        assert elapsed < 5  # generous on a loaded CI box; the real bound is checked below
        # Neither torch nor transformers (nor the libp2p stack) is imported by the CLI path.
        probe = cli_probe_imports(["status", "--control", str(agent.control)])
        assert not probe & {"torch", "transformers", "libp2p"}, probe
        out = cli("peers", "--control", str(agent.control))
        assert out.returncode == 0 and "peers seen by" in out.stdout
        out = cli("status", "--control", str(agent.control))
        assert out.returncode == 0 and agent.peer_id in out.stdout
        # A second agent on the same state dir is refused while the first runs.
        line = _one_line_error(
            cli(
                "up",
                "--state-dir",
                str(agent.state_dir),
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ),
            1,
        )
        assert "already running" in line
    finally:
        agent.stop()


def cli_probe_imports(args: list[str]) -> set[str]:
    """Run the CLI in-process in a child interpreter and report heavy modules it imported."""
    code = (
        f"import sys\nfrom agent.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n"
        "    pass\n"
        "print(','.join(m for m in ('torch', 'transformers', 'libp2p') if m in sys.modules))"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return {m for m in last.split(",") if m}


def test_example_config_loads_and_matches_defaults() -> None:
    """The shipped example documents every key, all commented out: it must load as-is."""
    example = Path(__file__).parent.parent / "systemd" / "config.example.toml"
    assert load_config(example, {}) == load_config(None, {})
    text = example.read_text()
    for field in (
        "state_dir",
        "listen",
        "bootstrap",
        "mdns",
        "log_level",
        "announce_interval",
        "ad_ttl",
        "model",
        "blocks",
        "max_blocks",
        "dtype",
        "device",
        "threads",
        "max_sessions",
        "max_session_tokens",
        "kv_budget_tokens",
    ):
        assert f"# {field} =" in text, field


@pytest.mark.procs
def test_generate_config_is_for_the_standalone_client_and_checked_first(tmp_path: Path) -> None:
    """`generate --config FILE` reads the file's [client] table for a standalone client
    (`--bootstrap`); a bad key fails with one line (exit 2) before the mesh is joined."""
    bad = tmp_path / "client.toml"
    bad.write_text("[client]\nstep_timeout = 0\n")
    gen = ["generate", "--model", "m", "--prompt-ids", "1,2", "--config", str(bad)]
    line = _one_line_error(cli(*gen, "--control", str(tmp_path / "none.sock")), 2)
    assert "--config: only with --bootstrap" in line
    standalone = [*gen, "--model-dir", str(tmp_path), "--timeout", "5"]
    boot = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    line = _one_line_error(cli(*standalone, "--bootstrap", boot), 2)
    assert "client.step_timeout: must be positive" in line
