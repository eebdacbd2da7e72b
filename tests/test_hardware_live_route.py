"""``GET /v1/appliance/hardware/live``: a typed sample of the machine's load, behind the API key."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api.hardware import HardwareLive
from appliance.config import Settings
from appliance.scheduler import Scheduler

LIVE = "/v1/appliance/hardware/live"


@pytest.fixture
def http() -> Iterator[TestClient]:
    with TestClient(create_app(Scheduler(), Settings()), base_url="http://localhost") as client:
        yield client


def test_sample_has_cpu_ram_and_the_server_process(http: TestClient) -> None:
    resp = http.get(LIVE)
    assert resp.status_code == 200, resp.text
    sample = HardwareLive.model_validate(resp.json())
    assert len(sample.cpu_per_core) == psutil.cpu_count()
    assert all(0.0 <= p <= 100.0 for p in sample.cpu_per_core)
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert 0 < sample.ram_used <= sample.ram_total == psutil.virtual_memory().total
    assert 0 < sample.process_rss < sample.ram_total
    assert sample.gpus is None and sample.gpu_error  # no report: unknown, not "no GPU"


def test_successive_samples_advance(http: TestClient) -> None:
    first = HardwareLive.model_validate(http.get(LIVE).json())
    second = HardwareLive.model_validate(http.get(LIVE).json())
    assert second.time >= first.time


def test_needs_the_api_key_when_one_is_set() -> None:
    app = create_app(Scheduler(), Settings(api_key="live-key-1234"))
    with TestClient(app, base_url="http://localhost") as http:
        assert http.get(LIVE).status_code == 401
        ok = http.get(LIVE, headers={"Authorization": "Bearer live-key-1234"})
        assert ok.status_code == 200 and "cpu_percent" in ok.json()


def _report(*gpus: dict[str, object]) -> object:
    from appliance.hardware.detect import detect
    from appliance.hardware.facts import GpuFacts
    from appliance.hardware.report import build_report

    facts = detect(15).model_copy(update={"gpus": tuple(GpuFacts(**g) for g in gpus)})  # type: ignore[arg-type]
    return build_report(facts, [])


H200 = {"vendor": "nvidia", "index": 0, "name": "NVIDIA H200", "vram_total": 150 << 30, "source": "nvml"}


def test_gpu_load_is_sampled_where_nvidia_gpus_were_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.hardware import nvidia

    class FakeNvml:
        class NVMLError(Exception):
            pass

        @staticmethod
        def nvmlInit() -> None:  # noqa: N802 (NVML's name)
            pass

        @staticmethod
        def nvmlDeviceGetCount() -> int:  # noqa: N802
            return 1

        @staticmethod
        def nvmlDeviceGetHandleByIndex(i: int) -> int:  # noqa: N802
            return i

        @staticmethod
        def nvmlDeviceGetMemoryInfo(h: int) -> object:  # noqa: N802
            return type("M", (), {"used": 3 << 30, "total": 150 << 30})()

        @staticmethod
        def nvmlDeviceGetUtilizationRates(h: int) -> object:  # noqa: N802
            return type("U", (), {"gpu": 42})()

        @staticmethod
        def nvmlDeviceGetName(h: int) -> str:  # noqa: N802
            return "NVIDIA H200"

    monkeypatch.setitem(__import__("sys").modules, "pynvml", FakeNvml)
    app = create_app(Scheduler(), Settings(), hardware=_report(H200))  # type: ignore[arg-type]
    with TestClient(app, base_url="http://localhost") as client:
        sample = HardwareLive.model_validate(client.get(LIVE).json())
    assert sample.gpu_error is None and sample.gpus is not None
    assert [(g.name, g.utilization_percent, g.vram_used) for g in sample.gpus] == [("NVIDIA H200", 42.0, 3 << 30)]
    assert nvidia.NvmlSampler  # the class the route uses


def test_no_gpu_is_an_empty_list_and_a_hung_driver_turns_sampling_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from appliance.api import hardware
    from appliance.hardware.nvidia import NvmlSampler

    with TestClient(create_app(Scheduler(), Settings(), hardware=_report()), base_url="http://localhost") as client:  # type: ignore[arg-type]
        assert HardwareLive.model_validate(client.get(LIVE).json()).gpus == []
    monkeypatch.setattr(hardware, "GPU_SAMPLE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(NvmlSampler, "sample", lambda self: time.sleep(1) or [])
    app = create_app(Scheduler(), Settings(), hardware=_report(H200))  # type: ignore[arg-type]
    with TestClient(app, base_url="http://localhost") as client:
        first = HardwareLive.model_validate(client.get(LIVE).json())
        started = time.monotonic()
        second = HardwareLive.model_validate(client.get(LIVE).json())
        took = time.monotonic() - started
    assert first.gpus is None and "did not answer" in str(first.gpu_error)
    assert second.gpu_error == first.gpu_error and took < 0.5  # the stuck driver is not asked again
