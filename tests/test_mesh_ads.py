"""Hostile ads published into the capacity topic by a real libp2p peer (in this process)
are rejected and counted by real agents, which keep their tables right and keep running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from adsamples import bare_ad
from agentproc import Agent, stop_all, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig
from agent.net.identity import private_seed
from agent.net.mesh import open_mesh
from protocol import CapacityAd, encode_signed_ad, pack, unpack_map


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
    pair: list[Agent], tmp_path: Path
) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    a, b = pair
    key_pair = create_new_key_pair()
    key = Ed25519PrivateKey.from_private_bytes(private_seed(key_pair))
    cfg = AgentConfig(state_dir=tmp_path, listen=("/ip4/127.0.0.1/tcp/0",), mdns=False)
    before = (await _in_thread(a.status))["rejected_ads"]
    async with open_mesh(cfg, key_pair) as mesh:
        me = mesh.peer_id
        await mesh.dial(a.addrs)
        with trio.fail_after(15):
            while not mesh.pubsub.peer_topics.get("shardmesh/capacity/1"):
                await trio.sleep(0.1)
            await trio.sleep(1.5)  # a heartbeat or so to graft into the mesh
        seq = int(time.time() * 1000)
        other_key = Ed25519PrivateKey.generate()
        good = encode_signed_ad(bare_ad(me, seq), key)
        envelope = unpack_map(good, max_size=1 << 16)
        sig = bytearray(envelope["sig"])
        sig[0] ^= 0x01
        tampered = pack({**envelope, "sig": bytes(sig)})
        hostile = {
            "malformed": [b"\x00garbage", pack({"ad": b"x", "key": b"k", "sig": b"s"})],
            "oversized": [b"\x81" + b"A" * 40_000],
            # Someone else's peer id under our key, and a byte flipped in a signed ad.
            "bad_signature": [
                _forge(bare_ad(b.peer_id, seq + 1), key),
                tampered,
            ],
            # Correctly self-signed, but by a key that is not the gossip message's sender.
            "wrong_sender": [encode_signed_ad(bare_ad(_peer_id(other_key), seq), other_key)],
            "expired": [
                encode_signed_ad(bare_ad(me, seq + 2, timestamp=time.time() - 100, ttl=10.0), key)
            ],
            "future": [encode_signed_ad(bare_ad(me, seq + 3, timestamp=time.time() + 3600), key)],
            "version": [encode_signed_ad(bare_ad(me, seq + 4, version="2.0.0"), key)],
        }
        await mesh.publish(good)
        for items in hostile.values():
            for data in items:
                await mesh.publish(data)
        await mesh.publish(good)  # the same signed ad again: a replay (same seq)
        await trio.sleep(0.2)
        old = encode_signed_ad(bare_ad(me, seq - 5), key)
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


def _forge(ad: CapacityAd, key: Ed25519PrivateKey) -> bytes:
    """A correctly signed envelope whose ad claims a peer id that is not the key's."""
    from protocol.ads import AD_SIGNING_PREFIX, _ad_to_map
    from protocol.ads import public_key_raw as raw

    body = pack(_ad_to_map(ad))
    return pack({"ad": body, "key": raw(key), "sig": key.sign(AD_SIGNING_PREFIX + body)})


def _peer_id(key: Ed25519PrivateKey) -> str:
    from protocol import peer_id_from_ed25519, public_key_raw

    return peer_id_from_ed25519(public_key_raw(key))
