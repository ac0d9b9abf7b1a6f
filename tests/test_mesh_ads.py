"""Hostile ads published into the capacity topic by a real libp2p peer (in this process)
are rejected and counted by real agents, which keep their tables right and keep running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from agentproc import Agent, stop_all, wait_for
from factories import bare_ad, envelope

from agent.config import AgentConfig
from agent.net.mesh import open_mesh
from protocol import encode_signed_ad, pack, unpack_map

pytestmark = pytest.mark.procs


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ads")
    agents: list[Agent] = []
    try:
        agents.append(Agent(root / "a").start())
        agents.append(Agent(root / "b", ["--bootstrap", agents[0].addrs[0]]).start())
        wait_for(lambda: len(agents[0].peer_ids()) == 1, 20, "the pair to meet")
        yield agents
    finally:
        stop_all(agents)


async def _in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def test_bad_ads_are_rejected_counted_and_tables_stay_right(
    pair: list[Agent], tmp_path: Path, identity, fresh_key
) -> None:
    a, b = pair
    key_pair, key = identity
    cfg = AgentConfig(state_dir=tmp_path, listen=("/ip4/127.0.0.1/tcp/0",), mdns=False)
    before = (await _in_thread(a.status))["rejected_ads"]
    async with open_mesh(cfg.mesh, key_pair) as mesh:
        me = mesh.peer_id
        await mesh.dial(a.addrs)
        with trio.fail_after(15):
            while not mesh.pubsub.peer_topics.get("shardmesh/capacity/1"):
                await trio.sleep(0.1)
            await trio.sleep(1.5)  # a heartbeat or so to graft into the mesh
        seq = int(time.time() * 1000)
        good = encode_signed_ad(bare_ad(me, seq=seq), key)
        env = unpack_map(good, max_size=1 << 16)
        sig = bytearray(env["sig"])
        sig[0] ^= 0x01
        tampered = pack({**env, "sig": bytes(sig)})
        hostile = {
            "malformed": [b"\x00garbage", pack({"ad": b"x", "key": b"k", "sig": b"s"})],
            "oversized": [b"\x81" + b"A" * 40_000],
            # Someone else's peer id under our key, and a byte flipped in a signed ad.
            "bad_signature": [envelope(bare_ad(b.peer_id, seq=seq + 1), key), tampered],
            # Correctly self-signed, but by a key that is not the gossip message's sender.
            "wrong_sender": [encode_signed_ad(bare_ad(fresh_key, seq=seq), fresh_key)],
            "expired": [
                encode_signed_ad(
                    bare_ad(me, seq=seq + 2, timestamp=time.time() - 100, ttl=10.0), key
                )
            ],
            "future": [
                encode_signed_ad(bare_ad(me, seq=seq + 3, timestamp=time.time() + 3600), key)
            ],
            "version": [encode_signed_ad(bare_ad(me, seq=seq + 4, version="2.0.0"), key)],
        }
        await mesh.publish(good)
        for items in hostile.values():
            for data in items:
                await mesh.publish(data)
        await mesh.publish(good)  # the same signed ad again: a replay (same seq)
        await trio.sleep(0.2)
        old = encode_signed_ad(bare_ad(me, seq=seq - 5), key)
        await mesh.publish(old)  # an older sequence number than one already accepted

        def rejected_enough() -> bool:
            r = a.status()["rejected_ads"]
            want = {k: len(v) for k, v in hostile.items()} | {"replayed": 2}
            return all(r.get(k, 0) - before.get(k, 0) >= n for k, n in want.items())

        with trio.move_on_after(20):
            while not await _in_thread(rejected_enough):
                await trio.sleep(0.2)
        assert await _in_thread(rejected_enough), (await _in_thread(a.status))["rejected_ads"]

        peers_a = await _in_thread(a.peer_ids)
        # Only real peers: the injector (its one good ad) and b; no forged entry for anyone.
        assert peers_a == {b.peer_id, me}
        row = next(r for r in (await _in_thread(a.peers))["peers"] if r["peer_id"] == b.peer_id)
        assert row["addrs"] == b.addrs  # b's entry was not overwritten by the forgery
    # Bad ads were dropped at a, not forwarded: b counted none of the wrong-sender ones
    # it could only have received through a.
    rb = (await _in_thread(b.status))["rejected_ads"]
    assert rb.get("wrong_sender", 0) == 0
    # Both agents still serve their control API and see each other.
    assert b.peer_id in await _in_thread(a.peer_ids)
    assert a.peer_id in await _in_thread(b.peer_ids)
