"""Owner-only secret files: the one reader behind the swarm secret (agent.net.swarmauth), the
API's bearer keys (agent.api.apikeys) and the identity key (agent.net.identity).

A secret file must be a regular file that only its owner may read or write (mode 600 or
stricter): whoever else can read it holds the secret, and quietly fixing the mode would hide
that it was exposed. The one exception is a systemd credential (`LoadCredential=`): a file in
the service's own credential directory ($CREDENTIALS_DIRECTORY, i.e. /run/credentials/<unit>/),
which only the service may enter. systemd makes it root-owned, mode 0400, and lets a
`DynamicUser=` read it through an ACL, whose mask shows as group bits in the mode (0440), so
the mode says nothing there. Light imports: the standard library only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.errors import ShardmeshError

# Where systemd puts each unit's credentials (/run/credentials/<unit>/<name>).
CREDENTIALS_ROOT = Path("/run/credentials")
MAX_SECRET_BYTES = 1024 * 1024
CREDENTIAL_HINT = (
    "under the systemd unit hand it over with LoadCredential= (README: Run as a service)"
)


class SecretFileError(ShardmeshError):
    """A secret file is unusable; the message is one line for the user."""


def read_secret_file(
    path: Path,
    what: str,
    *,
    error: type[ShardmeshError] = SecretFileError,
    chmod_note: str = "",
    make: str = "",
    max_bytes: int = MAX_SECRET_BYTES,
    directory: str = "is a directory, not a regular file: name the file in it",
) -> bytes:
    """The bytes of the secret file at `path`, as stored (callers strip or parse them).

    Raises `error` with one line that starts with `what` and the path and says what to do:
    the file is missing, unreadable, not a regular file, open to group or others (outside a
    systemd credential directory), empty, or over `max_bytes`. `chmod_note` follows the
    chmod advice ("... if it was never exposed"); `make` says how to make one, for a
    missing or empty file; `directory` is what a directory at the path is told (after the
    path). The secret itself never appears in a message.
    """
    where = f"{what} {path}"
    made = f"; {make}" if make else ""
    try:
        # O_NONBLOCK: a FIFO at the path must not hang the agent before the check below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{where} does not exist{made}") from None
    except PermissionError:
        raise error(
            f"{where} cannot be read by this user (uid {os.geteuid()}): make the agent's user "
            f"its owner (mode 600), or {CREDENTIAL_HINT}"
        ) from None
    except OSError as exc:
        raise error(f"{where} cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # of the file we read, not of what the path names a moment later
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{where} {directory}")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and not in_credentials_dir(path):
            raise error(
                f"{where} is accessible to other users (mode {mode:o}); "
                f"run 'chmod 600 {path}'{chmod_note}"
            )
        data = _read_up_to(fd, max_bytes + 1)
    except OSError as exc:
        raise error(f"{where} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise error(f"{where} is over {max_bytes} bytes: not a secret file")
    if not data.strip():
        raise error(f"{where} is empty{made}")
    return data


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def in_credentials_dir(path: Path) -> bool:
    """Whether `path` is a systemd credential: its real location is directly in
    $CREDENTIALS_DIRECTORY or in a unit's directory under /run/credentials."""
    try:
        parent = Path(path).resolve().parent
    except (OSError, RuntimeError):
        return False
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        try:
            if parent == Path(creds).resolve():
                return True
        except (OSError, RuntimeError):
            pass
    return parent.parent == CREDENTIALS_ROOT
