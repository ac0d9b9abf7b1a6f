"""Hostile values in validly signed ads (issue "Valid signatures, hostile values"): the peer
table is bounded (entries, new ids per relaying peer, the TTL we honour), the agent's own ad
timing stays inside the protocol whatever the table holds, and the table's views cost
O(peers) and are built once per change."""

from __future__ import annotations

import time
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
from factories import KEY, PEER, ad

from agent.config import AnnounceConfig, LimitsConfig
from agent.daemon import views
from agent.daemon.announce import Announcer
from agent.policy.peertable import (
    MAX_ANNOUNCE_INTERVAL,
    N_BLOCKS_MISMATCH,
    RELAY_BUDGET,
    TABLE_FULL,
    TTL_PER_INTERVAL,
    AdIntake,
    PeerTable,
    RelayBudget,
    TableLimits,
    announce_interval,
    announce_ttl,
)
from agent.policy.placement import choose_span, coverage, coverage_runs
from protocol import AdRejected, AdValidator, decode_signed_ad, encode_signed_ad
from protocol.ads import MAX_BLOCKS, MAX_TTL
from protocol.forward import (
    MAX_BLOCK_INDEX,
)

MODEL = "tiny-llama@ab12cd34"
_ad = partial(ad, ttl=10.0)


def _table(max_peers: int, protected: set[str] | None = None, **kw: Any) -> PeerTable:
    guard = protected.__contains__ if protected is not None else None
    return PeerTable("me", TableLimits(max_peers=max_peers, **kw), protected=guard)


# --- the table's bound and eviction --------------------------------------------------------------


def test_full_table_evicts_the_least_recently_heard_unprotected_peer() -> None:
    protected = {"a"}
    t = _table(3, protected)
    for i, pid in enumerate("abc"):
        t.update(_ad(pid), now=float(i))
    t.update(_ad("b"), now=5.0)  # b heard again: c is now the least recently heard but a
    assert t.update(_ad("d"), now=6.0) == "joined"
    assert {e.ad.peer_id for e in t} == {"a", "b", "d"}  # c went; a is protected
    assert t.evicted == 1 and len(t) == 3


def test_table_of_protected_peers_refuses_newcomers_and_counts() -> None:
    t = _table(2, {"a", "b"})
    t.update(_ad("a"), now=0.0)
    t.update(_ad("b"), now=0.0)
    assert not t.has_room("z") and t.has_room("a")
    assert t.update(_ad("z"), now=1.0) == "refused"
    assert t.refused[TABLE_FULL] == 1 and "z" not in t and len(t) == 2
    assert t.update(_ad("a", seq=8), now=1.0) is None  # known peers still refresh


def test_a_failing_protected_predicate_does_not_block_eviction() -> None:
    def boom(pid: str) -> bool:
        raise RuntimeError("peerstore gone")

    t = PeerTable("me", TableLimits(max_peers=1), protected=boom)
    t.update(_ad("a"), now=0.0)
    assert t.update(_ad("b"), now=1.0) == "joined" and "a" not in t


def test_claimed_ttl_is_capped_by_our_expiry_policy() -> None:
    limits = TableLimits(max_peers=1024)
    cap = limits.ttl_cap()
    # Four intervals of a mesh of max_peers, within the protocol's maximum.
    assert cap == pytest.approx(TTL_PER_INTERVAL * 1025 / 5.0) and cap < MAX_TTL
    assert TableLimits(max_peers=3).ttl_cap() >= 120.0  # small tables: a floor
    assert TableLimits(max_ttl=30.0).ttl_cap() == 30.0
    t = PeerTable("me", limits)
    t.update(ad("long", ttl=MAX_TTL), now=0.0)
    t.update(ad("short", ttl=20.0), now=0.0)
    assert t.expire(20.0) == ["short"]
    assert t.expire(cap - 0.1) == [] and t.expire(cap) == ["long"]  # not an hour


