"""The private swarm's secret and its handshake on a libp2p stream: the secret file (owner-only,
or a systemd credential: agent.net.secrets), running protocol.swarm's sans-I/O `Handshake`
over one `/shardmesh/swarm-auth/1.0.0` stream, and telling a peer why it was refused. What
the verdict means for the peer's connections is the gate's business (agent.net.swarm)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import INetStream

from agent.errors import ShardmeshError
from agent.net.secrets import read_secret_file
from protocol.errors import DecodeError, ProtocolError
from protocol.swarm import (
    SWARM_AUTH_PROTOCOL_ID,
    AuthDecoder,
    AuthFailed,
    Handshake,
    Refused,
    check_secret,
    encode_auth,
)

READ_CHUNK = 1024
SEND_REFUSAL_TIMEOUT_S = 1.0
MAX_SECRET_FILE_BYTES = 64 * 1024


class SwarmError(ShardmeshError):
    """The swarm secret or lists are unusable; the message is one line for the user."""


def load_secret(path: Path) -> bytes:
    """The secret in `path` (surrounding whitespace stripped). Refuses a file that group or
    others may read or write, outside a systemd credential directory: whoever reads it can
    join the swarm."""
    make = f"make one with (umask 077; head -c 48 /dev/urandom | base64 > {path})"
    data = read_secret_file(
        path,
        "swarm secret file",
        error=SwarmError,
        chmod_note=", and make a new secret if others may have read it",
        make=make,
        max_bytes=MAX_SECRET_FILE_BYTES,
    ).strip()
    try:
        check_secret(data)
    except DecodeError as exc:
        raise SwarmError(f"swarm secret file {path}: {exc}; {make}") from None
    return data


@dataclass(frozen=True)
class AuthOutcome:
    """How one handshake ended: proven, or why not (the refusal reason we count, a detail
    for the log, and the reason to send the peer, if any)."""

    verified: bool
    reason: str = "no_proof"
    detail: str = ""
    reply: str | None = None


async def run_handshake(stream: INetStream, hs: Handshake, timeout_s: float) -> AuthOutcome:
    """Drive `hs` over `stream` until the peer is proven, the handshake fails, or `timeout_s`
    passes. Never raises for what the peer or the stream does."""
    decoder = AuthDecoder()
    reason, detail, reply = "no_proof", "", None
    try:
        with trio.fail_after(timeout_s):
            for first in hs.start():
                await stream.write(encode_auth(first))
            while not hs.verified:
                msg = decoder.next_message()
                if msg is None:
                    decoder.feed(await stream.read(READ_CHUNK))
                    continue
                for out in hs.receive(msg):
                    await stream.write(encode_auth(out))
    except AuthFailed as exc:
        reason, detail, reply = exc.reason, str(exc), exc.reply
    except ProtocolError as exc:
        reason, detail, reply = "malformed", str(exc), "malformed"
    except trio.TooSlowError:
        detail = "the handshake timed out"
    except Exception as exc:  # the stream or connection went away
        detail = f"the handshake stream failed: {type(exc).__name__}"
    if hs.verified:
        return AuthOutcome(verified=True)
    return AuthOutcome(verified=False, reason=reason, detail=detail, reply=reply)


async def reply_refused(stream: INetStream, reason: str) -> None:
    """Tell the peer why on the handshake's own stream (best effort)."""
    with trio.move_on_after(SEND_REFUSAL_TIMEOUT_S), contextlib.suppress(Exception):
        await stream.write(encode_auth(Refused(reason=reason)))
        await stream.close()


async def send_refusal(host: Any, peer: Any, reason: str) -> None:
    """Tell the peer why, on a stream of its own (best effort), so it can count it too."""
    with trio.move_on_after(SEND_REFUSAL_TIMEOUT_S), contextlib.suppress(Exception):
        stream = await host.new_stream(peer, [SWARM_AUTH_PROTOCOL_ID])
        await stream.write(encode_auth(Refused(reason=reason)))
        await stream.close()
