"""``GET /v1/appliance/hardware`` and ``/hardware/live``: what the server found, and how busy the machine is now.

``/hardware`` is the same report as ``appliance doctor --json``, so an ops person can ask a running
server why a model is on the CPU without a shell on the box. ``/hardware/live`` is a cheap sample
of the machine's load (CPU per core, RAM, the server's own memory) for the desktop app's Hardware
screen, which polls it every few seconds while it is shown: the GUI may be attached to a server on
another box, so it cannot measure the machine itself.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import psutil
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError
from appliance.hardware.nvidia import NvmlSampler

router = APIRouter(prefix="/v1/appliance", dependencies=[Depends(require_api_key)])


class GpuLoad(BaseModel):
    """One GPU's load; the shape the desktop app shows once the server measures it."""

    index: int
    name: str
    utilization_percent: float | None = None
    vram_used: int | None = None
    vram_total: int | None = None


class HardwareLive(BaseModel):
    """A sample of the machine's load; CPU percentages cover the time since the previous sample."""

    time: float  # unix time of the sample
    cpu_percent: float  # the mean over all cores, 0-100
    cpu_per_core: list[float]
    ram_used: int  # bytes: total minus what is available to new programs (caches count as free)
    ram_total: int
    process_rss: int  # the server process's resident memory, in bytes
    # [] when the server found no NVIDIA GPU at start-up; null when the GPUs cannot be sampled (not NVIDIA:
    # ROCm-SMI sampling is not done yet; or NVML stopped answering), with ``gpu_error`` saying why
    gpus: list[GpuLoad] | None = None
    gpu_error: str | None = None


class _CpuMeter:
    """psutil's per-core CPU percentages since its previous call, made meaningful on the first call too.

    psutil answers 0.0 to its very first ``interval=None`` call (it has nothing to compare with),
    so that one call measures over a short interval instead; a lock keeps two first calls from both
    blocking. It blocks, so the route calls it in a worker thread.
    """

    FIRST_INTERVAL_S = 0.2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._primed = False

    def per_core(self) -> list[float]:
        with self._lock:
            interval = None if self._primed else self.FIRST_INTERVAL_S
            self._primed = True
            result: list[float] = psutil.cpu_percent(interval=interval, percpu=True)
            return result


_cpu = _CpuMeter()
_process = psutil.Process(os.getpid())


def sample_load() -> HardwareLive:
    per_core = [float(p) for p in _cpu.per_core()]
    memory = psutil.virtual_memory()
    return HardwareLive(
        time=time.time(),
        cpu_percent=round(sum(per_core) / len(per_core), 1) if per_core else 0.0,
        cpu_per_core=per_core,
        ram_used=int(memory.total - memory.available),
        ram_total=int(memory.total),
        process_rss=int(_process.memory_info().rss),
    )


@router.get("/hardware")
async def hardware(request: Request) -> dict[str, Any]:
    report = request.app.state.hardware
    if report is None:
        raise APIError(404, "this server was started without a hardware report", code="not_found")
    data: dict[str, Any] = report.model_dump(mode="json")
    residency = getattr(request.app.state, "residency", None)
    if residency is not None:  # the plans of the models loaded now, start-up's and on-demand ones alike
        data["plans"] = [plan.model_dump(mode="json") for plan in residency.plans()]
    return data


GPU_SAMPLE_TIMEOUT_S = 2.0


async def _gpu_load(request: Request) -> tuple[list[GpuLoad] | None, str | None]:
    """The GPUs' load now, if the start-up report found NVIDIA GPUs (NVML answered there)."""
    report = request.app.state.hardware
    if report is None:
        return None, "this server was started without a hardware report"
    gpus = report.hardware.gpus
    if not gpus:
        return [], None
    if not any(g.vendor == "nvidia" for g in gpus):
        return None, "live GPU load is measured on NVIDIA GPUs only"
    sampler: NvmlSampler | None = getattr(request.app.state, "gpu_sampler", None)
    if sampler is None:
        sampler = request.app.state.gpu_sampler = NvmlSampler()
    if sampler.disabled:
        return None, sampler.disabled
    try:
        loads = await asyncio.wait_for(asyncio.to_thread(sampler.sample), GPU_SAMPLE_TIMEOUT_S)
    except TimeoutError:
        sampler.disable(f"NVML did not answer within {GPU_SAMPLE_TIMEOUT_S:g} s; GPU sampling is off")
        return None, sampler.disabled
    except Exception as exc:  # NVMLError, a missing library: said, never a 500
        return None, f"NVML: {exc}"
    return [GpuLoad(**load) for load in loads], None


@router.get("/hardware/live")
async def hardware_live(request: Request) -> HardwareLive:
    sample = await asyncio.to_thread(sample_load)
    gpus, why = await _gpu_load(request)
    return sample.model_copy(update={"gpus": gpus, "gpu_error": why})
