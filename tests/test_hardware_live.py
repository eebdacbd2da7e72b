"""The plan with the real model: llama.cpp's own memory figures, loading as planned, and the server's report."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

from appliance.bootstrap import build_scheduler, plan_serving
from appliance.config import Paths, Settings
from appliance.hardware.detect import detect
from appliance.hardware.facts import GIB, MIB, HardwareFacts
from appliance.registry import load_registry
from tests.conftest import LiveServer

BUFFER = re.compile(r"(CPU KV|CPU compute) buffer size =\s+([\d.]+) MiB")


@pytest.fixture(scope="module")
def hardware() -> HardwareFacts:
    return detect(timeout=60)


def test_planned_memory_matches_what_llama_cpp_allocates(
    tmp_path: Path, hardware: HardwareFacts, caplog: pytest.LogCaptureFixture
) -> None:
    paths = Paths(tmp_path)
    settings = Settings(parallel=8, ctx_size=4096, threads=2)
    planned = plan_serving(settings, paths, load_registry(paths), hardware)
    ((_, plan),) = planned
    caplog.set_level(logging.DEBUG, logger="engines.llama_cpp.native")
    scheduler = build_scheduler(settings, paths, planned=planned)
    try:
        found = {kind: float(mib) * MIB for kind, mib in BUFFER.findall(caplog.text)}
        (ram,) = plan.memory
        assert ram.kv_cache == pytest.approx(found["CPU KV"], abs=0.01 * MIB)  # 720 MiB, exactly
        assert ram.compute == pytest.approx(found["CPU compute"], rel=0.05)  # 100.5 against 98.25 MiB
    finally:
        scheduler.stop()


def test_the_model_is_loaded_as_planned_when_ram_is_short(tmp_path: Path, hardware: HardwareFacts) -> None:
    """1 GiB of RAM available: the planner shortens the context, and the loaded model has that context."""
    paths = Paths(tmp_path)
    low = hardware.model_copy(update={"cpu": hardware.cpu.model_copy(update={"ram_available": GIB})})
    planned = plan_serving(Settings(threads=2), paths, load_registry(paths), low)
    ((_, plan),) = planned
    assert plan.ctx_size.value == 1792 and plan.slots.value == 8 and plan.threads.value == 2
    scheduler = build_scheduler(Settings(threads=2), paths, planned=planned)
    try:
        runner = scheduler.resolve("smollm2")
        assert (runner.model.facts.n_slots, runner.model.facts.n_ctx_per_slot) == (8, 1792)
        assert runner.model.facts.backend == "cpu" and runner.config.n_batch == 512
    finally:
        scheduler.stop()


def test_server_reports_its_hardware_and_plan(live_server: LiveServer) -> None:
    report = httpx.get(live_server.base_url + "/v1/appliance/hardware", timeout=10).json()
    (plan,) = report["plans"]
    assert plan["model"] == "smollm2-135m-instruct" and plan["device"]["value"] == "cpu"
    assert plan["slots"] == {"value": 4, "reason": "set by the user", "source": "--parallel"}
    assert plan["threads"]["source"] == "--threads" and plan["threads"]["value"] == 2
    assert report["hardware"]["gpus"] == [] and {p["name"] for p in report["hardware"]["probes"]} >= {"cpu", "engines"}
    assert live_server.model_stats()["slots"] == 4
    log = "".join(live_server.output)
    assert re.search(r"INFO appliance: hardware: .+, \d+ cores .*RAM free; no GPU; llama.cpp build: CPU only", log)
    assert "INFO appliance: plan: smollm2-135m-instruct: cpu, 2 threads, 4 slots x 4096 tokens, batch 512" in log


def test_hardware_report_needs_the_api_key(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--api-key", "secret-key-123")
    url = server.base_url + "/v1/appliance/hardware"
    denied = httpx.get(url, timeout=10)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    allowed = httpx.get(url, headers={"Authorization": "Bearer secret-key-123"}, timeout=10)
    assert allowed.status_code == 200 and allowed.json()["plans"][0]["model"] == "smollm2-135m-instruct"


def test_models_toml_overrides_win_over_the_server_settings(
    tmp_path: Path, hardware: HardwareFacts, default_model_path: Path
) -> None:
    paths = Paths(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    paths.models_file.write_text(f'[models.pinned]\npath = "{default_model_path}"\nthreads = 1\ndevice = "cpu"\n')
    registry = load_registry(paths)
    ((_, plan),) = plan_serving(Settings(threads=2, models=("pinned",)), paths, registry, hardware)
    assert (plan.threads.value, plan.threads.source) == (1, "models.toml (pinned.threads)")
    assert (plan.device.value, plan.device.source) == ("cpu", "models.toml (pinned.device)")
    ((_, default),) = plan_serving(Settings(threads=2), paths, registry, hardware)
    assert (default.threads.value, default.threads.source) == (2, "--threads")
