"""The agent's lifecycle without processes: state transitions and their reason lines, the one
writer of state and admission, the drain (with and without sessions, cut short), SIGTERM's
way out (a second signal skips the wait; systemd's stop timeout bounds the grace), and the
idle policy's owner-coming-back path going through the same drain. Trio's autojump clock
stands in for the seconds; fakes stand in for the serving part and the ad publisher."""

from __future__ import annotations

import ast
import logging
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent.config import IdleConfig
from agent.daemon import lifecycle as lifecycle_module
from agent.daemon.idlewatch import IdleWatch
from agent.daemon.lifecycle import Lifecycle, serving_reason
from agent.policy.idle import Action

AGENT = Path(__file__).resolve().parents[1] / "agent"
GRACE = 30.0


class FakeServing:
    """The serving part as the lifecycle and the idle watch drive it."""

    def __init__(self, *, loaded: bool = True, sessions: int = 0) -> None:
        self.activity = ""
        self.shard: object | None = object() if loaded else None
        self.span = (0, 4)
        self.model_name = "tiny"
        self.accepting: list[bool] = []  # every set_accepting call, in order
        self.sessions = sessions
        self.ended = 0  # end_sessions calls
        self.loads = 0
        self.unloads = 0
        self.reason_while_loading = ""
        self.lifecycle: Lifecycle | None = None
        self.fail_load: BaseException | None = None  # what load() raises, if anything

    def set_accepting(self, accepting: bool) -> None:
        self.accepting.append(accepting)

    def active_sessions(self) -> int:
        return self.sessions

    async def end_sessions(self) -> None:
        self.ended += 1
        self.sessions = 0

    def open_protocol(self, host: Any, nursery: trio.Nursery) -> None:
        pass

    async def load(self, host: Any) -> None:
        self.activity = "loading blocks 0:4"
        await trio.sleep(5)
        if self.fail_load is not None:
            self.activity = ""
            raise self.fail_load
        if self.lifecycle is not None:
            self.reason_while_loading = self.lifecycle.reason()
        self.shard, self.activity = object(), ""
        self.loads += 1

    async def unload(self) -> None:
        await self.end_sessions()
        self.shard = None
        self.unloads += 1


class FakePublisher:
    """Records every ad as (time, state, reason) at the moment it is published."""

    def __init__(self) -> None:
        self.lifecycle: Lifecycle | None = None
        self.ads: list[tuple[float, str, str]] = []
        self.fail = False

    async def publish_ad(self, state: str | None = None) -> None:
        assert self.lifecycle is not None
        if self.fail:
            raise ConnectionError("no peers")
        self.ads.append(
            (trio.current_time(), state or self.lifecycle.state, self.lifecycle.reason())
        )

    def states(self) -> list[str]:
        return [state for _, state, _ in self.ads]


def make(serving: FakeServing | None) -> tuple[Lifecycle, FakePublisher]:
    publisher = FakePublisher()
    lc = Lifecycle(publisher)
    publisher.lifecycle = lc
    if serving is not None:
        lc.attach(serving)
        serving.lifecycle = lc
    return lc, publisher


def spy_on_drain(lc: Lifecycle) -> list[dict[str, Any]]:
    """Every call of lc.drain, with its grace."""
    calls: list[dict[str, Any]] = []
    real = lc.drain

    async def drain(grace: float, **kwargs: Any) -> int:
        calls.append({"grace": grace, **kwargs})
        return await real(grace, **kwargs)

    lc.drain = drain
    return calls


# --- states and reasons --------------------------------------------------------------------
def test_starts_joining_and_shows_what_the_serving_part_does() -> None:
    serving = FakeServing(loaded=False)
    lc, _ = make(serving)
    assert (lc.state, lc.reason()) == ("joining", "starting")
    serving.activity = "choosing blocks"
    assert lc.reason() == "choosing blocks"
    assert lc.online()
    serving.activity = "loading blocks 0:4"  # only while joining does the activity show
    assert (lc.state, lc.reason()) == ("online", "serving blocks 0:4 of tiny")
    assert serving.accepting == [True]


def test_an_agent_without_a_model_goes_online_relaying() -> None:
    lc, _ = make(None)
    assert lc.online()
    assert (lc.state, lc.reason()) == ("online", "no model configured: routing and relaying only")
    assert serving_reason(None) == lc.reason()


