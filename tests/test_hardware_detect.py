"""Detection end to end: probes in subprocesses, killed when they hang, and ``appliance doctor``.

GPU tools are faked at the OS boundary only: an ``nvidia-smi`` on PATH that prints the output
recorded on a real two-P100 machine, or that never answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.hardware.detect import detect, probe_command, run_probes

DATA = Path(__file__).parent / "data" / "hardware"
PY = sys.executable


def fake_tool(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    """An environment whose PATH starts with a directory holding a fake ``name`` script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_this_machine_is_cpu_only() -> None:
    hw = detect(timeout=60)
    statuses = {p.name: p.status for p in hw.probes}
    assert statuses["cpu"] == "ok" and statuses["engines"] == "ok"
    assert statuses["nvidia"] in ("skipped", "absent") and statuses["rocm"] in ("skipped", "absent")
    assert hw.gpus == () and hw.cpu.physical_cores and hw.cpu.ram_total
    gguf = hw.engine("gguf")
    assert gguf is not None and gguf.installed and gguf.runtime == "llama-cpp-python 0.3.36"
    assert [d.backend for d in gguf.devices] == ["CPU"] and not gguf.gpu_offload


def test_a_hung_probe_is_killed_at_the_timeout_and_reported() -> None:
    start = time.monotonic()
    results = run_probes(
        {
            "nvidia": [PY, "-c", "import time; time.sleep(600)"],
            "cpu": probe_command("cpu"),
        },
        timeout=2,
    )
    assert time.monotonic() - start < 10
    hung, data = results["nvidia"]
    assert (hung.status, data) == ("timeout", None)
    assert hung.detail == "no answer after 2 s: killed (a hung driver?)"
    assert results["cpu"][0].status == "ok"  # the others still answer


def test_a_hung_driver_tool_does_not_hang_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi that never answers (NVML absent): the real nvidia probe is killed with it."""
    env = fake_tool(tmp_path, "nvidia-smi", "sleep 600")
    monkeypatch.setenv("PATH", env["PATH"])
    start = time.monotonic()
    hw = detect(timeout=3)
    assert time.monotonic() - start < 15
    nvidia = hw.probe("nvidia")
    assert nvidia is not None and nvidia.status == "timeout"
    assert hw.gpus == () and hw.cpu.physical_cores  # the rest of the machine is known
    # the nvidia-smi child died with the probe's process group
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "bin")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_a_crashing_probe_is_reported_with_its_signal() -> None:
    results = run_probes(
        {
            "crash": [PY, "-c", "import os; os.abort()"],
            "noise": [PY, "-c", "print('not a result')"],
            "missing": ["/nonexistent/probe"],
        },
        timeout=20,
    )
    assert results["crash"][0].status == "failed" and results["crash"][0].detail.startswith("crashed (SIGABRT)")
    assert results["noise"][0].status == "failed" and results["noise"][0].detail == "printed no result"
    assert results["missing"][0].status == "failed" and "cannot start it" in results["missing"][0].detail


def test_nvidia_probe_reads_nvidia_smi_when_nvml_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = DATA / "nvidia" / "tesla-p100-x2-no-cuda-version.xml"
    monkeypatch.setenv("PATH", fake_tool(tmp_path, "nvidia-smi", f'cat "{recorded}"')["PATH"])
    hw = detect(timeout=60)
    assert [g.name for g in hw.gpus] == ["Tesla P100-PCIE-12GB", "Tesla P100-PCIE-12GB_2"]
    probe = hw.probe("nvidia")
    assert probe is not None and probe.status == "ok" and probe.detail.startswith("nvidia-smi (NVML:")


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "appliance", "doctor", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_doctor_json_on_this_machine_reports_cpu_only_and_a_cpu_plan(app_home: Path) -> None:
    done = doctor(dict(os.environ), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["hardware"]["gpus"] == [] and report["advice"] == []
    (engine,) = [e for e in report["hardware"]["engines"] if e["engine"] == "gguf"]
    assert [d["backend"] for d in engine["devices"]] == ["CPU"]
    (plan,) = report["plans"]
    assert plan["model"] == "smollm2-135m-instruct" and plan["device"]["value"] == "cpu"
    assert plan["gpu_layers"] == {"value": 0, "reason": "CPU plan", "source": "auto"}
    assert plan["threads"]["value"] == report["hardware"]["cpu"]["physical_cores"]
    assert plan["error"] is None and [m["pool"] for m in plan["memory"]] == ["RAM"]


def test_doctor_tells_how_to_get_the_cuda_build(tmp_path: Path) -> None:
    recorded = DATA / "nvidia" / "tesla-t4.xml"
    env = fake_tool(tmp_path, "nvidia-smi", f'cat "{recorded}"')
    done = doctor(env)
    assert done.returncode == 0, done.stderr
    assert "NVIDIA #0 Tesla T4: 15.0 GiB, 13.6 GiB free, driver 515.105.01, CUDA 11.7 [nvidia-smi]" in done.stdout
    assert "! NVIDIA GPU found (Tesla T4) but this llama.cpp build has no CUDA: models run on the CPU" in done.stdout
    assert 'fix: install the CUDA build: CMAKE_ARGS="-DGGML_CUDA=on" pip install' in done.stdout
    forced = doctor(env, "--device", "cuda", "--json")
    (plan,) = json.loads(forced.stdout)["plans"]
    assert plan["error"].startswith("--device cuda: this llama.cpp build has no CUDA; install it:")


def test_doctor_shows_overrides(app_home: Path) -> None:
    done = doctor(dict(os.environ), "--threads", "1", "--parallel", "3", "--ctx-size", "1024")
    assert done.returncode == 0, done.stderr
    assert "threads     1              set by the user [override: --threads]" in done.stdout
    assert "slots       3              set by the user [override: --parallel]" in done.stdout
    assert "context     1024 /slot     set by the user [override: --ctx-size]" in done.stdout


def test_gpus_are_hidden_from_llama_cpp_when_the_engine_probe_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.bootstrap import hide_gpus_if_engine_hung

    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    hw = detect(timeout=60)
    hide_gpus_if_engine_hung(hw)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the probe answered: nothing hidden
    timed_out = [p.model_copy(update={"status": "timeout"}) if p.name == "engines" else p for p in hw.probes]
    hide_gpus_if_engine_hung(hw.model_copy(update={"probes": tuple(timed_out), "engines": ()}))
    assert all(os.environ[v] == "" for v in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"))
