"""What a request must show before the API looks at it: a JSON Content-Type (CSRF) and a
Host header that names this API (DNS rebinding). Pure: tested without a server."""

from __future__ import annotations

from agent.api.openai_format import ApiError
from agent.config import ApiConfig, api_address, is_loopback
from agent.config.validation import parse_server_name

JSON_TYPE = "application/json"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def check_json_type(content_type: str | None) -> None:
    """ApiError 415 unless `content_type` is `application/json` (parameters such as
    `charset` allowed). A cross-site page can make the browser POST a form or `text/plain`
    (even one that reads as JSON) to a loopback API without asking anyone: only a JSON
    Content-Type proves the request came from a client that meant it (CSRF)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != JSON_TYPE:
        got = f"got {content_type!r}" if content_type else "got none"
        raise ApiError(
            415,
            f"the request body must be JSON sent as Content-Type: {JSON_TYPE} ({got})",
            code="unsupported_media_type",
        )


class HostNames:
    """The Host header values the API answers to. DNS rebinding points a web page's own
    name at 127.0.0.1, so the browser sends that name: a loopback API answers only to
    api.listen's host and port, localhost, 127.0.0.1 and [::1] at that port, and the names in
    api.server_names (NAME: any port; NAME:PORT). Off loopback (where keys are required
    anyway) the check is on once api.server_names is set; the listen address counts, and a
    wildcard bind's loopback names.

    `port`: the port the API is bound to, for api.listen's port 0 (any free one), which is
    known only once bound; until then (port 0) only api.server_names without a port match."""

    def __init__(self, api: ApiConfig, port: int | None = None) -> None:
        host, listen_port = api_address(api)
        self.port = listen_port if port is None else port
        listen = f"[{host}]" if ":" in host else host
        loopback = is_loopback(host)
        wildcard = host in ("0.0.0.0", "::")
        self.enforced = loopback or bool(api.server_names)
        names: list[tuple[str, int | None]] = []
        if self.port:  # not before the bound port is known
            if not wildcard:
                names.append((parse_server_name(listen)[0], self.port))
            if loopback or wildcard:
                names += [(name, self.port) for name in LOOPBACK_NAMES]
        names += [parse_server_name(name) for name in api.server_names]
        self.names = tuple(dict.fromkeys(names))  # in order, once each

    def allows(self, value: str) -> bool:
        """True if a Host header of `value` names this API (no port: 80, as in a URL)."""
        if not self.enforced:
            return True
        try:
            name, port = parse_server_name(value.strip())
        except ValueError:
            return False
        port = 80 if port is None else port
        return (name, port) in self.names or (name, None) in self.names

    def describe(self) -> str:
        return ", ".join(name if port is None else f"{name}:{port}" for name, port in self.names)

    def refusal(self, values: list[str]) -> ApiError | None:
        """The error for a request with these Host headers, or None if it may go on."""
        if not self.enforced:
            return None
        if len(values) != 1:
            return ApiError(400, "a request needs exactly one Host header", code="bad_host")
        if self.allows(values[0]):
            return None
        return ApiError(
            421,
            f"this API answers to Host {self.describe()} (api.listen, api.server_names), "
            f"not {values[0]!r}",
            code="misdirected_request",
        )
