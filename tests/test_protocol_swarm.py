"""The private-swarm handshake as a pure state machine: framing, keys, proofs, and the attacks
the design names (wrong secret, relay, replay, reflection, protocol abuse)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.codec import pack
from protocol.errors import DecodeError, FrameTooLarge, ProtocolError
from protocol.swarm import (
    MAC_LEN,
    MAX_AUTH_FRAME,
    MIN_SECRET_LEN,
    NONCE_LEN,
    SWARM_AUTH_PROTOCOL_ID,
    AuthDecoder,
    AuthFailed,
    AuthMessage,
    Challenge,
    Handshake,
    Hello,
    Proof,
    Refused,
    _hkdf,
    check_secret,
    decode_auth,
    derive_key,
    encode_auth,
    fingerprint,
)

SECRET = b"correct horse battery staple, long enough to pass"
OTHER = b"a different secret of sufficient length, surely!!"
A, B, M = b"peer-a-id", b"peer-b-id", b"peer-m-id"


def _roundtrip(msg: AuthMessage) -> AuthMessage:
    dec = AuthDecoder()
    dec.feed(encode_auth(msg))
    out = dec.next_message()
    assert dec.next_message() is None
    return out


def test_protocol_id() -> None:
    assert SWARM_AUTH_PROTOCOL_ID == "/shardmesh/swarm-auth/1.0.0"


@pytest.mark.parametrize(
    "msg",
    [
        Hello(nonce=bytes(range(NONCE_LEN))),
        Challenge(nonce=b"\xff" * NONCE_LEN),
        Proof(mac=b"\x01" * MAC_LEN),
        Refused(reason="bad_proof"),
    ],
)
def test_messages_roundtrip(msg: AuthMessage) -> None:
    assert _roundtrip(msg) == msg


def test_decoder_takes_bytes_one_at_a_time_and_several_frames_at_once() -> None:
    frames = encode_auth(Hello(nonce=b"n" * NONCE_LEN)) + encode_auth(Refused(reason="x"))
    dec = AuthDecoder()
    got = []
    for i in range(len(frames)):
        dec.feed(frames[i : i + 1])
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == [Hello(nonce=b"n" * NONCE_LEN), Refused(reason="x")]


def test_refusal_reason_is_truncated_not_failed() -> None:
    assert _roundtrip(Refused(reason="r" * 500)) == Refused(reason="r" * 32)


@pytest.mark.parametrize(
    "body, match",
    [
        (pack({"t": "hello", "nonce": b"short"}), "nonce"),
        (pack({"t": "hello"}), "nonce"),
        (pack({"t": "proof", "mac": b"x" * (MAC_LEN + 1)}), "mac"),
        (pack({"t": "refused", "reason": ""}), "reason"),
        (pack({"t": "nope"}), "unknown"),
        (pack([1, 2]), ""),
        (b"\xc1", ""),
        (b"", ""),
    ],
)
def test_bad_bodies_raise_decode_error(body: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match or None):
        decode_auth(body)


def test_oversized_prefix_fails_before_the_body_arrives() -> None:
    dec = AuthDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed((MAX_AUTH_FRAME + 1).to_bytes(2, "big"))


def test_decoder_bounds_what_it_buffers() -> None:
    dec = AuthDecoder()
    frame = encode_auth(Refused(reason="x" * 32))
    with pytest.raises(FrameTooLarge):
        for _ in range(100):  # never drained
            dec.feed(frame)


def test_random_bytes_only_ever_raise_protocol_errors() -> None:
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    for _ in range(3000):
        dec = AuthDecoder()
        data = rng.randbytes(rng.randrange(0, 80))
        framed = rng.random() < 0.5
        if framed:  # a plausible length prefix, so bodies get decoded
            data = len(data).to_bytes(2, "big") + data
        got: list[AuthMessage] = []
        try:  # any exception but a ProtocolError fails the test
            dec.feed(data)
            while (m := dec.next_message()) is not None:
                got.append(m)
        except ProtocolError as e:
            outcome = type(e).__name__
        else:
            outcome = "message" if got else "waiting"
        outcomes[outcome] += 1
        # Whatever decodes is a well-formed message: it survives its own round trip.
        assert all(_roundtrip(m) == m for m in got), got
        if framed:
            # A whole frame within the limit is always read: a message, or a DecodeError;
            # never left waiting for bytes that are already there.
            assert outcome in ("message", "DecodeError"), (outcome, data)
    # Both paths were taken: bodies reached decode_auth, and oversized prefixes were refused.
    assert outcomes["DecodeError"] > 0 and outcomes["FrameTooLarge"] > 0, outcomes


def test_hkdf_matches_rfc5869_reference() -> None:
    ref = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"shardmesh swarm secret", info=b"ctx"
    ).derive(SECRET)
    assert _hkdf(SECRET, b"ctx") == ref
    assert _hkdf(SECRET, b"ctx", 80)[:32] == ref


def test_keys_and_fingerprints() -> None:
    assert derive_key(SECRET) == derive_key(SECRET) != derive_key(OTHER)
    fp = fingerprint(SECRET)
    assert len(fp) == 8 and int(fp, 16) >= 0
    assert fp == fingerprint(SECRET) != fingerprint(OTHER)
    assert fp not in derive_key(SECRET).hex()  # unrelated to the handshake key


def test_short_secret_is_refused_without_quoting_it() -> None:
    short = b"x" * (MIN_SECRET_LEN - 1)
    with pytest.raises(DecodeError) as err:
        check_secret(short)
    assert "xxxx" not in str(err.value)
    with pytest.raises(DecodeError):
        derive_key(short)
    check_secret(b"x" * MIN_SECRET_LEN)


def _pair(
    key_i: bytes | None, key_r: bytes | None, ids_i=(A, B), ids_r=(B, A)
) -> tuple[Handshake, Handshake]:
    ini = Handshake(key=key_i, initiator=True, local_id=ids_i[0], remote_id=ids_i[1])
    res = Handshake(key=key_r, initiator=False, local_id=ids_r[0], remote_id=ids_r[1])
    return ini, res


def _run(ini: Handshake, res: Handshake) -> list[AuthMessage]:
    """Deliver messages both ways until nothing is left; returns the transcript."""
    transcript: list[AuthMessage] = []
    to_res = ini.start()
    to_ini = res.start()
    while to_res or to_ini:
        nxt_res: list[AuthMessage] = []
        nxt_ini: list[AuthMessage] = []
        for m in to_res:
            transcript.append(m)
            nxt_ini += res.receive(m)
        for m in to_ini:
            transcript.append(m)
            nxt_res += ini.receive(m)
        to_res, to_ini = nxt_res, nxt_ini
    return transcript


def test_same_secret_verifies_both_ways() -> None:
    key = derive_key(SECRET)
    ini, res = _pair(key, key)
    transcript = _run(ini, res)
    assert ini.verified and res.verified
    assert [type(m) for m in transcript] == [Hello, Challenge, Proof, Proof]
    # Fresh nonces every time: the same two peers never exchange the same proofs twice.
    ini2, res2 = _pair(key, key)
    assert _run(ini2, res2)[2] != transcript[2]


def test_wrong_secret_is_caught_by_the_responder_first() -> None:
    ini, res = _pair(derive_key(OTHER), derive_key(SECRET))
    res.start()
    hello = ini.start()[0]
    challenge = res.receive(hello)[0]
    proof = ini.receive(challenge)[0]
    with pytest.raises(AuthFailed) as err:
        res.receive(proof)
    assert err.value.reason == "bad_proof" and err.value.reply == "bad_proof"
    assert not res.verified
    # The initiator never got a proof from the responder; told why, it counts the same.
    with pytest.raises(AuthFailed) as err2:
        ini.receive(Refused(reason="bad_proof"))
    assert err2.value.reason == "bad_proof" and err2.value.reply is None


def test_a_relay_with_its_own_peer_id_cannot_pass_a_proof_on() -> None:
    """M sits between A and B: A dialled M (ids A, M) and M dialled B (ids M, B); M copies
    every message. B must not accept: A's proof is bound to the ids A and M."""
    key = derive_key(SECRET)
    a = Handshake(key=key, initiator=True, local_id=A, remote_id=M)
    b = Handshake(key=key, initiator=False, local_id=B, remote_id=M)
    b.start()
    hello = a.start()[0]
    challenge = b.receive(hello)[0]
    proof = a.receive(challenge)[0]
    with pytest.raises(AuthFailed, match="bad_proof"):
        b.receive(proof)


