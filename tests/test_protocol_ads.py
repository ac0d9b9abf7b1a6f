"""Signed capacity ads: encoding, signatures, peer ids (against libp2p) and the validator."""

from __future__ import annotations

import math

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from factories import (
    KEY,
    NOW,
    OTHER_KEY,
    OTHER_PEER,
    PEER,
    addrs_of,
    envelope,
    key,
    peer_id,
    signed_ad,
)
from factories import ad as make_ad  # `ad` names the ads under test here
from hypothesis import example, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from protocol.ads import (
    AD_REJECT_REASONS,
    AD_SIGNING_PREFIX,
    MAX_AD_SIZE,
    AdValidator,
    CapacityAd,
    DeviceSummary,
    _ad_to_map,
    decode_signed_ad,
    encode_signed_ad,
    peer_id_from_ed25519,
    public_key_raw,
)
from protocol.codec import pack, unpack_map
from protocol.errors import (
    AdRejected,
    BadSignature,
    DecodeError,
    FrameTooLarge,
    ProtocolError,
    VersionMismatch,
)

# --- peer ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed", [bytes(32), bytes(range(32)), b"\xff" * 32, b"shardmesh" * 3 + b"12345"]
)
def test_peer_id_matches_libp2p(seed: bytes) -> None:
    kp = create_new_key_pair(seed)
    expected = ID.from_pubkey(kp.public_key).to_base58()
    ours = peer_id_from_ed25519(kp.public_key.to_bytes())
    assert ours == expected and ours.startswith("12D3KooW")
    # The same seed in cryptography gives the same public key, hence the same id.
    crypto_key = Ed25519PrivateKey.from_private_bytes(kp.private_key.to_bytes())
    assert peer_id_from_ed25519(public_key_raw(crypto_key)) == expected


def test_peer_id_rejects_wrong_key_length() -> None:
    with pytest.raises(ValueError):
        peer_id_from_ed25519(b"\x01" * 31)


def test_libp2p_identity_signs_ads() -> None:
    # The agent's libp2p key pair can sign ads; libp2p's own verifier accepts the signature.
    kp = create_new_key_pair(b"\x42" * 32)
    signer = Ed25519PrivateKey.from_private_bytes(kp.private_key.to_bytes())
    ad = make_ad(signer)
    assert ad.peer_id == ID.from_pubkey(kp.public_key).to_base58()
    data = encode_signed_ad(ad, signer)
    assert decode_signed_ad(data) == ad
    env = unpack_map(data, max_size=MAX_AD_SIZE)
    assert kp.public_key.verify(AD_SIGNING_PREFIX + env["ad"], env["sig"])


# --- encode / decode --------------------------------------------------------------------------


def test_round_trip() -> None:
    ad = make_ad()
    data = encode_signed_ad(ad, KEY)
    assert len(data) < 1024
    assert decode_signed_ad(data) == ad
    assert ad.expires_at == NOW + 60.0


@pytest.mark.parametrize(
    "changes",
    [
        {"model": None, "model_name": None, "n_blocks": None, "span": None, "state": "joining"},
        {"span": None, "reason": "not enough memory for one block"},
        {"devices": (), "addrs": ()},
        {"state": "leaving", "sessions": 0},
        {"state": "draining", "span": (0, 8), "ttl": 3600.0},
        {"throughput": 0, "timestamp": 5, "ttl": 1},  # ints where floats go
    ],
)
def test_round_trip_variants(changes: dict) -> None:
    ad = make_ad(**changes)
    got = decode_signed_ad(encode_signed_ad(ad, KEY))
    assert got == ad
    assert type(got.throughput) is float and type(got.ttl) is float


def test_encode_refuses_foreign_peer_id() -> None:
    with pytest.raises(ValueError):
        encode_signed_ad(make_ad(peer_id=OTHER_PEER), KEY)