async def test_a_signal_while_loading_wins(autojump_clock: trio.abc.Clock) -> None:
    serving = FakeServing(loaded=False)
    lc, publisher = make(serving)
    await lc.stop(GRACE)  # nothing loaded: nothing to drain
    assert lc.stopping and lc.state == "leaving"
    assert not lc.online()  # the blocks finished loading after the signal: refused
    lc.joining("again")
    lc.yielded("owner")
    await lc.rejoin()
    await lc.announce()
    assert lc.state == "leaving" and publisher.states() == ["leaving"]
    assert serving.accepting == [] and serving.ended == 0


def test_one_writer_of_admission_and_state() -> None:
    """Only the lifecycle calls set_accepting; only Serving.set_accepting writes `draining`;
    inside the lifecycle only `_set` writes the state and the reason."""
    calls, draining_writers = [], []
    for path in sorted(AGENT.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(AGENT.parent).as_posix()
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "set_accepting":
                calls.append(rel)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if node.attr == "draining":
                    draining_writers.append(rel)
                if node.attr in ("_state", "_reason"):
                    assert rel == "agent/daemon/lifecycle.py", rel
    assert set(calls) == {"agent/daemon/lifecycle.py"}
    assert set(draining_writers) == {"agent/serve/serving.py"}
    tree = ast.parse((AGENT / "daemon" / "lifecycle.py").read_text())
    writers = {
        fn.name
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and node.attr in ("_state", "_reason")
    }
    assert writers == {"__init__", "_set"}


# --- the drain -----------------------------------------------------------------------------
async def test_drain_without_sessions_says_draining_at_once(autojump_clock: trio.abc.Clock) -> None:
    serving = FakeServing(sessions=0)
    lc, publisher = make(serving)
    lc.online()
    t0 = trio.current_time()
    assert await lc.drain(GRACE, reason="owner back") == 0
    assert trio.current_time() == t0  # nothing to wait for
    assert serving.accepting == [True, False] and serving.ended == 1
    assert (lc.state, lc.reason()) == ("draining", "owner back")
    assert publisher.ads == [(t0, "draining", "owner back")]


async def test_drain_waits_for_sessions_to_finish(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    serving = FakeServing(sessions=2)
    lc, publisher = make(serving)
    lc.online()
    t0 = trio.current_time()

    async def sessions_finish() -> None:
        await trio.sleep(4)
        serving.sessions = 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sessions_finish)
        assert await lc.drain(GRACE) == 0
    assert 4 <= trio.current_time() - t0 < 4.5
    assert publisher.ads[0] == (t0, "draining", "stopping: 2 sessions get 30 s")
    assert "draining 2 sessions for up to 30 s" in caplog.text
    assert "ending" not in caplog.text


async def test_drain_ends_what_is_left_after_the_grace(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    serving = FakeServing(sessions=3)
    lc, _ = make(serving)
    t0 = trio.current_time()
    assert await lc.drain(GRACE) == 3
    assert trio.current_time() - t0 == pytest.approx(GRACE, abs=0.2)
    assert serving.ended == 1 and serving.sessions == 0
    assert "ending 3 sessions still open (their clients fail over)" in caplog.text


async def test_drain_until_ends_the_wait_early(autojump_clock: trio.abc.Clock) -> None:
    serving = FakeServing(sessions=1)
    lc, _ = make(serving)
    until = trio.Event()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _set_after(until, 2))
        assert await lc.drain(GRACE, until=until) == 1
    assert trio.current_time() - t0 == pytest.approx(2)


async def test_a_failed_draining_ad_is_logged_not_raised(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    serving = FakeServing(sessions=0)
    lc, publisher = make(serving)
    publisher.fail = True
    await lc.drain(GRACE)
    assert "publishing the draining ad failed: no peers" in caplog.text


async def _set_after(event: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    event.set()


# --- SIGTERM -------------------------------------------------------------------------------
async def test_stop_without_sessions_leaves_at_once(autojump_clock: trio.abc.Clock) -> None:
    serving = FakeServing(sessions=0)
    lc, publisher = make(serving)
    lc.online()
    calls = spy_on_drain(lc)
    t0 = trio.current_time()
    await lc.stop(GRACE)
    assert [c["grace"] for c in calls] == [GRACE]
    assert publisher.states() == ["leaving"]  # no draining ad: nothing to wait for
    assert serving.accepting == [True, False] and serving.ended == 1
    assert trio.current_time() - t0 == pytest.approx(lifecycle_module.LEAVE_LINGER_S)
    assert lc.state == "leaving" and lc.reason() == "serving blocks 0:4 of tiny"


async def test_stop_drains_sessions_then_leaves(autojump_clock: trio.abc.Clock) -> None:
    serving = FakeServing(sessions=1)
    lc, publisher = make(serving)
    lc.online()
    t0 = trio.current_time()
    await lc.stop(GRACE)
    times = {state: t - t0 for t, state, _ in publisher.ads}
    assert publisher.states() == ["draining", "leaving"]
    assert times["draining"] == 0
    assert times["leaving"] == pytest.approx(GRACE, abs=0.2)
    assert publisher.ads[0][2] == "stopping: 1 sessions get 30 s"


async def test_a_second_signal_cuts_the_grace_short(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    serving = FakeServing(sessions=1)
    lc, publisher = make(serving)
    lc.online()
    send, signals = trio.open_memory_channel[int](4)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lc.stop, GRACE, signals)
        await trio.sleep(3)
        assert lc.state == "draining" and serving.ended == 0
        await send.send(signal.SIGTERM)
    assert "second signal: leaving now" in caplog.text
    assert serving.ended == 1
    leaving = next(t for t, state, _ in publisher.ads if state == "leaving")
    assert leaving - t0 == pytest.approx(3, abs=0.2)


async def test_systemds_stop_timeout_bounds_the_grace(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDMESH_STOP_TIMEOUT_S", "12")  # 12 s less the 5 s margin
    serving = FakeServing(sessions=1)
    lc, _ = make(serving)
    calls = spy_on_drain(lc)
    await lc.stop(GRACE)
    assert [c["grace"] for c in calls] == [7.0]


async def test_the_signal_handler_hands_over_to_stop(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """agent.daemon.node's SIGTERM handler: the first signal starts Lifecycle.stop with the
    configured drain grace and the rest of the signals; then the nursery is cancelled."""
    from types import SimpleNamespace

    from agent.config import AgentConfig
    from agent.daemon import node as node_module
    from agent.daemon import service

    monkeypatch.setattr(service, "_stopping", False)
    monkeypatch.delenv("SHARDMESH_STOP_TIMEOUT_S", raising=False)
    libp2p_log = logging.getLogger("libp2p")
    monkeypatch.setattr(libp2p_log, "level", libp2p_log.level)  # the handler quietens it
    serving = FakeServing(sessions=1)
    lc, publisher = make(serving)
    lc.online()
    calls = spy_on_drain(lc)
    node = SimpleNamespace(lifecycle=lc, cfg=AgentConfig(idle=IdleConfig(drain_grace=10)))
    send, signals = trio.open_memory_channel[int](4)
    leaving = trio.Event()
    t0 = trio.current_time()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node_module._leave_on_signal, signals, node, scope, leaving)
            await send.send(signal.SIGTERM)
            await trio.sleep(1)
            assert leaving.is_set() and lc.state == "draining"
            await send.send(signal.SIGINT)
            await trio.sleep_forever()  # until the handler cancels the scope
    assert scope.cancelled_caught
    assert [c["grace"] for c in calls] == [10]
    assert publisher.states() == ["draining", "leaving"]
    assert publisher.ads[-1][0] - t0 == pytest.approx(1, abs=0.2)  # SIGINT cut the 10 s


# --- the idle policy's path --------------------------------------------------------------------
IDLE = IdleConfig(enabled=True, check_interval=1000, drain_grace=GRACE, holdoff=5)
BUSY = ["GPU 0 85% busy with other processes (limit 10%)"]


def idle_watch(serving: FakeServing, lc: Lifecycle, *, busy: bool = False) -> IdleWatch:
    watch = IdleWatch(IDLE, serving, lc, host=None, on_devices=lambda report: None)
    watch.read = lambda: (None, BUSY if busy else [])  # no NVML: the owner is as the test says
    return watch


async def step(watch: IdleWatch, now: float, reasons: list[str]) -> Action:
    action = watch.policy.step(now, reasons, watch.serving.active_sessions())
    await watch.apply(action)
    return action


async def test_owner_busy_at_start_yields(autojump_clock: trio.abc.Clock) -> None:
    serving = FakeServing(loaded=False)
    lc, _ = make(serving)
    async with trio.open_nursery() as nursery:
        assert not await idle_watch(serving, lc, busy=True).start(nursery)
        assert lc.state == "draining"
        assert lc.reason().startswith("yielded to the owner: GPU 0 85% busy")
        assert serving.loads == 0 and serving.accepting == []
        nursery.cancel_scope.cancel()


async def test_owner_back_drains_through_the_same_drain_then_unloads(
    autojump_clock: trio.abc.Clock,
) -> None:
    serving = FakeServing(sessions=2)
    lc, publisher = make(serving)
    lc.online()
    calls = spy_on_drain(lc)
    async with trio.open_nursery() as nursery:
        watch = idle_watch(serving, lc)
        watch._nursery = nursery  # as start() leaves it, without loading
        t0 = trio.current_time()
        assert await step(watch, 0, BUSY) is Action.DRAIN
        # Admission closed and the state changed before apply returned; the ad follows at once.
        assert serving.accepting == [True, False]
        assert lc.state == "draining" and lc.reason().startswith("owner active (GPU 0 85% busy")
        await trio.testing.wait_all_tasks_blocked()
        assert publisher.states() == ["draining"] and publisher.ads[0][0] == t0
        assert [c["grace"] for c in calls] == [GRACE]
        await trio.sleep(10)
        assert await step(watch, 10, BUSY) is Action.NONE
        assert serving.ended == 0  # still within the grace
        assert await step(watch, GRACE, BUSY) is Action.UNLOAD  # the policy says: grace over
        assert serving.ended >= 1 and serving.unloads == 1 and serving.shard is None
        assert lc.state == "draining" and lc.reason().startswith("yielded to the owner")
        assert publisher.states() == ["draining", "draining"]
        # The owner leaves for the hold-off: the blocks load again and the agent rejoins.
        assert await step(watch, 40, []) is Action.NONE
        assert await step(watch, 45, []) is Action.LOAD
        assert serving.reason_while_loading == "loading blocks 0:4"
        assert serving.loads == 1 and serving.accepting[-1] is True
        assert (lc.state, lc.reason()) == ("online", "serving blocks 0:4 of tiny")
        assert publisher.states()[-1] == "online"
        assert trio.current_time() - t0 == pytest.approx(15)
        nursery.cancel_scope.cancel()


async def test_a_reload_that_fails_is_a_status_not_a_crash(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The owner left, the blocks load again, and the load fails (out of memory: the owner's
    work left less behind): one line, what half loaded is freed, the agent stays online
    serving nothing with the reason in status, and the watch goes on (no reload loop)."""
    serving = FakeServing(sessions=0)
    lc, publisher = make(serving)
    lc.online()
    async with trio.open_nursery() as nursery:
        watch = idle_watch(serving, lc)
        watch._nursery = nursery
        assert await step(watch, 0, BUSY) is Action.DRAIN
        assert await step(watch, 1, BUSY) is Action.UNLOAD
        serving.fail_load = MemoryError("could not allocate 2147483648 bytes")
        assert await step(watch, 40, []) is Action.NONE
        assert await step(watch, 45, []) is Action.LOAD  # raised inside: caught by apply
        assert serving.loads == 0 and serving.unloads == 2 and serving.shard is None
        assert lc.state == "online"
        assert lc.reason() == "load failed: out of memory (could not allocate 2147483648 bytes)"
        assert publisher.states()[-1] == "online"
        assert await step(watch, 100, []) is Action.NONE  # stays put: no reload loop
        nursery.cancel_scope.cancel()


async def test_owner_leaving_during_the_grace_resumes_with_the_sessions(
    autojump_clock: trio.abc.Clock,
) -> None:
    serving = FakeServing(sessions=1)
    lc, publisher = make(serving)
    lc.online()
    async with trio.open_nursery() as nursery:
        watch = idle_watch(serving, lc)
        watch._nursery = nursery
        assert await step(watch, 0, BUSY) is Action.DRAIN
        await trio.sleep(1)
        assert await step(watch, 1, []) is Action.NONE
        await trio.sleep(5)
        assert await step(watch, 6, []) is Action.RESUME
        await trio.sleep(GRACE)  # the cancelled drain's grace would have run out by now
        assert serving.sessions == 1 and serving.ended == 0
        assert serving.accepting == [True, False, True]
        assert (lc.state, publisher.states()) == ("online", ["draining", "online"])
        nursery.cancel_scope.cancel()


async def test_sigterm_during_the_owners_drain_takes_over(autojump_clock: trio.abc.Clock) -> None:
    serving = FakeServing(sessions=1)
    lc, publisher = make(serving)
    lc.online()
    calls = spy_on_drain(lc)
    async with trio.open_nursery() as nursery:
        watch = idle_watch(serving, lc)
        watch._nursery = nursery
        assert await step(watch, 0, BUSY) is Action.DRAIN
        await trio.sleep(2)
        await lc.stop(GRACE)
        assert [c["grace"] for c in calls] == [GRACE, GRACE]  # both through Lifecycle.drain
        assert lc.state == "leaving" and serving.sessions == 0
        # From now on the idle policy changes nothing.
        assert await step(watch, 100, []) is Action.UNLOAD
        assert serving.unloads == 0 and lc.state == "leaving"
        assert publisher.states()[-1] == "leaving"
        nursery.cancel_scope.cancel()