def test_config_keys_reach_the_limits() -> None:
    limits = TableLimits.from_config(LimitsConfig(max_known_peers=7, new_peers_per_minute=3.0))
    assert (limits.max_peers, limits.new_peers_per_minute) == (7, 3.0)
    # Values that cannot work are raised to the least that does, not a crash at start-up.
    odd = TableLimits.from_config(LimitsConfig(max_known_peers=0, new_peers_per_minute=-1.0))
    assert (odd.max_peers, odd.new_peers_per_minute) == (1, 1.0)
    with pytest.raises(ValueError):
        TableLimits(max_peers=0)


def test_version_counts_changes_and_snapshots_are_fresh_copies() -> None:
    t = PeerTable("me")
    v0 = t.version
    t.update(_ad("a"), now=0.0)
    spans = t.spans_for(MODEL)
    spans.append(spans[0])  # the caller's list: the table's snapshot is not touched
    assert len(t.spans_for(MODEL)) == 1
    models = t.models()
    models["x"] = ("x", 1)
    assert "x" not in t.models()
    assert t.version > v0
    v1 = t.version
    assert t.expire(1.0) == [] and t.version == v1  # nothing changed
    t.update(_ad("a", span=(0, 8), seq=8), now=1.0)
    assert t.version > v1 and [(s.start, s.end) for s in t.spans_for(MODEL)] == [(0, 8)]


# --- new peer ids per relaying peer -------------------------------------------------------------


def test_relay_budget_burst_then_rate() -> None:
    b = RelayBudget(per_minute=60.0)
    for _ in range(60):
        assert b.allows("r", 0.0)
        b.charge("r", 0.0)
    assert not b.allows("r", 0.0) and b.allows("other", 0.0)
    assert not b.allows("r", 0.5) and b.allows("r", 1.0)  # one a second


def test_relay_budget_remembers_a_bounded_number_of_relays() -> None:
    b = RelayBudget(per_minute=1.0, max_relays=3)
    for i in range(10):
        b.charge(f"r{i}", 0.0)
    assert len(b) == 3


def _intake(
    max_peers: int = 1024, per_minute: float = 60.0, known: dict[str, int] | None = None
) -> tuple[PeerTable, AdIntake]:
    t = _table(max_peers)
    blocks = known or {}
    return t, AdIntake(t, RelayBudget(per_minute), blocks.get)


def test_intake_charges_new_ids_to_the_relaying_peer() -> None:
    t, intake = _intake(per_minute=2.0)
    for pid in ("a", "b"):
        assert intake.screen("relay", pid, 0.0) is None
        assert intake.admit("relay", _ad(pid), 0.0) is None
        t.update(_ad(pid), 0.0)
    # Over budget: dropped before it is even decoded, and again after (a race).
    assert intake.screen("relay", "c", 0.0) == RELAY_BUDGET
    assert intake.admit("relay", _ad("c"), 0.0) == RELAY_BUDGET
    # Known peers and leaving ads cost nothing; another relay has its own budget.
    assert intake.screen("relay", "a", 0.0) is None
    assert intake.admit("relay", _ad("a", seq=9), 0.0) is None
    assert intake.admit("relay", _ad("c", state="leaving"), 0.0) is None
    assert intake.admit("other", _ad("c"), 0.0) is None


def test_intake_refuses_a_known_model_with_another_block_count() -> None:
    _, intake = _intake(known={MODEL: 8})
    assert intake.admit("r", _ad("a"), 0.0) is None  # 8 blocks: as we know it
    assert intake.admit("r", _ad("b", n_blocks=4096, span=(0, 4096)), 0.0) == N_BLOCKS_MISMATCH
    assert intake.admit("r", _ad("c", model="other@1", n_blocks=4096), 0.0) is None


def test_intake_refuses_newcomers_to_a_table_of_protected_peers() -> None:
    t = _table(1, {"a"})
    t.update(_ad("a"), now=0.0)
    intake = AdIntake(t, RelayBudget(60.0))
    assert intake.admit("r", _ad("b"), 0.0) == TABLE_FULL