@pytest.mark.parametrize(
    "changes",
    [
        {"span": (0, 9)},
        {"devices": (DeviceSummary("gpu", "g", 10, 11, None),)},
        {"ttl": 0.0},
        {"state": "asleep"},
        {"addrs": addrs_of(PEER, "/ip4/10.0.0.1") * 33},
        {"version": "1.0"},
        {
            "addrs": tuple(f"/dns/{'a' * 250}/p2p/{PEER}" for _ in range(32)),
            "devices": (DeviceSummary("cpu", "c" * 256, 1, 1, None),) * 64,
        },
    ],
)
def test_encode_refuses_ads_peers_would_reject(changes: dict) -> None:
    with pytest.raises(ValueError, match=r"reject|exceeds"):
        encode_signed_ad(make_ad(**changes), KEY)


def test_other_major_can_be_signed() -> None:
    data = encode_signed_ad(make_ad(version="2.0.0", ttl=0.0), KEY)
    with pytest.raises(VersionMismatch):
        decode_signed_ad(data)


def test_long_reason_is_truncated() -> None:
    ad = decode_signed_ad(encode_signed_ad(make_ad(reason="r" * 10_000), KEY))
    assert ad.reason == "r" * 512


def test_missing_reason_defaults_to_empty() -> None:
    m = _ad_to_map(make_ad())
    del m["reason"]
    assert decode_signed_ad(envelope(m)).reason == ""


def _envelope(data: bytes) -> dict:
    return unpack_map(data, max_size=MAX_AD_SIZE)


def _tamper_ad_byte(data: bytes) -> bytes:
    env = _envelope(data)
    ad = bytearray(env["ad"])
    i = ad.index(b"online")
    ad[i : i + 6] = b"onlinf"
    return pack({**env, "ad": bytes(ad)})


def _signed_by_other_with_our_key(data: bytes) -> bytes:
    env = _envelope(data)
    return pack({**env, "sig": OTHER_KEY.sign(AD_SIGNING_PREFIX + env["ad"])})


def _other_key_claiming_our_id(data: bytes) -> bytes:
    # A valid signature by OTHER_KEY over an ad that claims to be PEER.
    env = _envelope(data)
    return pack(
        {
            "ad": env["ad"],
            "key": public_key_raw(OTHER_KEY),
            "sig": OTHER_KEY.sign(AD_SIGNING_PREFIX + env["ad"]),
        }
    )


def _flip_sig_bit(data: bytes) -> bytes:
    env = _envelope(data)
    sig = bytearray(env["sig"])
    sig[10] ^= 1
    return pack({**env, "sig": bytes(sig)})


def _unprefixed_signature(data: bytes) -> bytes:
    env = _envelope(data)
    return pack({**env, "sig": KEY.sign(env["ad"])})


