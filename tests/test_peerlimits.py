"""Per-peer limits with a fake clock: token buckets, pacing, refusals, sessions, KV shares,
connection caps, and that one peer over a limit leaves every other peer alone."""

from __future__ import annotations

import pytest

import agent.policy.peerlimits as peerlimits
from agent.config import LimitsConfig
from agent.policy.peerlimits import (
    MAX_STRIKES,
    LimitExceeded,
    PeerLimits,
    TokenBucket,
    connection_verdict,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _limits(**changes: object) -> LimitsConfig:
    base = {
        "per_peer_requests_per_s": 10.0,
        "per_peer_bytes_per_s": 1000.0,
        "per_peer_sessions": 2,
        "per_peer_kv_tokens": 0,
    }
    base.update(changes)
    return LimitsConfig(**base)  # type: ignore[arg-type]


def test_bucket_bursts_then_paces_and_refills_to_its_cap() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    for _ in range(5):
        assert b.wait_for(1, 0.0) == 0
        b.take(1, 0.0)
    assert b.wait_for(1, 0.0) == pytest.approx(0.1)
    b.take(3, 0.0)  # into debt: 3 tokens owed
    assert b.wait_for(1, 0.0) == pytest.approx(0.4)
    assert b.wait_for(1, 0.4) == 0
    assert not b.full(0.5)
    assert b.full(100.0)
    assert b.wait_for(6, 100.0) == pytest.approx(0.1)  # never more than the burst saved up
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


def test_requests_are_free_within_the_burst_then_slowed_then_refused() -> None:
    clock = Clock()
    lim = PeerLimits(_limits(), clock=clock, max_wait_s=0.5)
    waits = [lim.admit("p", 10) for _ in range(10)]
    assert waits == [0.0] * 10
    # Beyond the burst each request waits its turn (10/s: 0.1 s more each) ...
    assert lim.admit("p", 10) == pytest.approx(0.1)
    assert lim.admit("p", 10) == pytest.approx(0.2)
    for _ in range(3):
        lim.admit("p", 10)
    assert lim.throttled == 5
    # ... until the wait would pass max_wait: refused, and not charged.
    with pytest.raises(LimitExceeded) as err:
        lim.admit("p", 10)
    assert err.value.code == "rate_limited"
    assert lim.refused == {"rate_limited": 1}
    clock.t += 0.6  # the debt of 0.5 s is repaid: back to pacing, not refusing
    assert lim.admit("p", 10) == pytest.approx(0.0, abs=1e-9)
    assert lim.admit("p", 10) == pytest.approx(0.1)


def test_bytes_per_second_paces_big_frames() -> None:
    clock = Clock()
    lim = PeerLimits(_limits(per_peer_requests_per_s=1000.0), clock=clock, max_wait_s=2.0)
    assert lim.admit("p", 1000) == 0  # one second's burst
    assert lim.admit("p", 500) == pytest.approx(0.5)
    # A frame larger than the burst is not refused forever: it waits for its bytes.
    clock.t += 10
    assert lim.admit("p", 2500) == pytest.approx(1.5)
    with pytest.raises(LimitExceeded, match="bytes/s"):
        lim.admit("p", 1000)


def test_a_flooding_peer_does_not_slow_anyone_else() -> None:
    clock = Clock()
    lim = PeerLimits(_limits(), clock=clock, max_wait_s=0.5)
    refused = 0
    for _ in range(200):
        try:
            lim.admit("flood", 10)
        except LimitExceeded:
            refused += 1
    assert refused > 150
    assert [lim.admit("calm", 10) for _ in range(10)] == [0.0] * 10


def test_strikes_drop_a_peer_that_keeps_flooding_and_are_forgiven_after_a_pause() -> None:
    clock = Clock()
    lim = PeerLimits(_limits(per_peer_requests_per_s=10.0), clock=clock, max_wait_s=0.5)
    strikes = 0
    while not lim.should_drop("p"):
        try:
            lim.admit("p", 0)  # many streams at once: nobody waits before the next
        except LimitExceeded:
            strikes += 1
        clock.t += 0.01  # 100 requests/s against 10/s: some are still admitted
    assert strikes == MAX_STRIKES
    assert not lim.should_drop("other") and not lim.should_drop("never-seen")
    clock.t += 10  # quiet long enough for its bucket to refill
    lim.admit("p", 0)
    assert not lim.should_drop("p")


def test_sessions_per_peer() -> None:
    lim = PeerLimits(_limits(), clock=Clock())
    lim.open_session("a", 0)
    lim.open_session("a", 0)
    with pytest.raises(LimitExceeded) as err:
        lim.open_session("a", 0)
    assert err.value.code == "too_many_sessions"
    lim.open_session("b", 0)  # another peer is unaffected
    assert lim.sessions_of("a") == 2 and lim.sessions_of("b") == 1
    lim.close_session("a", 0)
    lim.open_session("a", 0)
    assert lim.status()["peers_with_sessions"] == 2
    assert lim.status()["refused"] == {"too_many_sessions": 1}
    lim.close_session("nobody", 5)  # unknown peers are ignored


def test_kv_share_is_a_fraction_of_the_budget() -> None:
    lim = PeerLimits(_limits(per_peer_sessions=100, per_peer_kv_share=0.5), clock=Clock())
    lim.open_session("a", 10**9)  # no budget known yet: no per-peer cap
    lim.close_session("a", 10**9)
    lim.set_kv_budget(budget_bytes=1000, bytes_per_token=10)
    assert lim.kv_cap_bytes == 500
    lim.open_session("a", 300)
    with pytest.raises(LimitExceeded) as err:
        lim.open_session("a", 300)
    assert err.value.code == "kv_budget"
    lim.open_session("b", 500)
    lim.close_session("a", 300)
    lim.open_session("a", 500)


def test_kv_share_in_tokens_when_set() -> None:
    lim = PeerLimits(_limits(per_peer_kv_tokens=7), clock=Clock())
    lim.set_kv_budget(budget_bytes=10**6, bytes_per_token=10)
    assert lim.kv_cap_bytes == 70
    lim.open_session("a", 70)
    with pytest.raises(LimitExceeded, match="KV"):
        lim.open_session("a", 1)


def test_idle_peers_are_forgotten_busy_ones_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peerlimits, "MAX_TRACKED_PEERS", 10)
    clock = Clock()
    lim = PeerLimits(_limits(), clock=clock)
    lim.open_session("busy", 0)
    for i in range(30):
        lim.admit(f"p{i}", 1)
        clock.t += 1.0  # buckets refill: the peer is idle again
    assert len(lim._peers) <= 10
    assert lim.sessions_of("busy") == 1