def test_replayed_proof_fails_against_new_nonces() -> None:
    key = derive_key(SECRET)
    ini, res = _pair(key, key)
    old_proof = _run(ini, res)[2]
    ini2, res2 = _pair(key, key)
    res2.start()
    res2.receive(ini2.start()[0])  # a new challenge
    with pytest.raises(AuthFailed, match="bad_proof"):
        res2.receive(old_proof)


def test_reflected_proof_is_not_the_answer() -> None:
    """A responder that echoes the initiator's own proof back does not pass."""
    key = derive_key(SECRET)
    ini = Handshake(key=key, initiator=True, local_id=A, remote_id=B)
    hello = ini.start()[0]
    assert isinstance(hello, Hello)
    proof = ini.receive(Challenge(nonce=b"c" * NONCE_LEN))[0]
    with pytest.raises(AuthFailed, match="bad_proof"):
        ini.receive(proof)


def test_open_agent_answers_no_secret_and_never_initiates() -> None:
    res = Handshake(key=None, initiator=False, local_id=B, remote_id=A)
    assert res.start() == []
    with pytest.raises(AuthFailed) as err:
        res.receive(Hello(nonce=b"n" * NONCE_LEN))
    assert err.value.reason == "peer_private" and err.value.reply == "no_secret"
    with pytest.raises(ValueError):
        Handshake(key=None, initiator=True, local_id=A, remote_id=B)
    ini = Handshake(key=derive_key(SECRET), initiator=True, local_id=A, remote_id=B)
    ini.start()
    with pytest.raises(AuthFailed) as err2:
        ini.receive(Refused(reason="no_secret"))
    assert err2.value.reason == "no_secret"


