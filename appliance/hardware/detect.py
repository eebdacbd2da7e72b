"""Run the probes, each that talks to a driver in a short-lived subprocess with a timeout, and gather their facts.

The probes run side by side, so detection takes as long as the slowest one (about half a second
here). A probe that hangs is killed with its whole process group at the timeout; one that
crashes or fails is reported with why. Neither stops the server from starting: the planner
then plans for what is known, and says what was not.

What cannot hang runs in this process, saving a process start (a second of a two-core
machine's start-up in the single executable): the CPU probe on Linux, which reads /proc and
cgroup files, and the engines probe where no GPU driver is installed, whose answer is then
also remembered between starts (``probecache``).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from appliance.hardware import probecache
from appliance.hardware.cpu import psutil_facts
from appliance.hardware.facts import CpuFacts, GpuFacts, HardwareFacts, ProbeOutcome
from appliance.hardware.probe import MARKER, NAMES
from appliance.hardware.probe import run as run_in_process
from engines.base import EngineCapabilities

_ENGINE = TypeAdapter(EngineCapabilities)
DEFAULT_TIMEOUT = 15.0  # first CUDA initialisation on a cold machine can take seconds
GPU_PROBES = frozenset({"nvidia", "rocm", "metal"})


def probe_command(name: str) -> list[str]:
    """How to run one probe: through the module, or through the frozen executable itself."""
    if getattr(sys, "frozen", False):  # PyInstaller: there is no -m, the executable routes it
        return [sys.executable, "--hardware-probe", name]
    return [sys.executable, "-m", "appliance.hardware.probe", name]


def skip_reason(name: str) -> str | None:
    """Why a driver probe is pointless here (saves a process), or None to run it."""
    if name == "nvidia":
        found = (
            Path("/proc/driver/nvidia").exists()
            or shutil.which("nvidia-smi") is not None
            or ctypes.util.find_library("nvidia-ml") is not None
            or sys.platform == "win32"
        )
        return None if found else "no NVIDIA driver (no /proc/driver/nvidia, nvidia-smi or libnvidia-ml)"
    if name == "rocm":
        return None if Path("/sys/class/kfd").exists() else "no AMD ROCm driver (no /sys/class/kfd)"
    if name == "metal":
        return None if sys.platform == "darwin" else "not macOS"
    return None


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)  # the probe and anything it started (nvidia-smi)
        else:
            proc.kill()


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"crashed ({signal.Signals(-code).name})"
        return f"crashed (signal {-code})"
    return f"exited with code {code}"


def run_probe(name: str, command: Sequence[str], timeout: float) -> tuple[ProbeOutcome, Any]:
    """Run one probe command; its outcome, and its data when it answered."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=os.name == "posix",
        )
    except OSError as exc:
        return ProbeOutcome(name=name, status="failed", detail=f"cannot start it: {exc}"), None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.communicate()
        detail = f"no answer after {timeout:g} s: killed (a hung driver?)"
        return ProbeOutcome(name=name, status="timeout", detail=detail, seconds=round(timeout, 3)), None
    seconds = round(time.monotonic() - start, 3)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        last = (err.strip().splitlines() or [""])[-1][:300]
        detail = _exit_text(proc.returncode) if proc.returncode else "printed no result"
        return ProbeOutcome(name=name, status="failed", detail=f"{detail}: {last}" if last else detail), None
    result = json.loads(line[len(MARKER) :])
    outcome = ProbeOutcome(name=name, status=result["status"], detail=result["detail"], seconds=seconds)
    return outcome, result["data"]


