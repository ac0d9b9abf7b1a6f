"""Every background loop isolates a failing item (issue "Valid signatures, hostile values"):
the ad receive loop and its handler, the gossip validator, peer exchange, expiry, bootstrap
and announce each get one poisoned item and must go on with the rest. No processes: fakes
behind the same interfaces, on trio's autojump clock."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from factories import KEY, OTHER_KEY, PEER, ad, addrs_of, bare_ad, key, peer_id

from agent.config import AnnounceConfig, DiscoveryConfig
from agent.daemon import discovery as discovery_mod
from agent.daemon.announce import Announcer
from agent.daemon.discovery import Discovery
from agent.policy.peertable import RELAY_BUDGET, AdIntake, PeerTable, RelayBudget
from protocol import AdValidator, CapacityAd, encode_signed_ad


class FakeMesh:
    """What Discovery uses of agent.net.mesh.Mesh; `dials` says how each peer's dial goes:
    "ok", "hang" (answers nothing: the dial's timeout ends it), or an exception to raise."""

    def __init__(self, dials: dict[str, Any] | None = None) -> None:
        self.peer_id = "me"
        self.dials = dials or {}
        self.connected: set[str] = set()
        self.dialled: list[str] = []
        self.forgotten: list[str] = []
        self.trims = 0
        self.validator = SimpleNamespace(forget=self._forget)

    def _forget(self, pid: str) -> None:
        if pid == "poison":
            raise RuntimeError("validator state broken for this peer")
        self.forgotten.append(pid)

    def trim_router_state(self) -> None:
        self.trims += 1
        raise AttributeError("router without that attribute")

    def is_connected(self, pid: str) -> bool:
        return pid in self.connected

    def connected_peers(self) -> list[str]:
        return sorted(self.connected)

    async def dial(self, addrs: list[str], *, timeout: float = 6.0) -> str:
        pid = addrs[0].rpartition("/p2p/")[2]
        self.dialled.append(pid)
        how = self.dials.get(pid, "ok")
        if how == "hang":
            with trio.move_on_after(timeout):
                await trio.sleep_forever()
            raise ConnectionError(f"timed out dialling {addrs[0]}")
        if isinstance(how, BaseException):
            raise how
        self.connected.add(pid)
        return pid


def _discovery(mesh: FakeMesh, table: PeerTable | None = None, **cfg: Any) -> Discovery:
    if table is None:
        table = PeerTable("me")
    return Discovery(DiscoveryConfig(mdns=False, **cfg), mesh, table)  # type: ignore[arg-type]


def _peer_ad(pid: str, **kw: Any) -> CapacityAd:
    return ad(pid, addrs=addrs_of(pid), ttl=600.0, **kw)


async def _run_for(seconds: float, *loops: Any) -> None:
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


# --- peer exchange ------------------------------------------------------------------------------


async def test_peer_exchange_goes_on_past_poisoned_peers(
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery_mod, "DIAL_BACKOFF_S", 0.0)  # retried at every ad
    hangs = [f"hang{i}" for i in range(20)]
    dials: dict[str, Any] = dict.fromkeys(hangs, "hang")
    dials |= {
        "valueerr": ValueError("bad multiaddr"),
        "keyerr": KeyError("odd"),
        "typeerr": TypeError("x"),
    }
    mesh = FakeMesh(dials)
    d = _discovery(mesh)
    caplog.set_level(logging.DEBUG, "shardmesh.agent")
    for pid in ["good", *hangs, "valueerr", "keyerr", "typeerr"]:
        d.on_ad(_peer_ad(pid))
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.peer_exchange_loop)
        while "good" not in mesh.connected:
            await trio.sleep(0.1)
        took = trio.current_time() - t0
        # The same poisoned peers announce again: counted again, but logged once each.
        for pid in ["valueerr", "keyerr", "typeerr"]:
            d.on_ad(_peer_ad(pid, seq=8))
        await trio.sleep(2.0)
        d.on_ad(_peer_ad("late"))  # discovery still works
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    # 23 hopeless peers queued after the good one cost a few dial timeouts, not 23 of them.
    assert took <= 3 * discovery_mod.PEX_DIAL_TIMEOUT_S + 1, took
    assert "late" in mesh.connected
    assert d.errors.counts["peer_exchange"] == len(hangs) + 6
    for pid in ["valueerr", "keyerr", "typeerr"]:
        logged = [
            r
            for r in caplog.records
            if f"dial of {pid}" in r.getMessage() and r.levelno >= logging.INFO
        ]
        assert len(logged) == 1, [r.getMessage() for r in logged]