@pytest.mark.parametrize(
    "initiator, msg",
    [
        (False, Proof(mac=b"m" * MAC_LEN)),  # proof before any hello
        (False, Challenge(nonce=b"n" * NONCE_LEN)),
        (True, Hello(nonce=b"n" * NONCE_LEN)),  # a hello sent back to the initiator
        (True, Proof(mac=b"m" * MAC_LEN)),  # a proof before our challenge was answered
    ],
)
def test_out_of_order_messages_fail_as_malformed(initiator: bool, msg: AuthMessage) -> None:
    key = derive_key(SECRET)
    hs = Handshake(key=key, initiator=initiator, local_id=A, remote_id=B)
    hs.start()
    with pytest.raises(AuthFailed) as err:
        hs.receive(msg)
    assert err.value.reason == "malformed" and not hs.verified


def test_other_refusals_count_as_refused_by_peer() -> None:
    hs = Handshake(key=derive_key(SECRET), initiator=True, local_id=A, remote_id=B)
    hs.start()
    with pytest.raises(AuthFailed) as err:
        hs.receive(Refused(reason="denied"))
    assert err.value.reason == "refused_by_peer" and "denied" in str(err.value)


def test_handshake_must_start_once_before_receiving() -> None:
    hs = Handshake(key=derive_key(SECRET), initiator=False, local_id=B, remote_id=A)
    with pytest.raises(RuntimeError):
        hs.receive(Hello(nonce=b"n" * NONCE_LEN))
    hs.start()
    with pytest.raises(RuntimeError):
        hs.start()
