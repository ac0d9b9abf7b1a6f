"""This agent's capacity ads: what they say, how often they go out, how long they live.

An ad carries the lifecycle's state and reason, the devices, and (when serving) the model, the
span, throughput, free KV room and load. The announce loop publishes on deadlines, every
`announce_interval` stretched so the whole mesh stays under MESH_AD_RATE ads/s; the TTL is at
least TTL_PER_INTERVAL intervals. Both stay inside the protocol's bounds (the TTL at most
MAX_TTL, the interval at most MAX_TTL / TTL_PER_INTERVAL) whatever the peer table holds:
agent.policy.peertable's `announce_interval` and `announce_ttl`. State changes publish at once
through `publish_ad`. A failing device scan or publish is logged and counted, never the end of
the loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sized
from typing import Protocol

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AnnounceConfig
from agent.daemon.lifecycle import Lifecycle
from agent.hw.devices import DeviceReport
from agent.net.mesh import Mesh
from agent.policy.peertable import (
    MESH_AD_RATE,
    TTL_PER_INTERVAL,
    announce_interval,
    announce_ttl,
)
from protocol import CapacityAd, DeviceSummary, encode_signed_ad
from protocol.ids import PROTOCOL_VERSION

log = logging.getLogger("shardmesh.agent")

DEVICE_REFRESH_S = 5.0  # NVML/psutil readings in ads: fresh enough, and cheap
# MESH_AD_RATE and TTL_PER_INTERVAL (agent.policy.peertable) are named here too.
__all__ = ["MESH_AD_RATE", "TTL_PER_INTERVAL", "Advertised", "Announcer", "ServedModelId"]


class ServedModelId(Protocol):
    """Which model the serving part serves (agent.serve.serving.Serving): what ads, status
    and coverage all name."""

    @property
    def model_id(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def n_blocks(self) -> int: ...


class Advertised(ServedModelId, Protocol):
    """The serving part as its ads show it."""

    @property
    def throughput(self) -> float: ...

    def chosen_span(self) -> tuple[int, int] | None: ...

    def kv_free_tokens(self) -> int: ...

    def active_sessions(self) -> int: ...


class Announcer:
    """Builds, signs and publishes this agent's ads. `serving` is set once it exists;
    `refresh_devices`, when set, is awaited every DEVICE_REFRESH_S by the loop (unset when
    the idle watch reads the devices more often)."""

    def __init__(
        self,
        cfg: AnnounceConfig,
        mesh: Mesh,
        key: Ed25519PrivateKey,
        peers: Sized,
        lifecycle: Lifecycle,
        devices: Callable[[], DeviceReport | None],
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.key = key
        self.peers = peers  # the peer table: its size stretches the interval
        self.lifecycle = lifecycle
        self.devices = devices
        self.serving: Advertised | None = None
        self.refresh_devices: Callable[[], Awaitable[None]] | None = None
        # Failures of the loop's steps, by step ("refresh", "publish"); each kind of failure
        # is logged as a warning once, then at debug level.
        self.failures: dict[str, int] = {}
        self._logged: set[tuple[str, str]] = set()
        # Ad sequence numbers start from the wall clock in ms, so a restarted agent (same
        # peer id) continues above the numbers its previous run used.
        self._seq = int(time.time() * 1000)

    def interval(self) -> float:
        return announce_interval(self.cfg.announce_interval, len(self.peers))

    def ttl(self) -> float:
        return announce_ttl(self.cfg.ad_ttl, self.interval())

    def _failed(self, step: str, exc: Exception) -> None:
        self.failures[step] = self.failures.get(step, 0) + 1
        kind = (step, type(exc).__name__)
        if kind in self._logged or len(self._logged) >= 64:
            log.debug("announce: %s failed again: %s", step, exc)
            return
        self._logged.add(kind)
        log.warning("announce: %s failed (logged once per kind): %s", step, exc)

    def build_ad(self, state: str | None = None) -> CapacityAd:
        self._seq += 1
        devices = self.devices()
        serving = self.serving
        return CapacityAd(
            version=PROTOCOL_VERSION,
            peer_id=self.mesh.peer_id,
            addrs=tuple(self.mesh.listen_addrs()),
            devices=tuple(DeviceSummary(**d) for d in devices.summaries()) if devices else (),
            model=serving.model_id if serving else None,
            model_name=serving.model_name if serving else None,
            n_blocks=serving.n_blocks if serving else None,
            span=serving.chosen_span() if serving else None,
            throughput=serving.throughput if serving else 0.0,
            kv_free_tokens=serving.kv_free_tokens() if serving else 0,
            sessions=serving.active_sessions() if serving else 0,
            state=state or self.lifecycle.state,
            seq=self._seq,
            timestamp=time.time(),
            ttl=self.ttl(),
            reason=self.lifecycle.reason(),
        )

    async def publish_ad(self, state: str | None = None) -> None:
        data = encode_signed_ad(self.build_ad(state), self.key)
        await self.mesh.publish(data)

    async def run(self) -> None:
        """Publish an ad every interval, on deadlines: a slow publish or device scan must
        not stretch the period (peers would see the ad late and expire us)."""
        refreshed = trio.current_time()
        deadline = trio.current_time()
        while True:
            interval = self.interval()
            refresh = self.refresh_devices
            if refresh is not None and trio.current_time() - refreshed >= DEVICE_REFRESH_S:
                refreshed = trio.current_time()
                with trio.move_on_after(interval):
                    try:
                        await refresh()
                    except Exception as exc:  # the last readings stay in the ads
                        self._failed("refresh", exc)
            with trio.move_on_after(interval):
                try:
                    await self.publish_ad()
                except Exception as exc:  # a publish failure must not kill the agent
                    self._failed("publish", exc)
            # Jitter keeps many agents started together from publishing in lockstep.
            deadline = max(deadline + interval * random.uniform(0.9, 1.1), trio.current_time())
            await trio.sleep_until(deadline)