def test_flood_from_one_connection_is_bounded() -> None:
    """The measured attack: ~4,700 valid ads for fresh peer ids in ~20 s from one
    connection, each claiming an hour. Only a minute's budget plus the rate gets in, the
    table stays within its bound, and the entries drain out on our TTL cap."""
    t, intake = _intake(max_peers=1024, per_minute=120.0)
    accepted = 0
    for i in range(4700):
        now = i * 20.0 / 4700
        pid = f"fake{i:05d}"
        if intake.screen("attacker", pid, now) or intake.admit("attacker", _ad(pid), now):
            continue
        t.update(ad(pid, ttl=MAX_TTL), now)
        accepted += 1
    assert accepted <= 120 + 40 + 1
    assert len(t) <= 1024
    assert t.expire(20.0 + t.limits.ttl_cap()) != [] and len(t) == 0


# --- the agent's own ads ----------------------------------------------------------------------


@pytest.mark.parametrize("n_peers", [0, 10, 1000, 4_700, 50_000, 10**7])
def test_own_interval_and_ttl_stay_within_the_protocol(n_peers: int) -> None:
    interval = announce_interval(5.0, n_peers)
    ttl = announce_ttl(20.0, interval)
    assert 5.0 <= interval <= MAX_ANNOUNCE_INTERVAL == MAX_TTL / TTL_PER_INTERVAL
    assert ttl <= MAX_TTL and ttl >= TTL_PER_INTERVAL * interval - 1e-9
    # Even a config asking for more than the protocol allows.
    assert announce_ttl(10**6, announce_interval(10**6, n_peers)) == MAX_TTL


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("state", ["online", "leaving", "joining"])
def test_announcer_ads_pass_our_own_check_with_a_huge_table(state: str) -> None:
    mesh = SimpleNamespace(peer_id=PEER, listen_addrs=lambda: [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"])
    lifecycle = SimpleNamespace(state="online", reason=lambda: "")
    a = Announcer(AnnounceConfig(), mesh, KEY, _Sized(100_000), lifecycle, lambda: None)  # type: ignore[arg-type]
    ad_ = a.build_ad(state)
    assert ad_.ttl <= MAX_TTL
    data = encode_signed_ad(ad_, KEY)  # raised "peers would reject this ad" before
    v = AdValidator()
    assert v.check(data, sender=PEER, now=time.time()).ttl == ad_.ttl


# --- protocol bounds ---------------------------------------------------------------------------


def test_block_bounds_are_realistic_and_consistent() -> None:
    assert MAX_BLOCKS == MAX_BLOCK_INDEX == 4096
    ok = ad(KEY, n_blocks=MAX_BLOCKS, span=(0, MAX_BLOCKS))
    assert decode_signed_ad(encode_signed_ad(ok, KEY)).n_blocks == MAX_BLOCKS
    with pytest.raises(ValueError):
        encode_signed_ad(ad(KEY, n_blocks=MAX_BLOCKS + 1, span=(0, 1)), KEY)
    from factories import envelope

    from protocol.ads import _ad_to_map

    big = {**_ad_to_map(ok), "n_blocks": 1 << 20, "span": [0, 1 << 20]}
    with pytest.raises(AdRejected) as info:
        AdValidator().check(envelope(big), sender=None, now=ok.timestamp)
    assert info.value.reason == "malformed"


# --- views: O(peers), once per change ------------------------------------------------------------


def test_coverage_runs_do_not_walk_claimed_blocks() -> None:
    from factories import peer_span

    # A billion claimed blocks: two events per span, never a per-block walk.
    spans = [peer_span("a", 0, 10**9), peer_span("b", 5, 10), peer_span("c", 10, 20)]
    t0 = time.perf_counter()
    runs = coverage_runs(spans, 10**9)
    assert time.perf_counter() - t0 < 0.1
    assert runs == [(0, 5, 1), (5, 20, 2), (20, 10**9, 1)]
    assert coverage(spans, 25) == [1] * 5 + [2] * 15 + [1] * 5


class _Mesh:
    peer_id = "me"

    def is_connected(self, pid: str) -> bool:
        return False


def _hostile_table(n_models: int, blocks: int = MAX_BLOCKS) -> PeerTable:
    t = PeerTable("me", TableLimits(max_peers=2048))
    for i in range(10):
        t.update(ad(f"real{i}", model=MODEL, n_blocks=8, span=(0, 8)), 0.0)
    for i in range(n_models):
        t.update(ad(f"h{i}", model=f"fake{i}@1", n_blocks=blocks, span=(0, blocks)), 0.0)
    return t


def test_peer_views_are_built_once_per_change(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _hostile_table(100)
    pv = views.PeerViews(t)
    built: list[str] = []
    real = views._coverage_row

    def counting(model_id: str, *args: Any) -> dict[str, Any]:
        built.append(model_id)
        return real(model_id, *args)

    monkeypatch.setattr(views, "_coverage_row", counting)
    first = pv.coverage(None)
    n = len(built)
    for _ in range(20):
        assert pv.coverage(None) == first
        views.peers(_Mesh(), t, pv.coverage(None), pv)
    assert len(built) == n  # no request rebuilt anything
    t.update(ad("real0", model=MODEL, n_blocks=8, span=(0, 4), seq=99), 1.0)
    changed = pv.coverage(None)
    assert len(built) == 2 * n
    row = next(r for r in changed if r["model"] == MODEL)
    assert row["replicas"] == [10] * 4 + [9] * 4 and row["complete"]


def test_coverage_rows_stay_bounded_and_own_model_comes_first() -> None:
    t = _hostile_table(300)
    pv = views.PeerViews(t)
    rows = pv.coverage(("mine@1", "mine", 12, None))
    assert len(rows) == views.MAX_COVERAGE_MODELS and pv.coverage_omitted == 302 - len(rows)
    assert rows == sorted(rows, key=lambda r: r["model"])
    by_model = {r["model"]: r for r in rows}
    assert by_model["mine@1"]["replicas"] == [0] * 12 and not by_model["mine@1"]["complete"]
    assert by_model[MODEL]["replicas"] == [10] * 8  # the model most peers serve
    assert all(len(r["replicas"]) == r["n_blocks"] <= MAX_BLOCKS for r in rows)
    out = views.peers(_Mesh(), t, rows, pv)
    assert len(out["peers"]) == len(t) and out["coverage_omitted"] == pv.coverage_omitted
    assert set(out["peers"][0]) >= {"peer_id", "addrs", "span", "age_s", "connected"}


def test_peers_call_with_a_full_hostile_table_is_quick() -> None:
    """1,024 entries, each a distinct model claiming 4,096 blocks (before: 60 such ads with
    2^20 blocks took ~20 s per call and ~900 MB)."""
    import json

    t = _hostile_table(1024)
    pv = views.PeerViews(t)
    t0 = time.perf_counter()
    out = views.peers(_Mesh(), t, pv.coverage(None), pv)
    size = len(json.dumps(out))
    assert time.perf_counter() - t0 < 3.0  # ~0.1 s here; generous for a loaded CI box
    assert size < 4_000_000


def test_placement_over_a_big_table_is_quick() -> None:
    from factories import peer_span

    spans = [peer_span(f"p{i}", i % 80, i % 80 + 40, throughput=float(i)) for i in range(5000)]
    t0 = time.perf_counter()
    start, end = choose_span(spans, 120, 20, self_id="me")
    assert time.perf_counter() - t0 < 3.0
    assert end - start == 20


def test_the_standalone_client_charges_new_ids_to_their_relay_too() -> None:
    """`shardmesh generate --bootstrap` keeps a peer table of its own: bounded, and fed
    through the same intake as an agent's, so a flood through its bootstrap peer is cut off
    at the relay budget."""
    from types import SimpleNamespace

    from agent.policy.peertable import DEFAULT_NEW_PEERS_PER_MINUTE
    from agent.route.standalone import StandaloneView

    mesh = SimpleNamespace(host=None, peer_id="client", is_connected=lambda pid: True)
    view = StandaloneView(mesh)
    intake = mesh.intake  # type: ignore[attr-defined]
    assert isinstance(intake, AdIntake) and intake.table is view.table
    admitted = 0
    for i in range(int(DEFAULT_NEW_PEERS_PER_MINUTE) * 3):
        pid = f"fresh{i}"
        if (
            intake.screen("bootstrap", pid, 0.0) is None
            and intake.admit("bootstrap", _ad(pid), 0.0) is None
        ):
            view.on_ad(_ad(pid))
            admitted += 1
    assert admitted == int(DEFAULT_NEW_PEERS_PER_MINUTE)  # a minute's burst, then refused
    assert len(view.table) == admitted