async def test_peer_exchange_dials_at_most_a_bound_at_once(autojump_clock: trio.abc.Clock) -> None:
    hangs = [f"hang{i}" for i in range(30)]
    mesh = FakeMesh(dict.fromkeys(hangs, "hang"))
    in_flight = 0
    peak = 0
    dial = mesh.dial

    async def counting(addrs: list[str], *, timeout: float = 6.0) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await dial(addrs, timeout=timeout)
        finally:
            in_flight -= 1

    mesh.dial = counting  # type: ignore[method-assign]
    d = _discovery(mesh)
    for pid in hangs:
        d.on_ad(_peer_ad(pid))
    await _run_for(10.0, d.peer_exchange_loop)
    assert peak == discovery_mod.PEX_CONCURRENT_DIALS
    assert len(d._want_dial) <= discovery_mod.PEX_MAX_PENDING


def test_dial_queue_is_bounded() -> None:
    d = _discovery(FakeMesh())
    for i in range(1000):
        d.on_ad(_peer_ad(f"p{i}"))
    assert len(d._want_dial) == discovery_mod.PEX_MAX_PENDING
    assert list(d._want_dial)[-1] == "p999"  # the newest are kept


# --- the ad receive loop ------------------------------------------------------------------------


class _PoisonTable(PeerTable):
    def update(self, ad: CapacityAd, now: float) -> str | None:
        if ad.peer_id == "poison":
            raise RuntimeError("a value the table cannot take")
        return super().update(ad, now)


def test_on_ad_isolates_a_poisoned_ad(caplog: pytest.LogCaptureFixture) -> None:
    d = _discovery(FakeMesh(), _PoisonTable("me"))
    for pid in ["a", "poison", "b", "poison"]:
        d.on_ad(_peer_ad(pid))  # never raises
    assert {e.ad.peer_id for e in d.table} == {"a", "b"}
    assert d.errors.counts["ads"] == 2
    assert len([r for r in caplog.records if "poison" in r.getMessage()]) == 1


class _Sub:
    def __init__(self, msgs: list[Any]) -> None:
        self.msgs = list(msgs)

    async def get(self) -> Any:
        if not self.msgs:
            await trio.sleep_forever()
        return self.msgs.pop(0)


def _fake_mesh_with(msgs: list[Any]) -> Any:
    from libp2p.peer.id import ID

    from agent.net.mesh import Mesh

    async def subscribe(topic: str) -> _Sub:
        return _Sub(msgs)

    host = SimpleNamespace(get_id=lambda: ID.from_base58(PEER))
    return Mesh(host, SimpleNamespace(subscribe=subscribe), AdValidator())  # type: ignore[arg-type]


def _msg(sender_key: Any, seq: int, data: bytes = b"") -> Any:
    from libp2p.peer.id import ID

    return SimpleNamespace(
        from_id=ID.from_base58(peer_id(sender_key)).to_bytes(), data=data, seqno=seq.to_bytes(8)
    )


async def test_receive_ads_goes_on_when_the_handler_fails(autojump_clock: trio.abc.Clock) -> None:
    from agent.net.mesh import _msg_key

    keys = [key(10 + i) for i in range(4)]
    msgs = [_msg(k, i) for i, k in enumerate(keys)]
    bad = SimpleNamespace(from_id=None, data=b"", seqno=b"")  # bytes(None) raises
    mesh = _fake_mesh_with([msgs[0], bad, msgs[1], msgs[2], msgs[3]])
    for m, k in zip(msgs, keys, strict=True):
        mesh._accepted[_msg_key(m)] = bare_ad(k)
    poison = peer_id(keys[1])
    seen: list[str] = []

    def on_ad(a: CapacityAd) -> None:
        if a.peer_id == poison:
            raise ValueError("handler cannot take this one")
        seen.append(a.peer_id)

    with trio.move_on_after(5):
        await mesh.receive_ads(on_ad)
    assert seen == [peer_id(keys[0]), peer_id(keys[2]), peer_id(keys[3])]
    assert mesh.ad_handler_errors == 2