FORGERIES = {
    "tampered ad byte": _tamper_ad_byte,
    "signature from another key": _signed_by_other_with_our_key,
    "other key claims our peer id": _other_key_claiming_our_id,
    "flipped signature bit": _flip_sig_bit,
    "signature without domain prefix": _unprefixed_signature,
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_forgeries_rejected(forge) -> None:
    with pytest.raises(BadSignature):
        decode_signed_ad(forge(signed_ad()))


def test_unknown_major_rejected_even_when_signed() -> None:
    with pytest.raises(VersionMismatch):
        decode_signed_ad(envelope({**_ad_to_map(make_ad()), "version": "2.0.0"}))
    # Other minor/patch versions of major 1 are accepted, and a major-2 ad with an entirely
    # different layout is still reported as a version mismatch, not as malformed.
    assert decode_signed_ad(envelope({**_ad_to_map(make_ad()), "version": "1.7.3"}))
    with pytest.raises(VersionMismatch):
        decode_signed_ad(envelope({"version": "2.0.0", "peer_id": PEER, "whatever": [1]}))


def test_oversized_rejected() -> None:
    data = signed_ad()
    with pytest.raises(FrameTooLarge):
        decode_signed_ad(data, max_size=len(data) - 1)
    with pytest.raises(FrameTooLarge):
        decode_signed_ad(b"\x00" * (MAX_AD_SIZE + 1))


def _bad_map(**changes) -> dict:
    m = _ad_to_map(make_ad())
    for k, v in changes.items():
        if v is ...:
            del m[k]
        else:
            m[k] = v
    return m


BAD_FIELDS = {
    "span beyond n_blocks": _bad_map(span=[6, 9]),
    "span start == end": _bad_map(span=[3, 3]),
    "span reversed": _bad_map(span=[5, 2]),
    "span negative": _bad_map(span=[-1, 2]),
    "span of three": _bad_map(span=[0, 1, 2]),
    "span without n_blocks": _bad_map(n_blocks=None),
    "span without model": _bad_map(model=None),
    "n_blocks zero": _bad_map(n_blocks=0, span=None),
    "negative sessions": _bad_map(sessions=-1),
    "negative kv": _bad_map(kv_free_tokens=-5),
    "negative seq": _bad_map(seq=-1),
    "seq float": _bad_map(seq=1.0),
    "nan throughput": _bad_map(throughput=math.nan),
    "negative throughput": _bad_map(throughput=-1.0),
    "unknown state": _bad_map(state="sleeping"),
    "ttl zero": _bad_map(ttl=0.0),
    "ttl over max": _bad_map(ttl=3601.0),
    "ttl missing": _bad_map(ttl=...),
    "infinite timestamp": _bad_map(timestamp=math.inf),
    "too many addrs": _bad_map(addrs=[f"/ip4/10.0.0.{i}/tcp/1/p2p/{PEER}" for i in range(33)]),
    "addr too long": _bad_map(addrs=[f"/dns/{'a' * 300}/p2p/{PEER}"]),
    "addr not str": _bad_map(addrs=[b"/ip4/1.2.3.4"]),
    # Each address must be a multiaddr of this very peer: an ad cannot point dials elsewhere.
    "addr not a multiaddr": _bad_map(addrs=[f"garbage/p2p/{PEER}"]),
    "addr bare garbage": _bad_map(addrs=["garbage"]),
    "addr without peer id": _bad_map(addrs=["/ip4/10.0.0.1/tcp/4001"]),
    "addr of another peer": _bad_map(addrs=[f"/ip4/10.0.0.1/tcp/4001/p2p/{OTHER_PEER}"]),
    "addr peer id not last": _bad_map(addrs=[f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER}/p2p-circuit"]),
    "addr bad ip": _bad_map(addrs=[f"/ip4/999.0.0.1/tcp/4001/p2p/{PEER}"]),
    "too many devices": _bad_map(
        devices=[
            {"kind": "cpu", "name": "c", "memory_total": 1, "memory_free": 1, "utilization": None}
        ]
        * 65
    ),
    "device kind": _bad_map(
        devices=[
            {"kind": "tpu", "name": "t", "memory_total": 1, "memory_free": 1, "utilization": None}
        ]
    ),
    "device free > total": _bad_map(
        devices=[
            {"kind": "gpu", "name": "g", "memory_total": 1, "memory_free": 2, "utilization": 1.0}
        ]
    ),
    "device utilization > 100": _bad_map(
        devices=[
            {"kind": "gpu", "name": "g", "memory_total": 2, "memory_free": 1, "utilization": 101.0}
        ]
    ),
    "device not a map": _bad_map(devices=["gpu"]),
    "peer_id missing": _bad_map(peer_id=...),
    "version garbage": _bad_map(version="one"),
    "version int": _bad_map(version=1),
    "reason too long": _bad_map(reason="r" * 600),
}


@pytest.mark.parametrize("m", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_fields_rejected_as_malformed(m: dict) -> None:
    with pytest.raises(DecodeError):
        decode_signed_ad(envelope(m))


GARBAGE = {
    "empty": b"",
    "random": b"\x93\x01\x02\x03garbage",
    "not a map": pack([b"ad", b"key", b"sig"]),
    "no sig": pack({"ad": b"x", "key": b"k" * 32}),
    "short key": pack({"ad": b"x", "key": b"k" * 31, "sig": b"s" * 64}),
    "sig as str": pack({"ad": b"x", "key": b"k" * 32, "sig": "s" * 64}),
    "ad as map": pack({"ad": {"version": "1.0.0"}, "key": b"k" * 32, "sig": b"s" * 64}),
    "trailing bytes": signed_ad() + b"\x00",
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_envelopes_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_signed_ad(data)


def test_signed_garbage_ad_body_is_malformed() -> None:
    for ad_bytes in (b"\xc1", pack([1]), pack({"version": "1.0.0"}) + b"x"):
        env = pack(
            {
                "ad": ad_bytes,
                "key": public_key_raw(KEY),
                "sig": KEY.sign(AD_SIGNING_PREFIX + ad_bytes),
            }
        )
        with pytest.raises(DecodeError):
            decode_signed_ad(env)


# --- AdValidator ------------------------------------------------------------------------------


def test_validator_accepts_and_tracks_seq() -> None:
    v = AdValidator()
    assert set(v.rejected) == set(AD_REJECT_REASONS) and not any(v.rejected.values())
    ad = v.check(signed_ad(seq=1), sender=PEER, now=NOW)
    assert ad.seq == 1 and v.last_seq(PEER) == 1 and v.accepted == 1
    assert v.check(signed_ad(seq=2), sender=None, now=NOW + 1).seq == 2
    assert v.last_seq(PEER) == 2 and len(v) == 1


def _rejection(v: AdValidator, data: bytes, *, sender: str | None = None, now: float = NOW) -> str:
    with pytest.raises(AdRejected) as info:
        v.check(data, sender=sender, now=now)
    return info.value.reason


def test_validator_rejects_each_reason_and_counts() -> None:
    v = AdValidator(max_clock_skew=30.0)
    good = signed_ad(seq=5)
    v.check(good, sender=PEER, now=NOW)
    cases = [
        ("oversized", b"\x00" * (MAX_AD_SIZE + 1), {}),
        ("malformed", b"\x81\xa1a", {}),
        ("malformed", envelope(_bad_map(state="asleep")), {}),
        ("version", envelope({**_ad_to_map(make_ad(seq=9)), "version": "3.1.0"}), {}),
        ("bad_signature", _tamper_ad_byte(signed_ad(seq=9)), {}),
        ("bad_signature", _other_key_claiming_our_id(signed_ad(seq=9)), {}),
        ("wrong_sender", signed_ad(seq=9), {"sender": OTHER_PEER}),
        ("replayed", good, {}),
        ("replayed", signed_ad(seq=4), {}),
        ("expired", signed_ad(seq=9, timestamp=NOW - 61, ttl=60.0), {}),
        ("future", signed_ad(seq=9, timestamp=NOW + 31), {}),
    ]
    expected_counts = dict.fromkeys(AD_REJECT_REASONS, 0)
    for reason, data, kw in cases:
        assert _rejection(v, data, **kw) == reason
        expected_counts[reason] += 1
    assert v.rejected == expected_counts
    assert v.last_seq(PEER) == 5 and v.accepted == 1
    # Within the skew and exactly at expiry still pass; the next seq is accepted.
    assert v.check(signed_ad(seq=9, timestamp=NOW + 30), sender=None, now=NOW)
    edge = make_ad(seq=10, timestamp=NOW - 60, ttl=60.0)
    assert v.check(encode_signed_ad(edge, KEY), sender=None, now=NOW) == edge


def test_leaving_ad_accepted() -> None:
    v = AdValidator()
    ad = make_ad(state="leaving", span=None, sessions=0, seq=3)
    assert v.check(encode_signed_ad(ad, KEY), sender=PEER, now=NOW).state == "leaving"


def test_forget_allows_lower_seq() -> None:
    # A peer that restarted and lost its counter can be forgotten on purpose.
    v = AdValidator()
    v.check(signed_ad(seq=100), sender=None, now=NOW)
    v.forget(PEER)
    v.forget("never-seen")
    assert v.last_seq(PEER) is None
    assert v.check(signed_ad(seq=1), sender=None, now=NOW).seq == 1


def test_validator_forgets_expired_peers_but_not_replays() -> None:
    v = AdValidator()
    long_lived = signed_ad(seq=1, ttl=600.0)
    v.check(long_lived, sender=None, now=NOW)
    v.check(signed_ad(seq=2, ttl=10.0), sender=None, now=NOW)
    # seq 2 has expired but seq 1 has not: the peer must still be remembered.
    assert _rejection(v, long_lived, now=NOW + 100) == "replayed"
    assert v.last_seq(PEER) == 2
    # Once everything accepted from it has expired, the peer is dropped; replays now expire.
    v.check(
        signed_ad(OTHER_KEY, seq=1, timestamp=NOW + 700),
        sender=None,
        now=NOW + 700,
    )
    assert v.last_seq(PEER) is None and len(v) == 1
    assert _rejection(v, long_lived, now=NOW + 700) == "expired"


def test_validator_memory_is_capped() -> None:
    v = AdValidator(max_peers=3)
    keys = [key(i) for i in range(5)]
    for k in keys:
        v.check(signed_ad(k, seq=1), sender=None, now=NOW)
    assert len(v) == 3
    peers = [peer_id(k) for k in keys]
    # Least recently heard from go first.
    assert v.last_seq(peers[0]) is None and v.last_seq(peers[1]) is None
    assert all(v.last_seq(p) == 1 for p in peers[2:])


# --- property tests ---------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
_AD_KEYS = list(_ad_to_map(make_ad()))
# Shared across examples so state (seqs, counters) accumulates like a long-running receiver.
VALIDATOR = AdValidator()


_SIGNED = signed_ad()


@st.composite
def _flipped(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with one to three bytes changed (XORed with a non-zero byte)."""
    out = bytearray(data)
    for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=3, unique=True)):
        out[i] ^= draw(st.integers(1, 255))
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | _flipped(_SIGNED))
@example(_SIGNED)
def test_arbitrary_bytes_decode_signed_ad(data: bytes) -> None:
    try:
        ad = decode_signed_ad(data)
    except ProtocolError:
        return
    # Accepted only if the envelope really carries a signature, under the ads' domain prefix,
    # by the key that owns the ad's peer id: checked here independently of decode_signed_ad.
    env = unpack_map(data, max_size=MAX_AD_SIZE)
    assert peer_id_from_ed25519(env["key"]) == ad.peer_id
    Ed25519PublicKey.from_public_bytes(env["key"]).verify(env["sig"], AD_SIGNING_PREFIX + env["ad"])
    # Here that leaves one input: the genuine envelope; no corruption of it passes.
    assert data == _SIGNED and ad == make_ad()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_AD_KEYS), _values, max_size=6))
def test_signed_arbitrary_fields(changes: dict) -> None:
    # Properly signed ads whose fields are arbitrary values get past the signature check.
    m = {**_ad_to_map(make_ad()), **changes}
    try:
        ad = decode_signed_ad(envelope(m))
    except ProtocolError:
        return
    assert isinstance(ad, CapacityAd)
    assert decode_signed_ad(encode_signed_ad(ad, KEY)) == ad


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300) | st.builds(lambda seq: signed_ad(seq=seq), st.integers(0, 5)),
    st.sampled_from([None, PEER, OTHER_PEER]),
    st.floats(min_value=NOW - 100, max_value=NOW + 100),
)
def test_validator_arbitrary_input(data: bytes, sender: str | None, now: float) -> None:
    v = VALIDATOR
    before = sum(v.rejected.values()) + v.accepted
    try:
        ad = v.check(data, sender=sender, now=now)
    except AdRejected as e:
        assert e.reason in AD_REJECT_REASONS
    else:
        assert isinstance(ad, CapacityAd)
    assert sum(v.rejected.values()) + v.accepted == before + 1
