"""The Hardware screen against a fake client: the report as readable sections, the live load polled while shown."""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

from PySide6.QtGui import QGuiApplication
from pytestqt.qtbot import QtBot

from gui.client import ApiError
from gui.viewmodels.hardware import HardwareViewModel, human_size, plan_facts, report_sections
from gui.views.hardware import HardwareView, sections_text

# `python -m appliance doctor --json` on the 2-core CI box (CPU only), as the server's
# GET /v1/appliance/hardware answers it
REPORT: dict[str, Any] = json.loads(
    r"""
{
 "hardware": {
  "cpu": {
   "model": "Intel(R) Xeon(R) Processor",
   "arch": "x86_64",
   "physical_cores": 2,
   "logical_cores": 2,
   "usable_cores": 2.0,
   "features": [
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx",
    "amx_int8",
    "amx_bf16"
   ],
   "ram_total": 25276502016,
   "ram_available": 24790765568,
   "memory_limit": null,
   "source": "/proc, cgroup"
  },
  "gpus": [],
  "engines": [
   {
    "engine": "gguf",
    "runtime": "llama-cpp-python 0.3.36",
    "installed": true,
    "gpu_offload": false,
    "backends": [
     "CPU"
    ],
    "devices": [
     {
      "name": "CPU",
      "backend": "CPU",
      "kind": "cpu",
      "description": "Intel(R) Xeon(R) Processor",
      "memory_free": 25276502016,
      "memory_total": 25276502016,
      "pci_bus_id": null
     }
    ],
    "providers": [],
    "build_info": "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1",
    "detail": ""
   },
   {
    "engine": "onnx",
    "runtime": "onnxruntime",
    "installed": false,
    "gpu_offload": false,
    "backends": [],
    "devices": [],
    "providers": [],
    "build_info": "",
    "detail": "onnxruntime is not installed (No module named 'onnxruntime')"
   }
  ],
  "probes": [
   {
    "name": "cpu",
    "status": "ok",
    "detail": "/proc, cgroup",
    "seconds": 0.263
   },
   {
    "name": "nvidia",
    "status": "skipped",
    "detail": "no NVIDIA driver (no /proc/driver/nvidia, nvidia-smi or libnvidia-ml)",
    "seconds": 0.0
   },
   {
    "name": "rocm",
    "status": "skipped",
    "detail": "no AMD ROCm driver (no /sys/class/kfd)",
    "seconds": 0.0
   },
   {
    "name": "metal",
    "status": "skipped",
    "detail": "not macOS",
    "seconds": 0.0
   },
   {
    "name": "engines",
    "status": "ok",
    "detail": "llama-cpp-python 0.3.36",
    "seconds": 0.555
   }
  ],
  "os": "Linux 6.18.44-fc-v669",
  "probed_at": "2026-11-30T22:58:05+00:00"
 },
 "plans": [
  {
   "model": "smollm2-135m-instruct",
   "engine": "gguf",
   "device": {
    "value": "cpu",
    "reason": "no GPU found",
    "source": "auto"
   },
   "gpu_layers": {
    "value": 0,
    "reason": "CPU plan",
    "source": "auto"
   },
   "n_layers": 31,
   "gpu_devices": [],
   "tensor_split": [],
   "main_gpu": 0,
   "threads": {
    "value": 2,
    "reason": "2 physical cores",
    "source": "auto"
   },
   "slots": {
    "value": 8,
    "reason": "2 per thread, 8 to 16: batched CPU decoding gains up to about 8",
    "source": "auto"
   },
   "ctx_size": {
    "value": 4096,
    "reason": "the default",
    "source": "auto"
   },
   "batch_size": {
    "value": 512,
    "reason": "llama.cpp's default: prompts are evaluated 512 tokens a step",
    "source": "auto"
   },
   "memory": [
    {
     "pool": "RAM",
     "weights": 98362432,
     "kv_cache": 754974720,
     "compute": 105381888,
     "available": 24790765568
    }
   ],
   "advice": [],
   "error": null
  }
 ],
 "advice": []
}
"""
)

