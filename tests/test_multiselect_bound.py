"""py-libp2p 0.8.1's multistream-select trusted a stranger's length prefix (GHSA-hmjq-g7pp-
rw3x): agent.net.upstream bounds it. Unit-level on the patched reader, and live: a raw TCP
connection claiming a huge message does not make an agent buffer it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from agentproc import Agent, stop_all

from agent.net.upstream import MAX_MULTISELECT_MESSAGE, bound_multiselect_reads


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


class _Reader:
    """Hands out a prefix, then endless filler; counts what was read."""

    def __init__(self, prefix: bytes) -> None:
        self.data = bytearray(prefix)
        self.read_bytes = 0

    async def read(self, n: int = -1) -> bytes:
        if not self.data:
            self.data += b"x" * 65536
        n = len(self.data) if n is None or n < 0 else min(n, len(self.data))
        out = bytes(self.data[:n])
        del self.data[:n]
        self.read_bytes += len(out)
        return out


async def test_a_claim_over_the_cap_is_refused_after_its_prefix() -> None:
    import libp2p.protocol_muxer.multiselect_communicator as communicator
    from libp2p.io.exceptions import IOException

    bound_multiselect_reads()
    reader = _Reader(_varint(1 << 40))
    with pytest.raises(IOException):
        await communicator.read_delim(reader)
    assert reader.read_bytes <= 10  # the varint only: no body was read or held


async def test_protocol_names_still_pass() -> None:
    import libp2p.protocol_muxer.multiselect_communicator as communicator
    from libp2p.utils import encode_delim

    bound_multiselect_reads()
    msg = b"/shardmesh/forward/1.0.0"
    assert await communicator.read_delim(_Reader(encode_delim(msg))) == msg
    big = b"/" + b"a" * (MAX_MULTISELECT_MESSAGE - 2)  # exactly at the cap with its newline
    assert await communicator.read_delim(_Reader(encode_delim(big))) == big


@pytest.mark.procs
def test_a_stranger_claiming_100_mb_costs_an_agent_no_memory(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "a").start()
    try:
        port = int(agent.addrs[0].split("/tcp/")[1].split("/")[0])
        proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
        before = proc.memory_info().rss
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.01)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(_varint(100_000_000))
            try:
                for _ in range(100):  # up to 100 MiB, stopped by the agent's reset
                    s.sendall(b"x" * (1 << 20))
                    sent += 1 << 20
            except OSError:
                pass
        time.sleep(0.5)
        done.set()
        watcher.join(2)
        # Unbounded (0.8.1 as shipped): ~100 MiB taken in and RSS +280 MiB. Bounded: the
        # agent resets after the prefix; what the kernel buffered is all that went out.
        assert sent < (32 << 20), sent
        assert peak[0] - before < (40 << 20), (before, peak[0])
        assert agent.proc is not None and agent.proc.poll() is None
        assert agent.status()["peer_id"] == agent.peer_id
    finally:
        stop_all([agent])
