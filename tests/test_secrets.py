"""Owner-only secret files (agent.net.secrets) and the three readers on it: the swarm secret,
the API's bearer keys and the identity key. Each refuses group/other access with one line
that says what to do, accepts a systemd credential, and names a directory, an empty file or
a missing one plainly."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.api.apikeys import ApiKeyError, load_api_keys
from agent.errors import ShardmeshError
from agent.net import secrets
from agent.net.identity import IdentityError, load_or_create_identity
from agent.net.secrets import SecretFileError, in_credentials_dir, read_secret_file
from agent.net.swarmauth import SwarmError, load_secret

SWARM_SECRET = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC0xMjM0NTY3OA=="
API_KEYS = "# ops\nsk-one\nsk-two\n"


def _write(path: Path, content: bytes | str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(path, mode)
    return path


def _identity_bytes(tmp_path: Path) -> bytes:
    source = tmp_path / "made" / "identity.key"
    load_or_create_identity(source)
    return source.read_bytes()


# Each reader: (call, its error type, good content, a phrase of its chmod advice).
Reader = tuple[Callable[[Path], Any], type[ShardmeshError], str | None, str]
READERS: dict[str, Reader] = {
    "generic": (lambda p: read_secret_file(p, "test secret"), SecretFileError, "x" * 40, ""),
    "swarm": (load_secret, SwarmError, SWARM_SECRET, "make a new secret"),
    "api": (load_api_keys, ApiKeyError, API_KEYS, "if its keys were never exposed"),
    "identity": (load_or_create_identity, IdentityError, None, "readable by other users"),
}


def _content(name: str, tmp_path: Path) -> bytes:
    good = READERS[name][2]
    return _identity_bytes(tmp_path) if good is None else good.encode()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o602])
def test_group_or_other_access_is_refused_with_what_to_do(
    tmp_path: Path, name: str, mode: int
) -> None:
    read, error, _, advice = READERS[name]
    content = _content(name, tmp_path)
    path = _write(tmp_path / "secret", content, mode)
    with pytest.raises(error) as err:
        read(path)
    line = _one_line(err.value)
    assert f"{path} is accessible to other users (mode {mode:o})" in line
    assert f"run 'chmod 600 {path}'" in line and advice in line
    if name != "identity":
        assert content.decode() not in line
    os.chmod(path, 0o600)  # what the message says to do works
    read(path)


@pytest.mark.parametrize("name", READERS)
def test_a_systemd_credential_is_accepted_with_its_acl_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """LoadCredential= files are root-owned, mode 0400, in a directory only the service may
    enter; systemd's ACL for a DynamicUser shows as group bits (0440)."""
    read, error, _, _ = READERS[name]
    content = _content(name, tmp_path)
    creds = tmp_path / "run" / "credentials" / "shardmesh.service"
    creds.mkdir(parents=True, mode=0o700)
    path = _write(creds / "secret", content, 0o440)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(error, match="accessible to other users"):
        read(path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    read(path)
    # Without the variable, a unit's directory under /run/credentials counts too.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    monkeypatch.setattr(secrets, "CREDENTIALS_ROOT", tmp_path / "run" / "credentials")
    read(path)
    # Only directly in a credential directory: not beside it, not through a link out of it.
    outside = _write(tmp_path / "elsewhere" / "secret", content, 0o440)
    with pytest.raises(error):
        read(outside)
    link = creds / "link"
    link.symlink_to(outside)
    with pytest.raises(error):
        read(link)


def test_the_api_key_file_can_be_a_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `LoadCredential=api-keys:...` route: refused before the shared reader."""
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    path = _write(creds / "api-keys", API_KEYS, 0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_api_keys(path) == {"sk-one", "sk-two"}


@pytest.mark.parametrize("name", ["generic", "swarm", "api"])
def test_missing_directory_empty_and_fifo(tmp_path: Path, name: str) -> None:
    read, error, _, _ = READERS[name]
    with pytest.raises(error, match="does not exist") as err:
        read(tmp_path / "missing")
    _one_line(err.value)
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    with pytest.raises(error, match="is a directory, not a regular file") as err:
        read(folder)
    _one_line(err.value)
    for empty in ("", "\n  \n"):
        with pytest.raises(error, match="is empty") as err:
            read(_write(tmp_path / "empty", empty))
        _one_line(err.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(error, match="not a regular file"):  # and does not hang
        read(fifo)


def test_make_advice_for_a_missing_or_empty_swarm_secret(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", _write(tmp_path / "empty", "")):
        with pytest.raises(SwarmError, match="make one with"):
            load_secret(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_file_this_user_cannot_read_says_how_to_hand_it_over(tmp_path: Path) -> None:
    path = _write(tmp_path / "secret", "x" * 40, 0o000)
    with pytest.raises(SecretFileError) as err:
        read_secret_file(path, "test secret")
    line = _one_line(err.value)
    assert "cannot be read by this user" in line and "LoadCredential=" in line


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "big", "x" * 100)
    assert read_secret_file(path, "s", max_bytes=100) == b"x" * 100
    with pytest.raises(SecretFileError, match="over 99 bytes"):
        read_secret_file(path, "s", max_bytes=99)
    with pytest.raises(SwarmError, match="over 65536 bytes"):
        load_secret(_write(tmp_path / "huge", "x" * (64 * 1024 + 1)))


def test_bytes_come_back_as_stored_and_each_reader_parses_them(tmp_path: Path) -> None:
    raw = b"  \x00secret\n"
    assert read_secret_file(_write(tmp_path / "raw", raw), "s") == raw
    assert load_secret(_write(tmp_path / "swarm", SWARM_SECRET + "\n")) == SWARM_SECRET.encode()
    with pytest.raises(SwarmError, match="at least 32"):
        load_secret(_write(tmp_path / "short", "too-short"))
    with pytest.raises(ApiKeyError, match="not UTF-8"):
        load_api_keys(_write(tmp_path / "latin", b"sk-\xff\n"))


def test_identity_key_is_created_owner_only_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.key"
    made = load_or_create_identity(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    again = load_or_create_identity(path)
    assert again.public_key.serialize() == made.public_key.serialize()
    _write(path, b"\x08\x01garbage")
    with pytest.raises(IdentityError, match="corrupt") as err:
        load_or_create_identity(path)
    assert "delete it to make a new one" in _one_line(err.value)
    _write(path, b"")
    with pytest.raises(IdentityError, match="is empty; delete it"):
        load_or_create_identity(path)


def test_in_credentials_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setattr(secrets, "CREDENTIALS_ROOT", tmp_path / "creds")
    assert in_credentials_dir(tmp_path / "creds" / "unit.service" / "k")
    assert not in_credentials_dir(tmp_path / "creds" / "k")
    assert not in_credentials_dir(tmp_path / "creds" / "unit.service" / "sub" / "k")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "mine"))
    assert in_credentials_dir(tmp_path / "mine" / "k")
    assert not in_credentials_dir(tmp_path / "other" / "k")