LIVE: dict[str, Any] = {
    "time": 1000.0,
    "cpu_percent": 37.5,
    "cpu_per_core": [50.0, 25.0],
    "ram_used": 6 << 30,
    "ram_total": 24 << 30,
    "process_rss": 300 << 20,
    "gpus": None,
}


def with_advice(report: dict[str, Any]) -> dict[str, Any]:
    """The real report plus advice of both kinds, which the 2-core box has none of."""
    report = copy.deepcopy(report)
    report["advice"] = [{"level": "warning", "message": "only 2 cores: expect slow answers", "fix": "use a GPU"}]
    report["plans"][0]["advice"] = [{"level": "info", "message": "context capped", "fix": None}]
    return report


class FakeClient:
    base_url = "http://127.0.0.1:9999"

    def __init__(self, report: dict[str, Any] | None = REPORT) -> None:
        self.report = report
        self.live_calls = 0
        self.live_gate = threading.Event()
        self.live_gate.set()
        self.live_fails = False

    def hardware(self) -> dict[str, Any]:
        if self.report is None:
            raise ApiError("this server was started without a hardware report", status=404, code="not_found")
        return self.report

    def hardware_live(self) -> dict[str, Any]:
        self.live_calls += 1
        self.live_gate.wait(5)
        if self.live_fails:
            raise ApiError("The server at http://127.0.0.1:9999 cannot be reached (ConnectError).")
        return {**LIVE, "time": LIVE["time"] + self.live_calls}


def loaded_vm(qtbot: QtBot, client: FakeClient) -> HardwareViewModel:
    vm = HardwareViewModel(client)  # type: ignore[arg-type]
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    return vm


def test_report_becomes_sections_with_reasons(qtbot: QtBot) -> None:
    vm = loaded_vm(qtbot, FakeClient(with_advice(REPORT)))
    assert vm.title == "Hardware" and vm.last_error is None
    by_title = {s.title: s for s in vm.sections}
    assert list(by_title)[:4] == ["CPU", "Memory", "GPUs", "Engines"]
    cpu = {f.label: f for f in by_title["CPU"].facts}
    assert cpu["Cores"].value == "2 cores" and "AVX512F" in cpu["Instruction sets"].value
    assert "SSE4_2" not in cpu["Instruction sets"].value  # every CPU has it: noise
    assert by_title["GPUs"].facts[0].value == "none found"
    assert "no GPU offload" in by_title["Engines"].facts[0].value
    assert by_title["Engines"].facts[1].value == "not available"
    plan = {f.label: f for f in by_title["Plan for smollm2-135m-instruct"].facts}
    assert (plan["Device"].value, plan["Device"].reason, plan["Device"].source) == ("cpu", "no GPU found", "auto")
    assert plan["GPU layers"].value == "0 of 31"
    assert plan["Slots"].reason.startswith("2 per thread")
    assert plan["Memory (RAM)"].value == "914.3 MB of 23.1 GB available"
    assert plan["Info"].value == "context capped"
    advice = by_title["Advice"].facts[0]
    assert (advice.level, advice.value, advice.reason) == (
        "warning",
        "only 2 cores: expect slow answers",
        "fix: use a GPU",
    )


def test_gpu_and_overrides_are_shown() -> None:
    report = copy.deepcopy(REPORT)
    report["hardware"]["gpus"] = [
        {"vendor": "nvidia", "index": 0, "name": "NVIDIA H200", "vram_total": 150_754_820_096, "vram_free": 1 << 37}
        | {"compute_capability": "9.0", "driver_version": "570.86", "cuda_version": "12.8", "source": "nvml"}
    ]
    plan = report["plans"][0]
    plan["device"] = {"value": "cuda", "reason": "fits in VRAM", "source": "auto"}
    plan["gpu_devices"], plan["tensor_split"] = ["CUDA0"], []
    plan["threads"] = {"value": 4, "reason": "set by the user", "source": "config.toml"}
    plan["error"] = "needs 200 GB"
    gpus = next(s for s in report_sections(report) if s.title == "GPUs").facts
    assert gpus[0].label == "NVIDIA #0 NVIDIA H200"
    assert gpus[0].value == "140.4 GB, 128.0 GB free, compute 9.0, driver 570.86, CUDA 12.8"
    facts = {f.label: f for f in plan_facts(plan)}
    assert facts["Threads"].source == "config.toml" and facts["GPUs"].value == "CUDA0"
    assert facts["Cannot serve"].level == "error" and facts["Cannot serve"].reason == "needs 200 GB"


