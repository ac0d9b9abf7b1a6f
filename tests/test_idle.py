"""The idle policy without processes: owner readings from (fake) NVML, and the state machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import ConfigError, IdleConfig, load_config
from agent.hw.devices import discover
from agent.hw.nvml_fake import FakeNvml
from agent.policy.idle import Action, IdlePolicy, OwnerReading, Phase, busy_reasons, owner_activity

GIB = 1024**3
OWN_PID = 1000


def report_with(*gpus: dict) -> object:
    base = {"name": "Fake GPU", "uuid": "GPU-x", "memory_total": 16 * GIB, "memory_used": GIB}
    return discover(FakeNvml({"gpus": [{**base, **g} for g in gpus]}))


def test_own_process_never_counts_as_the_owner() -> None:
    report = report_with(
        {
            "utilization": 95,
            "compute_processes": [{"pid": OWN_PID, "used_memory": 12 * GIB}],
            "process_utilization": [{"pid": OWN_PID, "sm_util": 95}],
        }
    )
    reading = owner_activity(report, {OWN_PID})
    assert reading.gpu_util == {0: 0.0} and reading.gpu_memory_mib == {0: 0.0}
    assert busy_reasons(reading, IdleConfig()) == []


def test_other_process_counts_by_its_own_samples() -> None:
    report = report_with(
        {
            "utilization": 97,
            "compute_processes": [
                {"pid": OWN_PID, "used_memory": 4 * GIB},
                {"pid": 4242, "used_memory": 2 * GIB},
            ],
            "process_utilization": [{"pid": OWN_PID, "sm_util": 90}, {"pid": 4242, "sm_util": 7}],
        }
    )
    reading = owner_activity(report, {OWN_PID})
    assert reading.gpu_util == {0: 7.0}
    assert reading.gpu_memory_mib == {0: 2048.0}
    reasons = busy_reasons(reading, IdleConfig(gpu_utilization_max=10, gpu_memory_max_mib=1024))
    assert reasons == ["GPU 0: other processes hold 2048 MiB (limit 1024 MiB)"]


def test_without_per_process_samples_the_whole_gpu_counts_once_another_process_is_on_it() -> None:
    alone = report_with(
        {"utilization": 80, "compute_processes": [{"pid": OWN_PID, "used_memory": GIB}]}
    )
    assert owner_activity(alone, {OWN_PID}).gpu_util == {0: 0.0}
    shared = report_with(
        {
            "utilization": 80,
            "compute_processes": [
                {"pid": OWN_PID, "used_memory": GIB},
                {"pid": 7, "used_memory": 0},
            ],
        }
    )
    reasons = busy_reasons(owner_activity(shared, {OWN_PID}), IdleConfig())
    assert reasons == ["GPU 0 80% busy with other processes (limit 10%)"]


def test_no_samples_since_last_read_means_zero_not_unknown() -> None:
    report = report_with(
        {
            "utilization": 50,
            "compute_processes": [{"pid": 7, "used_memory": 0}],
            "process_utilization": [],  # NVML answers "not found": nobody ran lately
        }
    )
    assert report.gpus[0].processes[0].sm_util == 0
    assert owner_activity(report, {OWN_PID}).gpu_util == {0: 0.0}


def test_cpu_and_users_count_only_when_configured() -> None:
    reading = OwnerReading(gpu_util={}, gpu_memory_mib={}, cpu_others=0.6, users=2)
    assert busy_reasons(reading, IdleConfig()) == []
    cfg = IdleConfig(cpu_load_max=0.5, yield_to_users=True)
    assert busy_reasons(reading, cfg) == [
        "other processes use 60% of the CPU (limit 50%)",
        "2 users are logged in",
    ]


CFG = IdleConfig(enabled=True, drain_grace=30, holdoff=60)
BUSY = ["GPU 0 90% busy with other processes (limit 10%)"]


def test_owner_back_drains_then_unloads_when_sessions_end() -> None:
    p = IdlePolicy(CFG)
    assert p.step(0, [], sessions=2) is Action.NONE
    assert p.step(1, BUSY, sessions=2) is Action.DRAIN
    assert p.phase is Phase.DRAINING
    assert "draining, 2 sessions, 29 s grace left" in p.explain(2, 2)
    assert p.step(5, BUSY, sessions=1) is Action.NONE
    assert p.step(6, BUSY, sessions=0) is Action.UNLOAD
    assert p.phase is Phase.YIELDED
    assert p.explain(7, 0).startswith("yielded to the owner: GPU 0 90% busy")


def test_grace_period_ends_sessions_that_do_not_finish() -> None:
    p = IdlePolicy(CFG)
    p.step(0, BUSY, sessions=3)
    assert p.step(29.9, BUSY, sessions=3) is Action.NONE
    assert p.step(30.0, BUSY, sessions=3) is Action.UNLOAD


def test_reload_only_after_the_holdoff_of_continuous_idleness() -> None:
    p = IdlePolicy(CFG)
    p.step(0, BUSY, sessions=0)
    assert p.step(1, BUSY, sessions=0) is Action.UNLOAD
    assert p.step(10, [], sessions=0) is Action.NONE  # idle from t=10
    assert "idle for 20 s of the 60 s hold-off" in p.explain(30, 0)
    assert p.step(50, BUSY, sessions=0) is Action.NONE  # owner again: the clock restarts
    assert p.step(60, [], sessions=0) is Action.NONE
    assert p.step(119, [], sessions=0) is Action.NONE
    assert p.step(120, [], sessions=0) is Action.LOAD
    assert p.phase is Phase.LOADING
    p.loaded()
    assert p.phase is Phase.SERVING and p.step(121, [], sessions=0) is Action.NONE


def test_owner_leaving_during_a_long_drain_resumes_without_unloading() -> None:
    p = IdlePolicy(IdleConfig(enabled=True, drain_grace=600, holdoff=5))
    p.step(0, BUSY, sessions=1)
    assert p.step(1, [], sessions=1) is Action.NONE
    assert p.step(6, [], sessions=1) is Action.RESUME
    assert p.phase is Phase.SERVING


def test_busy_at_start_loads_nothing_until_idle_long_enough() -> None:
    p = IdlePolicy(CFG)
    p.start_yielded(0, BUSY)
    assert p.phase is Phase.YIELDED
    assert p.step(1, [], sessions=0) is Action.NONE
    assert p.step(61, [], sessions=0) is Action.LOAD


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ("gpu_utilization_max = 120", "idle.gpu_utilization_max"),
        ("holdoff = -1", "idle.holdoff"),
        ("check_interval = 0", "idle.check_interval"),
        ("cpu_load_max = 2", "idle.cpu_load_max"),
        ("nonsense = 1", "unknown config key 'idle.nonsense'"),
    ],
)
def test_bad_idle_config_is_one_clear_error(tmp_path: Path, table: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[idle]\n{table}\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(path, {})


def test_fake_nvml_rejects_a_malformed_process_utilization_list(tmp_path: Path) -> None:
    from agent.hw.nvml_fake import FakeNvmlConfigError

    desc = {"gpus": [{"name": "g", "uuid": "u", "memory_total": 1, "memory_used": 0,
                      "process_utilization": [{"pid": "x"}]}]}  # fmt: skip
    with pytest.raises(FakeNvmlConfigError):
        FakeNvml(json.loads(json.dumps(desc)))
