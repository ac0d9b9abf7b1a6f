"""Device discovery against the fake NVML, the real pynvml (no driver here) and a subprocess."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.hw import nvml_fake
from agent.hw.devices import (
    FAKE_NVML_ENV,
    CpuInfo,
    DeviceError,
    DeviceReport,
    GpuInfo,
    GpuProcess,
    MemoryInfo,
    NvmlLike,
    NvmlLoadError,
    best_cuda_device,
    cpu_model_from_cpuinfo,
    cuda_visible_gpus,
    discover,
    load_nvml,
    render_devices,
)
from agent.hw.nvml_fake import FakeNvml, FakeNvmlConfigError, fake_from_file

FIXTURES = Path(__file__).parent / "fixtures"
THREE_GPUS = FIXTURES / "nvml_three_gpus.json"
NO_DRIVER = FIXTURES / "nvml_no_driver.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def gpu_desc(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "Fake GPU",
        "uuid": "GPU-fake",
        "memory_total": 8 * GIB,
        "memory_used": GIB,
    }
    return {**base, **fields}


def make_gpu(index: int, free: int, uuid: str | None = None) -> GpuInfo:
    return GpuInfo(
        index=index,
        name=f"GPU {index}",
        uuid=uuid or f"GPU-{index:04d}",
        memory_total=80 * GIB,
        memory_free=free,
        memory_used=80 * GIB - free,
        utilization=0,
        temperature_c=None,
        power_w=None,
        power_limit_w=None,
        compute_capability="9.0",
        processes=[],
    )


def report_with(gpus: list[GpuInfo], notes: list[str] | None = None) -> DeviceReport:
    return DeviceReport(
        gpus=gpus,
        cpu=CpuInfo(model="Test CPU", cores_physical=4, cores_logical=8, load_1m=2.0),
        memory=MemoryInfo(total=32 * GIB, available=16 * GIB),
        notes=notes or [],
    )


# -- discovery through the fake ---------------------------------------------------------------


def test_several_gpus_with_one_failing_are_reported_in_order() -> None:
    fake = fake_from_file(THREE_GPUS)
    report = discover(fake)

    assert [g.index for g in report.gpus] == [0, 2]
    h100, rtx = report.gpus
    assert h100.name == "NVIDIA H100 80GB HBM3"
    assert h100.uuid == "GPU-1b2c3d4e-0000-1111-2222-333344445555"
    assert h100.memory_total == 85520809984
    assert h100.memory_used == 10 * GIB
    assert h100.memory_free == 85520809984 - 10 * GIB
    assert h100.utilization == 37
    assert h100.temperature_c == 44
    assert h100.power_w == pytest.approx(212.345)
    assert h100.power_limit_w == 700.0
    assert h100.compute_capability == "9.0"
    assert rtx.compute_capability == "8.9"
    assert report.notes == ["GPU 1: query failed: GPU is lost"]
    assert fake.init_count == 0, "nvmlShutdown must follow a successful nvmlInit"


def test_unsupported_field_becomes_none_without_failing_the_gpu() -> None:
    report = discover(fake_from_file(THREE_GPUS))
    rtx = report.gpus[1]
    assert rtx.name == "NVIDIA GeForce RTX 4090"
    assert rtx.power_w is None
    assert rtx.power_limit_w is None
    assert rtx.utilization == 5
    # "Not Supported" is routine, so it adds no note.
    assert not any("GPU 2" in note for note in report.notes)


def test_every_optional_field_unsupported_still_reports_the_gpu() -> None:
    report = discover(FakeNvml({"gpus": [gpu_desc()]}))
    (gpu,) = report.gpus
    assert (gpu.memory_total, gpu.memory_free, gpu.memory_used) == (8 * GIB, 7 * GIB, GIB)
    optional = (
        gpu.utilization,
        gpu.temperature_c,
        gpu.power_w,
        gpu.power_limit_w,
        gpu.compute_capability,
        gpu.processes,
    )
    assert optional == (None, None, None, None, None, None)
    assert report.notes == []


def test_missing_memory_info_fails_the_gpu_with_a_note() -> None:
    desc = gpu_desc()
    del desc["memory_total"]
    fake = FakeNvml({"gpus": [desc, gpu_desc(uuid="GPU-second")]})
    report = discover(fake)
    assert [g.uuid for g in report.gpus] == ["GPU-second"]
    assert report.notes == ["GPU 0: query failed: Not Supported"]
    assert fake.init_count == 0


def test_processes_merge_compute_and_graphics_lists() -> None:
    h100, rtx = discover(fake_from_file(THREE_GPUS)).gpus
    # pid 4242 is in both lists and is reported once; pid 5151's usage is unknown to NVML.
    assert h100.processes == [
        GpuProcess(pid=4242, used_memory=8 * GIB),
        GpuProcess(pid=5151, used_memory=None),
    ]
    assert rtx.processes == [GpuProcess(pid=777, used_memory=256 * 1024**2)]


def test_processes_known_from_one_list_when_the_other_fails() -> None:
    fake = FakeNvml({"gpus": [gpu_desc(compute_processes=[{"pid": 9, "used_memory": 5}])]})
    (gpu,) = discover(fake).gpus
    assert gpu.processes == [GpuProcess(pid=9, used_memory=5)]


class PermissionDeniedProcesses(FakeNvml):
    """A field failing for a reason other than "Not Supported" is worth a note."""

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        raise nvml_fake.NVMLError(4)  # NVML_ERROR_NO_PERMISSION


class LibraryMismatch(Exception):
    pass


class MismatchedProcesses(FakeNvml):
    """pynvml raises NVMLLibraryMismatchError, not an NVMLError, from unversioned calls."""

    NVMLLibraryMismatchError = LibraryMismatch

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        raise LibraryMismatch("pyNVML version does not match the NVML lib version")


def test_unexpected_field_error_is_noted_and_field_is_none() -> None:
    report = discover(PermissionDeniedProcesses({"gpus": [gpu_desc(temperature_c=50)]}))
    (gpu,) = report.gpus
    assert gpu.processes is None
    assert gpu.temperature_c == 50
    assert report.notes == ["GPU 0: compute processes: NVML Error with code 4"]


def test_library_mismatch_from_process_list_does_not_fail_the_gpu() -> None:
    desc = gpu_desc(compute_processes=[{"pid": 3, "used_memory": 1}])
    report = discover(MismatchedProcesses({"gpus": [desc]}))
    (gpu,) = report.gpus
    assert gpu.processes == [GpuProcess(pid=3, used_memory=1)]
    assert report.notes == [
        "GPU 0: graphics processes: pyNVML version does not match the NVML lib version"
    ]


def test_bytes_strings_from_old_pynvml_are_decoded() -> None:
    fake = FakeNvml({"bytes_strings": True, "gpus": [gpu_desc(name="Tesla T4")]})
    (gpu,) = discover(fake).gpus
    assert gpu.name == "Tesla T4"
    assert gpu.uuid == "GPU-fake"


@pytest.mark.parametrize(
    ("driver", "note"),
    [
        (False, "NVML unavailable: driver not found (libnvidia-ml.so.1 not loadable)"),
        ("not_loaded", "NVML unavailable: driver not loaded"),
    ],
)
def test_no_driver_still_reports_cpu_and_ram(driver: bool | str, note: str) -> None:
    fake = FakeNvml({"driver": driver, "gpus": [gpu_desc()]})
    report = discover(fake)
    assert report.gpus == []
    assert report.notes == [note]
    assert report.cpu.cores_logical >= 1
    assert report.cpu.model
    assert report.memory.total > 0
    assert 0 < report.memory.available <= report.memory.total
    assert fake.init_count == 0  # and no nvmlShutdown without nvmlInit (it would add a note)


def test_no_driver_fixture_through_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAKE_NVML_ENV, str(NO_DRIVER))
    report = discover()
    assert report.gpus == []
    assert report.notes == ["NVML unavailable: driver not found (libnvidia-ml.so.1 not loadable)"]
    assert report.summaries()[0]["kind"] == "cpu"


def test_zero_gpus_with_a_driver_is_not_an_error() -> None:
    report = discover(FakeNvml({"gpus": []}))
    assert report.gpus == []
    assert report.notes == []


# -- the real pynvml, and NVML selection --------------------------------------------------------


def test_real_pynvml_path_does_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAKE_NVML_ENV, raising=False)
    assert load_nvml() is pynvml
    report = discover()
    assert report.cpu.cores_logical >= 1
    assert report.memory.total > 0
    if report.gpus:  # a machine with a driver: the GPUs must be real ones
        assert all(g.name and g.uuid and g.memory_total > 0 for g in report.gpus)
    else:
        assert any(note.startswith("NVML unavailable") for note in report.notes), report.notes


def test_fake_and_pynvml_offer_every_call_discovery_makes() -> None:
    calls = [name for name in vars(NvmlLike) if name.startswith("nvml")]
    assert len(calls) == 15
    fake = FakeNvml({"gpus": []})
    for name in calls:
        real_params = [
            p
            for p in inspect.signature(getattr(pynvml, name)).parameters.values()
            if p.default is inspect.Parameter.empty
        ]
        fake_params = list(inspect.signature(getattr(fake, name)).parameters.values())
        assert len(real_params) == len(fake_params), name
    for attr in ("NVMLError", "NVML_TEMPERATURE_GPU"):
        assert hasattr(pynvml, attr) and hasattr(fake, attr)
    assert fake.NVML_TEMPERATURE_GPU == pynvml.NVML_TEMPERATURE_GPU
    for code in (
        "NOT_SUPPORTED",
        "NOT_FOUND",
        "DRIVER_NOT_LOADED",
        "LIBRARY_NOT_FOUND",
        "GPU_IS_LOST",
    ):
        assert getattr(nvml_fake, f"NVML_ERROR_{code}") == getattr(pynvml, f"NVML_ERROR_{code}")
        err_real, err_fake = (
            pynvml.NVMLError(getattr(pynvml, f"NVML_ERROR_{code}")),
            nvml_fake.NVMLError(getattr(nvml_fake, f"NVML_ERROR_{code}")),
        )
        assert str(err_real) == str(err_fake)


def test_env_selects_the_fake_and_rereads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps({"gpus": [gpu_desc(utilization=0)]}))
    monkeypatch.setenv(FAKE_NVML_ENV, str(path))
    assert [g.utilization for g in discover().gpus] == [0]

    # An idle policy edits the file while the agent runs; the next discovery sees the change.
    path.write_text(json.dumps({"gpus": [gpu_desc(utilization=95), gpu_desc(uuid="GPU-2")]}))
    assert [g.utilization for g in discover().gpus] == [95, None]


def test_bad_fake_file_is_a_note_from_discover_and_an_error_from_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "nvml.json"
    path.write_text("{not json")
    monkeypatch.setenv(FAKE_NVML_ENV, str(path))
    with pytest.raises(NvmlLoadError, match="is not valid JSON"):
        load_nvml()
    report = discover()
    assert report.gpus == []
    assert len(report.notes) == 1
    assert report.notes[0].startswith(f"NVML unavailable: fake NVML file {path} is not valid JSON")

    monkeypatch.setenv(FAKE_NVML_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(NvmlLoadError, match="cannot read fake NVML file"):
        load_nvml()


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ({"gpus": [gpu_desc(power=100)]}, "unknown key 'power'"),
        ({"gpus": [gpu_desc(memory_total="8G")]}, "bad value for 'memory_total'"),
        ({"gpus": [gpu_desc(compute_capability=[9])]}, "bad value for 'compute_capability'"),
        ({"gpus": [gpu_desc(compute_processes=[{"used_memory": 1}])]}, "'compute_processes'"),
        ({"driver": "maybe"}, '"driver" must be'),
        ({"gpu": []}, "unknown keys: ['gpu']"),
        ([], "must be a JSON object"),
    ],
)
def test_fake_rejects_malformed_descriptions(description: Any, message: str) -> None:
    with pytest.raises(FakeNvmlConfigError) as info:
        FakeNvml(description)
    assert message in str(info.value)


def test_env_selection_works_across_processes() -> None:
    code = (
        "import json, sys\n"
        "from agent.hw.devices import discover\n"
        "report = discover()\n"
        "print(json.dumps({'report': report.to_json(),"
        " 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))\n"
    )
    env = {**os.environ, FAKE_NVML_ENV: str(THREE_GPUS)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(done.stdout)
    assert [g["name"] for g in out["report"]["gpus"]] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA GeForce RTX 4090",
    ]
    assert out["report"]["notes"] == ["GPU 1: query failed: GPU is lost"]
    assert out["heavy"] == [], "device discovery must not import torch or transformers"


# -- report shapes ----------------------------------------------------------------------------


def test_to_json_has_stable_keys_and_round_trips() -> None:
    report = discover(fake_from_file(THREE_GPUS))
    data = json.loads(json.dumps(report.to_json()))
    assert list(data) == ["gpus", "cpu", "memory", "notes"]
    assert list(data["gpus"][0]) == [
        "index",
        "name",
        "uuid",
        "memory_total",
        "memory_free",
        "memory_used",
        "utilization",
        "temperature_c",
        "power_w",
        "power_limit_w",
        "compute_capability",
        "processes",
    ]
    assert data["gpus"][0]["processes"][0] == {
        "pid": 4242,
        "used_memory": 8 * GIB,
        "sm_util": None,
    }
    assert data["gpus"][1]["power_w"] is None
    assert list(data["cpu"]) == ["model", "cores_physical", "cores_logical", "load_1m"]
    assert list(data["memory"]) == ["total", "available"]
    assert DeviceReport.from_json(data) == report


def test_from_json_rejects_malformed_reports() -> None:
    with pytest.raises(DeviceError, match="malformed device report"):
        DeviceReport.from_json({"gpus": [], "cpu": {"model": "x"}, "memory": {}, "notes": []})


def test_summaries_one_per_gpu_then_cpu() -> None:
    report = discover(fake_from_file(THREE_GPUS))
    rows = report.summaries()
    assert [r["kind"] for r in rows] == ["gpu", "gpu", "cpu"]
    for row in rows:
        assert set(row) == {"kind", "name", "memory_total", "memory_free", "utilization"}
    assert rows[0]["name"] == "NVIDIA H100 80GB HBM3"
    assert rows[0]["memory_free"] == report.gpus[0].memory_free
    assert rows[0]["utilization"] == 37.0 and isinstance(rows[0]["utilization"], float)
    assert rows[2]["memory_total"] == report.memory.total
    assert rows[2]["memory_free"] == report.memory.available


def test_summaries_none_utilization_and_cpu_load_percent() -> None:
    gpu = make_gpu(0, GIB)
    gpu.utilization = None
    rows = report_with([gpu]).summaries()
    assert rows[0]["utilization"] is None
    assert rows[1] == {
        "kind": "cpu",
        "name": "Test CPU",
        "memory_total": 32 * GIB,
        "memory_free": 16 * GIB,
        "utilization": 25.0,  # load 2.0 over 8 logical cores
    }
    busy = report_with([])
    busy.cpu.load_1m = 20.0
    assert busy.summaries()[0]["utilization"] == 100.0


# -- choosing a device ----------------------------------------------------------------------------


def test_best_cuda_device_picks_most_free_memory() -> None:
    report = report_with([make_gpu(0, 10 * GIB), make_gpu(1, 70 * GIB), make_gpu(2, 30 * GIB)])
    assert best_cuda_device(report, env={}) == 1
    tie = report_with([make_gpu(0, 5 * GIB), make_gpu(1, 5 * GIB)])
    assert best_cuda_device(tie, env={}) == 0
    assert best_cuda_device(report_with([]), env={}) is None


def test_best_cuda_device_skips_failed_gpus_but_keeps_their_numbers() -> None:
    # NVML GPU 1 failed discovery; CUDA still numbers it, so GPU 2 stays CUDA device 2.
    report = report_with([make_gpu(0, 10 * GIB), make_gpu(2, 30 * GIB)])
    assert best_cuda_device(report, env={}) == 2
    assert best_cuda_device(report, env={"CUDA_VISIBLE_DEVICES": "1,2"}) == 1


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("2,0", 0),  # NVML 2 is CUDA 0 and has the most free memory
        ("0", 0),
        ("0,1", 1),
        ("GPU-0001", 0),  # by UUID prefix
        ("GPU-0000,GPU-0001", 1),
        ("", None),
        ("-1", None),
        ("0,-1,2", 0),  # CUDA stops at the first invalid entry
        ("MIG-abcd", None),
    ],
)
def test_best_cuda_device_follows_cuda_visible_devices(visible: str, expected: int | None) -> None:
    report = report_with([make_gpu(0, 10 * GIB), make_gpu(1, 20 * GIB), make_gpu(2, 70 * GIB)])
    assert best_cuda_device(report, env={"CUDA_VISIBLE_DEVICES": visible}) == expected


def test_cuda_visible_gpus_maps_cuda_indices_to_nvml_gpus() -> None:
    gpus = [
        make_gpu(0, GIB, "GPU-aaaa"),
        make_gpu(1, GIB, "GPU-bbbb"),
        make_gpu(2, GIB, "GPU-cccc"),
    ]
    report = report_with(gpus)
    pairs = cuda_visible_gpus(report, env={"CUDA_VISIBLE_DEVICES": "GPU-cc, 0"})
    assert [(cuda, gpu.uuid) for cuda, gpu in pairs] == [(0, "GPU-cccc"), (1, "GPU-aaaa")]
    assert [cuda for cuda, _ in cuda_visible_gpus(report, env={})] == [0, 1, 2]


# -- rendering and CPU details ----------------------------------------------------------------


def test_render_devices_tables_in_gib_with_notes_below() -> None:
    report = discover(fake_from_file(THREE_GPUS))
    text = render_devices(report, width=140)
    assert "NVIDIA H100 80GB HBM3" in text
    assert "10.0/79.6" in text  # used / total GiB
    assert "69.6" in text  # free GiB
    assert "212/700" in text  # power draw / limit
    assert "4242" in text and "8.0" in text  # process table
    assert report.cpu.model in text
    assert text.index("Notes:") > text.index("CPU and RAM")
    assert "GPU 1: query failed: GPU is lost" in text.split("Notes:")[1]


def test_render_devices_without_gpus_and_with_markup_like_names() -> None:
    report = report_with([], notes=["NVML unavailable: driver not found"])
    report.cpu.model = "Weird [bold]CPU[/bold]"
    text = render_devices(report)
    assert "GPUs: none found" in text
    assert "Weird [bold]CPU[/bold]" in text
    assert text.rstrip().endswith("NVML unavailable: driver not found")


def test_render_devices_shows_dashes_for_unknown_fields() -> None:
    gpu = make_gpu(0, GIB)
    gpu.processes = None
    text = render_devices(report_with([gpu]), width=140)
    row = next(line for line in text.splitlines() if "GPU 0" in line)
    assert row.split().count("-") == 3  # temperature, power, processes


@pytest.mark.parametrize(
    ("text", "model"),
    [
        (
            "processor\t: 0\nmodel name\t: AMD EPYC 7763 64-Core Processor\n",
            "AMD EPYC 7763 64-Core Processor",
        ),
        (
            "processor\t: 0\nBogoMIPS\t: 108.00\n\n"
            "Hardware\t: BCM2835\nModel\t: Raspberry Pi 4 Model B Rev 1.4\n",
            "Raspberry Pi 4 Model B Rev 1.4",
        ),
        (
            "processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\n",
            "POWER9 (raw), altivec supported",
        ),
        ("processor\t: 0\nCPU implementer\t: 0x41\n", None),
        ("", None),
    ],
)
def test_cpu_model_from_cpuinfo(text: str, model: str | None) -> None:
    assert cpu_model_from_cpuinfo(text) == model