def test_connection_verdict() -> None:
    lim = LimitsConfig(max_connections=3, per_peer_connections=2)
    assert connection_verdict(3, 2, lim) is None
    assert connection_verdict(4, 1, lim) == "max_connections"
    assert connection_verdict(2, 3, lim) == "peer_connections"


# --- shares, streams, bytes as they arrive --------------------------------------------------------


def test_kv_share_defaults_to_a_quarter_and_explicit_tokens_win() -> None:
    lim = PeerLimits(LimitsConfig(), clock=Clock())
    lim.set_kv_budget(budget_bytes=1000, bytes_per_token=10)
    assert lim.kv_cap_bytes == 250
    for peer in "abc":
        lim.open_session(peer, 250)
    with pytest.raises(LimitExceeded, match="KV"):
        lim.open_session("a", 1)  # two (or three) peer ids cannot take the whole budget
    lim.open_session("d", 250)
    explicit = PeerLimits(LimitsConfig(per_peer_kv_tokens=90, per_peer_kv_share=0.1))
    explicit.set_kv_budget(budget_bytes=1000, bytes_per_token=10)
    assert explicit.kv_cap_bytes == 900
    none_yet = PeerLimits(LimitsConfig())
    none_yet.set_kv_budget(budget_bytes=0, bytes_per_token=10)
    assert none_yet.kv_cap_bytes == 0


def test_session_share_caps_a_peer_below_per_peer_sessions() -> None:
    assert PeerLimits(LimitsConfig()).session_cap == 8  # a quarter of 32, under 16
    assert PeerLimits(LimitsConfig(max_sessions=100)).session_cap == 16  # per_peer_sessions
    assert PeerLimits(LimitsConfig(per_peer_session_share=1.0)).session_cap == 16
    assert PeerLimits(LimitsConfig(max_sessions=64, per_peer_session_share=0.1)).session_cap == 6
    # Never fewer than MIN_SHARE_SESSIONS (one agent's concurrent generations) ...
    assert PeerLimits(LimitsConfig(max_sessions=3)).session_cap == peerlimits.MIN_SHARE_SESSIONS
    # ... unless per_peer_sessions says so.
    assert PeerLimits(LimitsConfig(max_sessions=3, per_peer_sessions=2)).session_cap == 2
    lim = PeerLimits(LimitsConfig(max_sessions=32), clock=Clock())
    for _ in range(8):
        lim.open_session("a", 0)
    with pytest.raises(LimitExceeded) as err:
        lim.open_session("a", 0)
    assert err.value.code == "too_many_sessions" and "8 sessions" in str(err.value)
    lim.open_session("b", 0)


