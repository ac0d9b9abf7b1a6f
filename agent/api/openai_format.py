"""OpenAI's API shapes, with no I/O: request parsing and checks, response bodies and stream
chunks, errors, and what `stop` and `finish_reason` mean.

Parameters this server cannot honour (n > 1, logprobs, tools, penalties, ...) are refused
with a 400 naming the parameter rather than silently ignored; ones that change nothing here
(user, metadata, store, ...) are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# Chat has no default length at OpenAI (up to the context); cap it so one request without
# max_tokens does not reserve a whole context of KV cache on every hop.
DEFAULT_CHAT_TOKENS_CAP = 2048
# torch.Generator.manual_seed's range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
CHAT_ROLES = ("system", "developer", "user", "assistant")
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error reply: HTTP status plus OpenAI's `{"error": {...}}` body, and any headers
    that go with it (Retry-After on a 503 for a model that is loading)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- requests ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What both endpoints take besides the prompt."""

    model: str
    max_tokens: int | None  # None: the endpoint's default
    temperature: float
    top_p: float
    seed: int | None  # None: the server picks one
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage


@dataclass(frozen=True)
class ChatRequest:
    settings: Settings
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class CompletionRequest:
    settings: Settings
    prompt: str | tuple[int, ...]


def parse_chat(body: Any) -> ChatRequest:
    body = _object(body)
    _refuse_penalties(body)
    _refuse(body, ("n", "best_of"), lambda v: v in (None, 1), "only n=1 is supported")
    _refuse(body, ("logprobs",), lambda v: v in (None, False), "logprobs are not supported")
    _refuse(body, ("top_logprobs",), lambda v: v in (None, 0), "logprobs are not supported")
    _refuse(body, ("tools", "functions"), lambda v: not v, "tool calls are not supported")
    _refuse(
        body,
        ("response_format",),
        lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "only the text response format is supported",
    )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return ChatRequest(
        settings=_settings(body, max_tokens, param), messages=_messages(body.get("messages"))
    )


def parse_completion(body: Any) -> CompletionRequest:
    body = _object(body)
    _refuse_penalties(body)
    _refuse(body, ("n", "best_of"), lambda v: v in (None, 1), "only n=1 is supported")
    _refuse(body, ("logprobs",), lambda v: v in (None, 0), "logprobs are not supported")
    _refuse(body, ("echo",), lambda v: v in (None, False), "echo is not supported")
    _refuse(body, ("suffix",), lambda v: v in (None, ""), "suffix is not supported")
    return CompletionRequest(
        settings=_settings(body, body.get("max_tokens"), "max_tokens"),
        prompt=_prompt(body.get("prompt")),
    )


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _refuse(body: dict[str, Any], keys: Iterable[str], ok: Any, message: str) -> None:
    for key in keys:
        if not ok(body.get(key)):
            raise bad_request(f"{key}: {message}", param=key)


def _refuse_penalties(body: dict[str, Any]) -> None:
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad_request(f"{key}: penalties are not supported", param=key)
    if body.get("logit_bias"):
        raise bad_request("logit_bias is not supported", param="logit_bias")


def _settings(body: dict[str, Any], max_tokens: Any, max_param: str) -> Settings:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required", param="model")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad_request(f"{max_param} must be a positive integer", param=max_param)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad_request("top_p must be in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
        raise bad_request("seed must be a 64-bit integer", param="seed")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise bad_request("stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return Settings(
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=_stop(body.get("stop")),
        stream=bool(stream),
        include_usage=include_usage,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise bad_request(f"{key} must be a number between {lo:g} and {hi:g}", param=key)
    return float(v)


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request("stop must be a non-empty string or a list of them", param="stop")
    if len(items) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} sequences", param="stop")
    return tuple(items)


def _messages(v: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(v, list) or not v:
        raise bad_request("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", param="messages"
            )
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return tuple(out)


def _content(v: Any, i: int) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in v
    ):
        return "\n".join(p["text"] for p in v)
    raise bad_request(
        f"messages[{i}].content must be a string or a list of text parts", param="messages"
    )


def _prompt(v: Any) -> str | tuple[int, ...]:
    # A batch of one prompt is accepted in either shape; larger batches are not supported.
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str | list):
        v = v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        return tuple(v)
    raise bad_request(
        "prompt must be a string or a list of token ids (one prompt per request)",
        param="prompt",
    )


def completion_budget(
    requested: int | None, chat: bool, prompt_tokens: int, context: int | None
) -> int:
    """max_tokens to generate: the request's, or the endpoint's default, within `context`
    (the most tokens a session may hold) less the prompt."""
    room = None if context is None else context - prompt_tokens
    param = "messages" if chat else "prompt"
    if room is not None and room < 1:
        raise bad_request(
            f"the prompt has {prompt_tokens} tokens, more than the {context}-token context",
            param=param,
            code="context_length_exceeded",
        )
    if requested is None:
        want = DEFAULT_CHAT_TOKENS_CAP if chat else DEFAULT_COMPLETION_TOKENS
        return want if room is None else min(want, room)
    if room is not None and requested > room:
        raise bad_request(
            f"this model's context is {context} tokens, but {prompt_tokens + requested} were "
            f"requested ({prompt_tokens} in the prompt, {requested} for the completion)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


# --- stop sequences and finish reasons ------------------------------------------------------
class StopText:
    """Cuts generated text at the first stop sequence.

    `add(delta)` returns the text that is safe to show now: a tail that could be the start
    of a stop sequence is held back until the next token decides it. `hit` turns true when
    a stop sequence appears; `text` is then everything before it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.hit = False

    def add(self, delta: str) -> str:
        if self.hit:
            return ""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        # Anything before `sent` was checked already: a match must start at or after it.
        found = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if found:
            self.hit = True
            self.text = self.text[: min(found)]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def _held(self) -> int:
        """Length of the longest unsent suffix that is a proper prefix of a stop sequence."""
        unsent = len(self.text) - self.sent
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, unsent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out


def finish_reason(
    token_ids: Sequence[int], eos_ids: Iterable[int], stopped: bool, max_tokens: int
) -> str:
    """ "stop" for a stop sequence or an end-of-sequence token, "length" at max_tokens."""
    if stopped or (token_ids and token_ids[-1] in set(eos_ids)):
        return "stop"
    return "length" if len(token_ids) >= max_tokens else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --- responses -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """The envelope every body of one response shares (id, created, model)."""

    chat: bool
    id: str
    created: int
    model: str
    fingerprint: str

    def _base(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def full(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text}
        choice.update(index=0, finish_reason=finish, logprobs=None)
        return {**self._base(False), "choices": [choice], "usage": usage}

    def chunk(self, text: str, *, first: bool = False, finish: str | None = None) -> dict[str, Any]:
        """One stream chunk: a token's text, or (with `finish`) the last text and the reason."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text or finish is None:
                delta["content"] = text
            choice: dict[str, Any] = {"delta": delta}
        else:
            choice = {"text": text}
        choice.update(index=0, finish_reason=finish, logprobs=None)
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk that stream_options.include_usage asks for."""
        return {**self._base(True), "choices": [], "usage": usage}


def model_entry(model_id: str, created: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "shardmesh", **extra}


def model_list(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": list(entries)}


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