def test_validator_isolates_a_failing_intake_and_counts_refusals() -> None:
    from libp2p.peer.id import ID

    mesh = _fake_mesh_with([])
    relay = ID.from_base58(peer_id(key(40)))

    class Broken:
        def screen(self, relay: str, sender: str, now: float) -> str | None:
            raise RuntimeError("boom")

        def admit(self, relay: str, ad: CapacityAd, now: float) -> str | None:
            return None

    mesh.intake = Broken()
    good = encode_signed_ad(bare_ad(OTHER_KEY, seq=1), OTHER_KEY)
    assert mesh._validate(relay, _msg(OTHER_KEY, 1, good)) is False
    assert mesh.validate_errors == 1
    # A working intake: the second new peer id relayed by the same peer is over its budget.
    table = PeerTable(mesh.peer_id)
    mesh.intake = AdIntake(table, RelayBudget(per_minute=1.0))
    assert mesh._validate(relay, _msg(OTHER_KEY, 2, good)) is True
    third = key(41)
    data = encode_signed_ad(bare_ad(third, seq=1), third)
    assert mesh._validate(relay, _msg(third, 3, data)) is False
    assert mesh.validator.rejected[RELAY_BUDGET] == 1
    # Its own ads (the sender is this node) are never charged.
    assert mesh._validate(relay, _msg(KEY, 4, b"")) is True


# --- expiry -------------------------------------------------------------------------------------


async def test_expire_loop_goes_on_past_a_poisoned_peer(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discovery_mod, "TRIM_EVERY_S", -1.0)  # trim (which fails) every round
    mesh = FakeMesh()
    d = _discovery(mesh)
    past = time.monotonic() - 1000.0
    for pid in ["a", "poison", "b"]:
        d.table.update(_peer_ad(pid), past)
    await _run_for(1.0, d.expire_loop)
    assert len(d.table) == 0
    assert sorted(mesh.forgotten) == ["a", "b"]
    assert mesh.trims >= 3  # the loop kept running after each failed trim
    assert d.errors.counts["expiry"] >= 1 + 3


# --- bootstrap ----------------------------------------------------------------------------------


async def test_bootstrap_loop_survives_any_dial_error(autojump_clock: trio.abc.Clock) -> None:
    boot = addrs_of("bootpeer")[0]
    mesh = FakeMesh()
    failures = [RuntimeError("swarm gate broke"), ValueError("odd"), ConnectionError("refused")]
    dial = mesh.dial

    async def flaky(addrs: list[str], *, timeout: float = 6.0) -> str:
        if failures:
            raise failures.pop(0)
        return await dial(addrs, timeout=timeout)

    mesh.dial = flaky  # type: ignore[method-assign]
    d = _discovery(mesh, bootstrap=(boot,))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.bootstrap_loop, boot)
        with trio.fail_after(30):
            await d.joined.wait()
        nursery.cancel_scope.cancel()
    assert "bootpeer" in mesh.connected and d.errors.counts["bootstrap"] == 3


async def test_bootstrap_loop_gives_up_on_an_unusable_address(
    autojump_clock: trio.abc.Clock,
) -> None:
    d = _discovery(FakeMesh())
    with trio.fail_after(1):
        await d.bootstrap_loop("/ip4/127.0.0.1/tcp/1")  # no /p2p/: returns, does not spin
    assert d.errors.counts["bootstrap"] == 1


# --- announce -----------------------------------------------------------------------------------


async def test_announce_loop_goes_on_past_failing_publishes_and_scans(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    published: list[bytes] = []
    failing = [RuntimeError("queue full")] * 3

    async def publish(data: bytes) -> None:
        if failing:
            raise failing.pop()
        published.append(data)

    mesh = SimpleNamespace(peer_id=PEER, listen_addrs=lambda: [], publish=publish)
    lifecycle = SimpleNamespace(state="online", reason=lambda: "")
    a = Announcer(AnnounceConfig(announce_interval=1.0), mesh, KEY, [], lifecycle, lambda: None)  # type: ignore[arg-type]

    async def refresh() -> None:
        raise OSError("NVML went away")

    a.refresh_devices = refresh
    await _run_for(30.0, a.run)
    assert a.failures["publish"] == 3 and a.failures["refresh"] >= 3
    assert len(published) >= 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per kind