def test_streams_per_peer_are_capped_and_counted() -> None:
    lim = PeerLimits(_limits(per_peer_streams=3), clock=Clock())
    for _ in range(3):
        lim.open_stream("a")
    with pytest.raises(LimitExceeded) as err:
        lim.open_stream("a")
    assert err.value.code == "too_many_streams"
    lim.open_stream("b")  # another peer is unaffected
    assert lim.streams_of("a") == 3 and lim.streams_of("b") == 1
    assert lim.status()["refused"] == {"too_many_streams": 1}
    assert lim.status()["open_streams"] == 4
    lim.close_stream("a")
    lim.open_stream("a")
    lim.close_stream("nobody")  # unknown peers are ignored
    assert PeerLimits(LimitsConfig()).limits.per_peer_streams == 8


def test_a_peer_with_open_streams_is_not_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peerlimits, "MAX_TRACKED_PEERS", 10)
    clock = Clock()
    lim = PeerLimits(_limits(), clock=clock)
    lim.open_stream("streaming")
    for i in range(30):
        lim.admit(f"p{i}", 1)
        clock.t += 1.0
    assert lim.streams_of("streaming") == 1


def test_bytes_are_charged_as_they_arrive_and_slow_the_reader() -> None:
    clock = Clock()
    lim = PeerLimits(_limits(per_peer_bytes_per_s=1000.0), clock=clock, max_wait_s=0.5)
    # Pieces of one frame in progress: free within the burst, then each read waits its turn.
    assert lim.charge_bytes("p", 600) == 0
    assert lim.charge_bytes("p", 400) == 0
    assert lim.charge_bytes("p", 500) == pytest.approx(0.5)
    # Never refused (the bytes are here): a read past max_wait only waits longer.
    assert lim.charge_bytes("p", 1000) == pytest.approx(1.5)
    assert lim.bytes_charged == 2500 and lim.throttled_reads == 2
    # The frame's request, once whole, owes no bytes again, but waits out the debt: here
    # longer than max_wait, so refused (a strike).
    with pytest.raises(LimitExceeded, match="bytes/s"):
        lim.admit("p", 0)
    clock.t += 1.5  # the reader waited: the debt is repaid
    assert lim.admit("p", 0) == 0
    assert lim.charge_bytes("other", 1000) == 0  # nobody else notices
    status = lim.status()
    assert status["bytes_charged"] == 3500 and status["throttled_reads"] == 2


TRUSTED = "12D3KooWTrustedApiAgent0000000000000000000000000"


def test_trusted_peers_get_the_agents_limits_strangers_keep_their_share() -> None:
    """An API agent the owner runs (limits.trusted_peers) may hold every session, stream and
    KV byte of the agent; any other peer id still gets a stranger's share."""
    cfg = LimitsConfig(max_sessions=32, per_peer_streams=8, trusted_peers=(TRUSTED,))
    lim = PeerLimits(cfg, clock=Clock())
    lim.set_kv_budget(1000, 1)  # a quarter: 250 bytes for a stranger
    for _ in range(32):
        lim.open_stream(TRUSTED)
        lim.open_session(TRUSTED, 30)  # 960 bytes in all: past a stranger's 250
    with pytest.raises(LimitExceeded) as err:
        lim.open_session(TRUSTED, 0)
    assert err.value.code == "too_many_sessions"  # max_sessions still holds
    with pytest.raises(LimitExceeded):
        lim.open_stream(TRUSTED)
    lim.grow_session(TRUSTED, 500)
    for _ in range(8):
        lim.open_stream("stranger")
    with pytest.raises(LimitExceeded):
        lim.open_stream("stranger")
    with pytest.raises(LimitExceeded) as err:
        lim.open_session("stranger", 251)
    assert err.value.code == "kv_budget"
    lim.open_session("stranger", 200)
    with pytest.raises(LimitExceeded) as err:
        lim.grow_session("stranger", 51)  # a page past its share
    assert err.value.code == "kv_budget"
    lim.grow_session("stranger", 50)