def test_human_size() -> None:
    assert [human_size(n) for n in (None, 0, 1023, 2048, 5 << 20, 3 << 30, 2 << 40)] == [
        "unknown",
        "0 B",
        "1023 B",
        "2 KB",
        "5.0 MB",
        "3.0 GB",
        "2.0 TB",
    ]


def test_view_shows_every_section_and_copies_text(qtbot: QtBot) -> None:
    vm = loaded_vm(qtbot, FakeClient(with_advice(REPORT)))
    view = HardwareView(vm)
    qtbot.addWidget(view)
    text = view.report.toPlainText()
    for section in vm.sections:
        assert section.title in text
    assert "no GPU found" in text and "2 per thread, 8 to 16" in text and "fix: use a GPU" in text
    view.copy_button.click()
    text = QGuiApplication.clipboard().text()
    assert text == sections_text(vm.sections) and "  Device: cpu (no GPU found) [auto]" in text


def test_a_missing_report_is_said_and_the_screen_stays_usable(qtbot: QtBot) -> None:
    vm = HardwareViewModel(FakeClient(report=None))  # type: ignore[arg-type]
    view = HardwareView(vm)
    qtbot.addWidget(view)
    with qtbot.waitSignal(vm.error) as error, qtbot.waitSignal(vm.loaded):
        vm.refresh()
    assert "without a hardware report" in error.args[0]
    assert "without a hardware report" in view.status.text() and view.reload_button.isEnabled()
    assert view.report.toPlainText() == ""


def test_live_load_polls_while_shown_one_at_a_time(qtbot: QtBot) -> None:
    client = FakeClient()
    vm = loaded_vm(qtbot, client)
    view = HardwareView(vm)
    qtbot.addWidget(view)
    client.live_gate.clear()  # the first poll hangs, as on a slow server
    view.show()
    qtbot.waitUntil(lambda: client.live_calls == 1)
    assert view.timer.isActive() and vm.polling
    vm.poll_live()
    vm.poll_live()  # the timer firing while the first poll is out
    with qtbot.waitSignal(vm.live_changed):
        client.live_gate.set()
    assert client.live_calls == 1 and not vm.polling
    assert view.live.cpu.text() == "38 % of 2 cores"
    assert view.live.ram.text() == "6.0 GB of 24.0 GB"
    assert view.live.process.text() == "Server process: 300.0 MB resident"
    assert "not measured" in view.live.gpu.text()
    assert view.live.cores.values == (50.0, 25.0)
    with qtbot.waitSignal(vm.live_changed, timeout=5000):  # the timer's next poll, 2 s later
        pass
    assert client.live_calls == 2 and len(vm.history) == 2
    view.hide()
    assert not view.timer.isActive()


def test_a_failed_poll_shows_in_the_live_panel_only(qtbot: QtBot) -> None:
    client = FakeClient()
    client.live_fails = True
    vm = loaded_vm(qtbot, client)
    view = HardwareView(vm)
    qtbot.addWidget(view)
    errors: list[str] = []
    vm.error.connect(errors.append)
    with qtbot.waitSignal(vm.live_changed):
        view.show()
    assert "cannot be reached" in view.live.status.text() and not errors
    client.live_fails = False
    with qtbot.waitSignal(vm.live_changed):
        vm.poll_live()
    assert view.live.status.text() == "" and vm.live is not None
