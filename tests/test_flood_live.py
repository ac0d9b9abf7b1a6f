"""One connection relays validly signed ads for hundreds of fresh peer ids, each claiming an
hour, and a few claiming a million blocks, into a live agent (issue "Valid signatures,
hostile values"). The agent takes in only its per-relay budget of new ids, counts the rest,
keeps publishing ads its peers accept, and answers `peers` at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from agentproc import Agent, stop_all, wait_for
from factories import bare_ad, envelope, libp2p_identity

pytestmark = pytest.mark.procs

FLOOD = 600  # fresh peer ids, over FLOOD_S seconds, through one connection
FLOOD_S = 6.0
PER_MINUTE = 60  # the agent's [limits] new_peers_per_minute for this test


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("flood")
    cfg = root / "limits.toml"
    cfg.write_text(f"[limits]\nnew_peers_per_minute = {PER_MINUTE}\n")
    agents: list[Agent] = []
    try:
        agents.append(Agent(root / "a", ["--config", str(cfg)]).start())
        agents.append(Agent(root / "b", ["--bootstrap", agents[0].addrs[0]]).start())
        wait_for(lambda: len(agents[0].peer_ids()) == 1, 20, "the pair to meet")
        yield agents
    finally:
        stop_all(agents)


def _relayed(n: int, **ad_fields: Any) -> list[Any]:
    """Gossip messages authored (and signed) by n fresh peer ids, each with a signed ad."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    from agent.net.identity import private_seed
    from protocol import CAPACITY_TOPIC

    msgs = []
    for i in range(n):
        kp = create_new_key_pair()
        signer = Ed25519PrivateKey.from_private_bytes(private_seed(kp))
        fields = {k: (v(i) if callable(v) else v) for k, v in ad_fields.items()}
        data = envelope(bare_ad(signer, seq=1, timestamp=time.time(), **fields), signer)
        msg = rpc_pb2.Message(
            data=data,
            topicIDs=[CAPACITY_TOPIC],
            from_id=ID.from_pubkey(kp.public_key).to_bytes(),
            seqno=(1).to_bytes(8, "big"),
        )
        signed = PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
        msg.signature = kp.private_key.sign(signed)
        msg.key = kp.public_key.serialize()
        msgs.append(msg)
    return msgs


async def _relay(addrs: list[str], root: Path, batches: list[tuple[list[Any], float]]) -> None:
    from agent.config import AgentConfig
    from agent.net.mesh import open_mesh
    from protocol import CAPACITY_TOPIC

    key_pair, _ = libp2p_identity()
    cfg = AgentConfig(state_dir=root, listen=("/ip4/127.0.0.1/tcp/0",), mdns=False)
    async with open_mesh(cfg.mesh, key_pair) as mesh:
        await mesh.dial(addrs)
        with trio.fail_after(15):
            while not mesh.pubsub.peer_topics.get(CAPACITY_TOPIC):
                await trio.sleep(0.1)
        await trio.sleep(1.5)  # a heartbeat or so to graft into the mesh
        for msgs, seconds in batches:
            t0 = trio.current_time()
            for i, msg in enumerate(msgs):
                # Sent as relayed: the authors are the fresh ids, the forwarder is us.
                await mesh.pubsub.router.publish(mesh.host.get_id(), msg)
                await trio.sleep_until(t0 + seconds * (i + 1) / len(msgs))
        await trio.sleep(1.0)


async def test_flood_of_fresh_ids_from_one_connection_is_bounded(
    pair: list[Agent], tmp_path: Path
) -> None:
    a, b = pair
    flood = _relayed(FLOOD, ttl=3600.0)
    huge = _relayed(5, model=lambda i: f"fake{i}@1", n_blocks=1 << 20, span=(0, 1 << 20))
    t0 = time.monotonic()
    await _relay(a.addrs, tmp_path, [(flood, FLOOD_S), (huge, 0.5)])
    took = time.monotonic() - t0

    status = await trio.to_thread.run_sync(a.status)
    rejected = status["rejected_ads"]
    # A minute's burst plus the rate over the flood, and slack for the set-up time.
    most = PER_MINUTE + PER_MINUTE * (took + 5) / 60
    assert status["known_peers"] <= most + 1, (status["known_peers"], rejected)
    assert rejected["relay_budget"] > 0, rejected
    assert rejected["malformed"] >= 1, rejected  # n_blocks past protocol.ads.MAX_BLOCKS
    assert status["known_peers"] <= status["max_known_peers"]
    assert not any(status["loop_errors"].values()), status["loop_errors"]

    t1 = time.monotonic()
    peers = await trio.to_thread.run_sync(a.peers)
    assert time.monotonic() - t1 < 5.0
    assert all(len(c["replicas"]) <= 4096 for c in peers["coverage"])

    # The agent still publishes ads its peers accept: b keeps it, freshly heard.
    def a_seen_fresh() -> bool:
        rows = [r for r in b.peers()["peers"] if r["peer_id"] == a.peer_id]
        return bool(rows) and rows[0]["age_s"] < 30

    wait_for(a_seen_fresh, 40, "b to hear a fresh ad from a")
    text = a.log_path.read_text(errors="replace")
    assert "peers would reject" not in text and "Traceback" not in text, text[-3000:]
