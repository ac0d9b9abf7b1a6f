"""The [client] table: file keys and flags, one-line errors naming the key, the example
config, the standalone CLI's client config, and the agent's generations using the table."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    AgentConfig,
    ClientConfig,
    ConfigError,
    load_config,
    section_keys,
)

EXAMPLE = Path(__file__).parent.parent / "systemd" / "config.example.toml"
CLIENT_KEYS = {
    "step_timeout": "step_timeout_s",
    "open_timeout": "open_timeout_s",
    "max_failovers": "max_failovers",
    "failed_peer_cooldown": "failed_peer_cooldown_s",
    "reroute_wait": "reroute_wait_s",
    "loading_wait": "loading_wait_s",
    "wire_dtype": "wire_dtype",
    "max_chunk_bytes": "max_chunk_bytes",
    "verify": "verify_fraction",
    "verify_tolerance": "verify_tolerance",
}


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_client_table_keys_and_defaults() -> None:
    assert section_keys(ClientConfig) == CLIENT_KEYS  # verify_seed is no key: from the OS
    assert AgentConfig().client == ClientConfig()
    assert load_config(None, {}).client == ClientConfig()
    # The routing client's modules (and older tests) import it from agent.route.view.
    from agent.route.view import ClientConfig as RouteClientConfig

    assert RouteClientConfig is ClientConfig


def test_client_table_from_the_file_and_flags_over_it(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "[client]\nstep_timeout = 5\nopen-timeout = 2.5\nmax_failovers = 0\n"
        'reroute_wait = 0.5\nwire_dtype = "bfloat16"\nmax_chunk_bytes = 4096\n'
        "verify = 0.25\nverify_tolerance = 0.1\nfailed_peer_cooldown = 0\n",
    )
    client = load_config(path, {}).client
    assert client == ClientConfig(
        step_timeout_s=5.0,
        open_timeout_s=2.5,
        max_failovers=0,
        failed_peer_cooldown_s=0.0,
        reroute_wait_s=0.5,
        wire_dtype="bfloat16",
        max_chunk_bytes=4096,
        verify_fraction=0.25,
        verify_tolerance=0.1,
    )
    assert isinstance(client.step_timeout_s, float)
    flags = {"client.verify": 0.0, "client.verify_tolerance": None, "client.step_timeout": 9}
    client = load_config(path, flags).client
    assert (client.verify_fraction, client.verify_tolerance, client.step_timeout_s) == (
        0.0,
        0.1,
        9.0,
    )


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[client]\nstep_timeout = 0\n", "client.step_timeout: must be positive"),
        ("[client]\nopen_timeout = -1.0\n", "client.open_timeout: must be positive"),
        ("[client]\nstep_timeout = 'soon'\n", "client.step_timeout: expected a number"),
        ("[client]\nstep_timeout = inf\n", "client.step_timeout: must be positive"),
        ("[client]\nmax_failovers = -1\n", "client.max_failovers: must not be negative"),
        ("[client]\nmax_failovers = 1.5\n", "client.max_failovers: expected an integer"),
        ("[client]\nreroute_wait = nan\n", "client.reroute_wait: must not be negative"),
        ("[client]\nwire_dtype = 'int8'\n", "client.wire_dtype: expected one of float32"),
        ("[client]\nmax_chunk_bytes = 0\n", "client.max_chunk_bytes: must be at least 1"),
        ("[client]\nverify = 1.5\n", "client.verify: a share of steps"),
        ("[client]\nverify_tolerance = 0\n", "client.verify_tolerance: must be positive"),
        ("[client]\nstep_timeout_s = 3\n", "unknown config key 'client.step_timeout_s'"),
        ("[client]\nverify_fraction = 0.5\n", "unknown config key 'client.verify_fraction'"),
        ("[client]\nverify_seed = 3\n", "unknown config key 'client.verify_seed'"),
        ("client = 3\n", "client: expected a table"),
    ],
)
def test_bad_client_values_are_one_line_errors_naming_the_key(
    tmp_path: Path, text: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_file(tmp_path, text), {})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_example_config_documents_every_client_key() -> None:
    """Every [client] key is in the example, commented out, with its default value."""
    import tomllib

    text = EXAMPLE.read_text()
    assert load_config(EXAMPLE, {}).client == ClientConfig()
    table = text.split("\n[client]\n", 1)[1]
    documented = {}
    for line in table.splitlines():
        key, sep, _ = line.removeprefix("# ").partition(" = ")
        if line.startswith("# ") and sep and key.isidentifier():
            value = line.removeprefix("# ").split("  #", 1)[0]
            documented.update(tomllib.loads(value))
    assert set(documented) == set(CLIENT_KEYS)
    defaults = ClientConfig()
    for key, value in documented.items():
        assert getattr(defaults, CLIENT_KEYS[key]) == value, key


# --- the standalone CLI (`shardmesh generate --bootstrap ... --config FILE`) ---------------------
def _gen_args(**kw: Any) -> argparse.Namespace:
    from agent.cli.main import build_parser

    argv = ["generate", "--model", "m", "--prompt-ids", "1,2"]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_parser().parse_args(argv)


def test_standalone_client_config_defaults_file_flags(tmp_path: Path) -> None:
    from agent.cli.generate import client_config

    assert client_config(_gen_args()) == ClientConfig()
    path = _file(tmp_path, "[client]\nstep_timeout = 7\nverify = 0.5\nverify_tolerance = 0.2\n")
    cfg = client_config(_gen_args(config=path))
    assert (cfg.step_timeout_s, cfg.verify_fraction, cfg.verify_tolerance) == (7.0, 0.5, 0.2)
    cfg = client_config(_gen_args(config=path, verify=0, verify_tolerance=0.01))
    assert (cfg.step_timeout_s, cfg.verify_fraction, cfg.verify_tolerance) == (7.0, 0.0, 0.01)
    with pytest.raises(ConfigError, match=r"client\.step_timeout"):
        client_config(_gen_args(config=_file(tmp_path, "[client]\nstep_timeout = -2\n")))


def test_config_without_bootstrap_is_a_usage_error(tmp_path: Path) -> None:
    from agent.cli.generate import run_generate
    from agent.errors import UsageError

    args = _gen_args(config=_file(tmp_path, "[client]\n"))
    with pytest.raises(UsageError, match="--config: only with --bootstrap"):
        run_generate(args, tmp_path / "none.sock")


# --- the agent's generations use the table ------------------------------------------------------
class _Head:
    config = argparse.Namespace(eos_token_id=None)


class _Parts:
    async def n_blocks(self, model_dir: Path, model_id: str) -> int:
        return 4

    async def get(self, model_dir: Path, model_id: str) -> tuple[Any, Any]:
        return _Head(), None


class _Result:
    token_ids = [5]
    text = ""

    def to_json(self) -> dict[str, Any]:
        return {"token_ids": self.token_ids}


async def test_run_generation_uses_the_client_table_and_the_request_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.route import generation
    from agent.route.generation import GenerateRequest, run_generation

    seen: list[ClientConfig] = []

    async def fake_generate_ids(view: Any, head: Any, ids: Any, **kw: Any) -> _Result:
        seen.append(kw["cfg"])
        return _Result()

    monkeypatch.setattr(generation, "generate_ids", fake_generate_ids)
    table = ClientConfig(step_timeout_s=3.0, verify_fraction=0.5, verify_tolerance=0.2)

    async def run(req: dict[str, Any], cfg: ClientConfig | None) -> ClientConfig:
        request = GenerateRequest.from_json({"model": "m", "prompt_ids": [1, 2], **req})
        await run_generation(None, _Parts(), request, "m", tmp_path, None, cfg=cfg)  # type: ignore[arg-type]
        return seen[-1]

    assert await run({}, None) == ClientConfig()
    assert await run({}, table) == table
    got = await run({"verify": 0.25, "verify_tolerance": 0.01}, table)
    assert (got.step_timeout_s, got.verify_fraction, got.verify_tolerance) == (3.0, 0.25, 0.01)
    got = await run({"verify": 1.0}, None)
    assert (got.verify_fraction, got.verify_tolerance) == (1.0, ClientConfig().verify_tolerance)
    assert [f.name for f in fields(got)] == [f.name for f in fields(ClientConfig)]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_known_peers", 0),
        ("new_peers_per_minute", 0.0),
        ("new_peers_per_minute", -1.0),
        ("stranger_buffer_bytes", 1024),
        ("stranger_buffer_bytes", 1 << 30),
        ("held_streams_per_peer", 0),
        ("max_batch_rows", 0),
        ("max_batch_tokens", 0),
        ("batch_prefill_chunk", 0),
        ("kv_page_tokens", 0),
        ("trusted_peers", ["not-a-peer-id"]),
    ],
)
def test_peer_table_bounds_are_checked(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"limits.{key}"):
        load_config(None, {f"limits.{key}": value})
