"""The peer table: expiry on our clock, leaving ads, connected grace."""

from __future__ import annotations

from functools import partial

from factories import ad

from agent.policy.peertable import PeerTable

# Ads that live 10 s; the ad's own timestamp plays no part (expiry runs on our clock).
_ad = partial(ad, ttl=10.0)


def test_join_expire_leave() -> None:
    t = PeerTable("me")
    assert t.update(_ad("a"), now=0.0) == "joined"
    assert t.update(_ad("a"), now=5.0) is None  # refreshed, not new
    assert t.update(_ad("me"), now=5.0) is None  # our own ad never enters the table
    assert t.expire(14.9) == [] and len(t) == 1  # 10 s after the last ad, not the first
    assert t.expire(15.0) == ["a"] and len(t) == 0
    t.update(_ad("b"), now=0.0)
    assert t.update(_ad("b", state="leaving"), now=1.0) == "left"
    assert len(t) == 0
    assert t.update(_ad("c", state="leaving"), now=1.0) is None  # unknown peer leaving


def test_connected_peer_gets_one_more_ttl() -> None:
    t = PeerTable("me")
    t.update(_ad("a"), now=0.0)
    t.update(_ad("b"), now=0.0)
    connected = {"a"}.__contains__
    assert t.expire(12.0, connected) == ["b"]  # b is gone; a is still connected
    assert t.expire(19.9, connected) == []
    assert t.expire(20.0, connected) == ["a"]  # two TTLs without an ad: gone anyway


def test_spans_and_models_snapshot() -> None:
    t = PeerTable("me")
    t.update(_ad("a"), now=0.0)  # factories.ad: blocks 2:6 of the 8-block tiny-llama@ab12cd34
    t.update(_ad("b", state="draining"), now=0.0)
    spans = t.spans_for("tiny-llama@ab12cd34")
    assert {(s.peer_id, s.state, s.start, s.end) for s in spans} == {
        ("a", "online", 2, 6),
        ("b", "draining", 2, 6),
    }
    assert t.spans_for("other") == []
    assert t.models() == {"tiny-llama@ab12cd34": ("tiny-llama", 8)}


def test_table_bounded_with_protected_peers_kept() -> None:
    from agent.policy.peertable import TableLimits

    connected = {"p0"}
    t = PeerTable("me", TableLimits(max_peers=10), protected=connected.__contains__)
    for i in range(100):
        t.update(_ad(f"p{i}"), now=float(i))
    assert len(t) == 10 and "p0" in t  # protected: stays though heard first
    assert {e.ad.peer_id for e in t} == {"p0", *(f"p{i}" for i in range(91, 100))}
    assert t.evicted == 90


def test_expiry_honours_at_most_our_ttl_cap() -> None:
    from agent.policy.peertable import TableLimits

    t = PeerTable("me", TableLimits(max_ttl=100.0))
    t.update(ad("a", ttl=3600.0), now=0.0)
    connected = {"a"}.__contains__
    assert t.expire(99.9, connected) == []
    assert t.expire(150.0, connected) == []  # connected: one more (capped) TTL
    assert t.expire(200.0, connected) == ["a"]  # not 7,200 s