def run_probes(commands: Mapping[str, Sequence[str]], timeout: float) -> dict[str, tuple[ProbeOutcome, Any]]:
    """Run probes side by side; every one has an outcome within ``timeout`` (plus the kill)."""
    with ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
        futures = {name: pool.submit(run_probe, name, cmd, timeout) for name, cmd in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def fallback_cpu() -> CpuFacts:
    """What the process can tell without a probe, should the CPU probe fail."""
    try:
        facts = psutil_facts()
    except (ImportError, OSError):
        facts = CpuFacts(arch=platform.machine(), logical_cores=os.cpu_count())
    return facts.model_copy(update={"source": f"{facts.source or 'os'} (the CPU probe failed)"})


def _bad(outcome: ProbeOutcome, exc: Exception) -> ProbeOutcome:
    return outcome.model_copy(update={"status": "failed", "detail": f"unreadable result: {exc}"})


def _in_process(name: str) -> tuple[ProbeOutcome, Any]:
    """A probe that only reads files (the CPU on Linux: /proc and cgroup files) costs no process."""
    start = time.monotonic()
    result = run_in_process(name)
    seconds = round(time.monotonic() - start, 3)
    return ProbeOutcome(name=name, status=result["status"], detail=result["detail"], seconds=seconds), result["data"]


def detect(
    timeout: float = DEFAULT_TIMEOUT,
    commands: Mapping[str, Sequence[str]] | None = None,
    cache_file: Path | None = None,
) -> HardwareFacts:
    """Probe this machine. ``commands`` replaces the probe commands (tests use hung ones).

    With ``cache_file``, the engines probe's answer is reused from there when no GPU driver is
    present and nothing it depends on changed (``probecache``), and remembered there otherwise.
    """
    probes: list[ProbeOutcome] = []
    known: dict[str, tuple[ProbeOutcome, Any]] = {}
    if commands is None:
        runnable: dict[str, Sequence[str]] = {}
        for name in NAMES:
            reason = skip_reason(name)
            if reason is None:
                runnable[name] = probe_command(name)
            else:
                probes.append(ProbeOutcome(name=name, status="skipped", detail=reason))
        if sys.platform.startswith("linux") and "cpu" in runnable:
            del runnable["cpu"]
            known["cpu"] = _in_process("cpu")
        if "engines" in runnable and not runnable.keys() & GPU_PROBES:
            # No GPU driver: nothing the engines probe touches can hang or crash, so it needs no
            # process of its own, and its answer can be remembered (probecache).
            del runnable["engines"]
            key = probecache.fingerprint() if cache_file is not None else None
            remembered = probecache.load(cache_file, key) if cache_file is not None and key else None
            if remembered is not None:
                data, when = remembered
                detail = ", ".join(c["runtime"] for c in data if c.get("installed"))
                outcome = ProbeOutcome(name="engines", status="ok", detail=f"{detail} (as probed {when})")
                known["engines"] = (outcome, data)
            else:
                known["engines"] = _in_process("engines")
                if cache_file is not None and key and known["engines"][0].status == "ok":
                    probecache.save(cache_file, key, known["engines"][1])
        commands = runnable
    results = {**known, **run_probes(commands, timeout)} if commands else known
    cpu: CpuFacts | None = None
    gpus: list[GpuFacts] = []
    engines: list[EngineCapabilities] = []
    for name, (outcome, data) in results.items():
        try:
            if outcome.status == "ok" and name == "cpu":
                cpu = CpuFacts.model_validate(data)
            elif outcome.status == "ok" and name == "engines":
                engines = [_ENGINE.validate_python(item) for item in data]
            elif outcome.status == "ok":
                gpus.extend(GpuFacts.model_validate(item) for item in data)
        except (ValidationError, TypeError, KeyError) as exc:
            outcome = _bad(outcome, exc)
        probes.append(outcome)
    order = {name: i for i, name in enumerate(NAMES)}
    probes.sort(key=lambda p: order.get(p.name, len(order)))
    return HardwareFacts(
        cpu=cpu or fallback_cpu(),
        gpus=tuple(gpus),
        engines=tuple(engines),
        probes=tuple(probes),
        os=f"{platform.system()} {platform.release()}",
        probed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
