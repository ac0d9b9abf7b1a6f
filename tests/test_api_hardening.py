"""The HTTP API against hostile web pages and other local users, without agent processes:
the Host check (DNS rebinding), the JSON-only POST bodies (CSRF), `api.require_key`, and
their config keys. The app is driven in-process over ASGI with a node that has no models;
tests/test_api.py does the same checks against a real agent."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.api.guards import HostNames, check_json_type
from agent.api.httpapi import ApiServer
from agent.api.openai_format import ApiError
from agent.config import AgentConfig, ApiConfig, ConfigError, load_config
from agent.config.validation import parse_server_name, validate
from agent.errors import ShardmeshError

PORT = 8080
KEY = "sk-hardening-test-0123456789"


# --- Host names ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:8080", ("localhost", 8080)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8080", ("[::1]", 8080)),
        ("[0:0:0:0:0:0:0:1]", ("[::1]", None)),
        ("::1", ("[::1]", None)),  # a bare IPv6 address (server_names)
        ("llm.example.org", ("llm.example.org", None)),
        ("proxy_1.lan:65535", ("proxy_1.lan", 65535)),
    ],
)
def test_server_names_parse(text: str, want: tuple[str, int | None]) -> None:
    assert parse_server_name(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":8080",
        "http://localhost:8080",
        "localhost/v1",
        "localhost:",
        "localhost:0",
        "localhost:65536",
        "localhost:80x",
        "localhost:\u0663",  # a digit, but not an ASCII one
        "*.example.org",
        "user@localhost",
        "evil example",
        "[::1",
        "[zz::1]:80",
        "[::1]8080",
        "caf\u00e9.example",
    ],
)
def test_bad_server_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server_name(text)


def _names(listen: str, *server_names: str, port: int | None = None) -> HostNames:
    return HostNames(ApiConfig(listen=listen, server_names=server_names), port)


def test_a_loopback_api_answers_to_its_own_names_only() -> None:
    hosts = _names(f"127.0.0.1:{PORT}")
    assert hosts.enforced
    for good in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"):
        assert hosts.allows(good), good
    for bad in (
        "evil.example:8080",  # DNS rebinding: the page's own name
        "evil.example",
        "127.0.0.1:8081",  # another port is another service
        "localhost",  # port 80
        "127.0.0.2:8080",
        "localhost:8080.evil.example",
        "127.0.0.1:8080@evil.example",
        "",
        "[::1",
    ):
        assert not hosts.allows(bad), bad
    assert hosts.describe() == "127.0.0.1:8080, localhost:8080, [::1]:8080"


def test_server_names_add_hosts_with_or_without_a_port() -> None:
    hosts = _names("localhost:8080", "llm.example.org", "proxy.lan:9000")
    assert hosts.allows("llm.example.org") and hosts.allows("LLM.example.org:443")
    assert hosts.allows("proxy.lan:9000") and not hosts.allows("proxy.lan:9001")
    assert not hosts.allows("proxy.lan")
    assert hosts.allows("localhost:8080") and not hosts.allows("evil.example:8080")


def test_port_80_and_ipv6_loopback_binds() -> None:
    assert _names("127.0.0.1:80").allows("localhost")  # no port in the Host: 80
    v6 = _names("[::1]:8080")
    assert v6.allows("[::1]:8080") and v6.allows("127.0.0.1:8080")
    assert not v6.allows("::1:8080")


def test_the_bound_port_counts_when_listen_asks_for_any() -> None:
    hosts = _names("127.0.0.1:0", port=43111)
    assert hosts.allows("localhost:43111") and not hosts.allows("localhost:0")


def test_off_loopback_the_check_is_on_once_server_names_are_set() -> None:
    # Keys are required there: a rebound page has none, and the agent cannot know every
    # name it is reached by.
    assert _names("0.0.0.0:8080").allows("anything.example:1")
    assert _names("192.0.2.7:8080").allows("gpu-box:8080")
    named = _names("192.0.2.7:8080", "gpu-box")
    assert named.enforced
    assert named.allows("gpu-box:8080") and named.allows("192.0.2.7:8080")
    assert not named.allows("evil.example:8080") and not named.allows("localhost:8080")
    wildcard = _names("0.0.0.0:8080", "gpu-box")  # a wildcard bind is on loopback too
    assert wildcard.allows("localhost:8080") and wildcard.allows("gpu-box:8080")
    assert not wildcard.allows("0.0.0.0:8080") and not wildcard.allows("evil.example:8080")


def test_host_refusals() -> None:
    hosts = _names(f"127.0.0.1:{PORT}")
    assert hosts.refusal(["localhost:8080"]) is None
    for values in ([], ["localhost:8080", "localhost:8080"]):
        err = hosts.refusal(values)
        assert err is not None and err.status == 400 and err.code == "bad_host"
    err = hosts.refusal(["evil.example:8080"])
    assert err is not None and err.status == 421 and err.code == "misdirected_request"
    assert "evil.example:8080" in err.message and "api.server_names" in err.message
    assert _names("0.0.0.0:8080").refusal([]) is None  # not checked there at all


# --- JSON bodies --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["application/json", "application/json; charset=utf-8", "Application/JSON ;x=1"]
)
def test_json_bodies_pass(value: str) -> None:
    check_json_type(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
        "text/plain; charset=utf-8",
        "application/jsonx",
        "application/json-seq",
        "text/json",
    ],
)
def test_other_bodies_get_415(value: str | None) -> None:
    with pytest.raises(ApiError) as info:
        check_json_type(value)
    assert info.value.status == 415 and info.value.code == "unsupported_media_type"
    assert "application/json" in info.value.message


# --- config -------------------------------------------------------------------------------------
def test_require_key_needs_a_key_file(tmp_path: Path) -> None:
    assert ApiConfig().require_key is False and ApiConfig().server_names == ()
    for listen in (f"127.0.0.1:{PORT}", ""):
        with pytest.raises(ConfigError, match=r"^api\.require_key: .*api\.key_file") as info:
            load_config(None, {"api.listen": listen, "api.require_key": True})
        assert "\n" not in str(info.value)
    keys = tmp_path / "keys"
    cfg = load_config(
        None, {"api.listen": f"{PORT}", "api.require_key": True, "api.key_file": keys}
    )
    assert cfg.api.require_key and cfg.api.key_file == keys
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'[api]\nlisten = "127.0.0.1:{PORT}"\nrequire_key = true\n')
    with pytest.raises(ConfigError, match=r"api\.require_key"):
        load_config(cfg_file, {})


@pytest.mark.parametrize("bad", ["http://llm.example.org", "*", "a b", "host:99999"])
def test_bad_server_names_are_a_config_error(bad: str) -> None:
    cfg = replace(AgentConfig(), api=ApiConfig(listen="8080", server_names=("ok.lan", bad)))
    with pytest.raises(ConfigError, match=r"^api\.server_names: ") as info:
        validate(cfg)
    assert repr(bad) in str(info.value)
    validate(replace(cfg, api=ApiConfig(listen="8080", server_names=("ok.lan", "[::1]:80"))))


def test_server_names_load_from_the_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[api]\nlisten = "8080"\nserver_names = ["llm.example.org", "b:9"]\n')
    assert load_config(cfg_file, {}).api.server_names == ("llm.example.org", "b:9")


# --- the app, in-process ------------------------------------------------------------------------
class NoModels:
    """An ApiNode with nothing on the mesh: enough for routes that never generate."""

    def known_models(self) -> dict[str, Any]:
        return {}

    def coverage(self) -> list[dict[str, Any]]:
        return []


def _server(api: ApiConfig, keys: frozenset[str] = frozenset()) -> ApiServer:
    return ApiServer(NoModels(), api, 4096, keys, {})  # type: ignore[arg-type]


async def _call(
    server: ApiServer, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, Any]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", PORT),
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await server.app(scope, receive, send)
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(data) if data.startswith(b"{") else data


def _requests(server: ApiServer, endpoint: str, status: int) -> float:
    """shardmesh_api_requests_total{endpoint, status} (the counter alone: the node's
    collector would read a mesh this test has not got)."""
    want = {"endpoint": endpoint, "status": str(status)}
    samples = [s for f in server.metrics.requests.collect() for s in f.samples]
    return sum(s.value for s in samples if s.name.endswith("_total") and s.labels == want)


LOCAL = {"host": f"127.0.0.1:{PORT}"}
BODY = json.dumps({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4}).encode()


async def test_a_form_post_starts_no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _server(ApiConfig(listen=f"127.0.0.1:{PORT}"))
    started: list[object] = []
    accept = server._accept

    def spy(*args: Any) -> Any:
        started.append(args)
        return accept(*args)

    monkeypatch.setattr(server, "_accept", spy)
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = dict(LOCAL) if content_type is None else {**LOCAL, "content-type": content_type}
        for path in ("/v1/completions", "/v1/chat/completions"):
            status, body = await _call(server, "POST", path, headers, BODY)
            assert status == 415, body
            assert body["error"]["code"] == "unsupported_media_type"
    assert not started and server.in_flight == 0
    assert _requests(server, "/v1/completions", 415) == 3
    # The same body as JSON gets past the check (to a 404: this node has no models).
    status, body = await _call(
        server, "POST", "/v1/completions", {**LOCAL, "content-type": "application/json"}, BODY
    )
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert len(started) == 1


async def test_a_foreign_host_is_refused_before_anything_else() -> None:
    server = _server(ApiConfig(listen=f"127.0.0.1:{PORT}", server_names=("llm.lan",)))
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "llm.lan", "llm.lan:443"):
        status, body = await _call(server, "GET", "/v1/models", {"host": host})
        assert status == 200 and body["data"] == [], host
    for host in ("evil.example:8080", "localhost:9999", "127.0.0.1"):
        status, body = await _call(
            server, "POST", "/v1/completions", {"host": host, "content-type": "text/plain"}, BODY
        )
        assert status == 421, host  # the Host check comes first
        assert body["error"]["code"] == "misdirected_request"
    status, body = await _call(server, "GET", "/metrics", {})
    assert status == 400 and body["error"]["code"] == "bad_host"
    assert _requests(server, "/v1/completions", 421) == 3
    assert _requests(server, "/v1/models", 200) == 5


async def test_require_key_guards_every_route_on_loopback() -> None:
    api = ApiConfig(listen=f"127.0.0.1:{PORT}", require_key=True, key_file=Path("keys"))
    with pytest.raises(ShardmeshError, match=r"api\.require_key"):
        _server(api)  # no keys: refused even where validation was skipped
    server = _server(api, frozenset({KEY}))
    json_type = {**LOCAL, "content-type": "application/json"}
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/models/x")):
        status, body = await _call(server, method, path, LOCAL)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", path
    status, _ = await _call(server, "POST", "/v1/chat/completions", json_type, BODY)
    assert status == 401
    authed = {**LOCAL, "authorization": f"Bearer {KEY}"}
    status, body = await _call(server, "GET", "/v1/models", authed)
    assert status == 200 and body["object"] == "list"
    status, _ = await _call(server, "GET", "/v1/models", {**LOCAL, "authorization": "Bearer x"})
    assert status == 401
