"""Plain, serialisable facts about the machine, as the probes found them.

They cross a process boundary (each probe prints them as JSON in its subprocess), feed the pure
planner, and are shown as they are by ``appliance doctor --json`` and ``/v1/appliance/hardware``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from engines.base import EngineCapabilities

MIB = 1 << 20
GIB = 1 << 30


def size(n: int | None) -> str:
    """Bytes as people read them in reports and reasons: "720 MiB", "13.6 GiB"."""
    if n is None:
        return "?"
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


class PlatformAbsentError(Exception):
    """The platform is not there (no driver, no device): reported as absent, not as a failure."""


class Facts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CpuFacts(Facts):
    """The CPU and the memory the process may use."""

    model: str | None = None
    arch: str = ""  # platform.machine(): x86_64, aarch64, arm64, AMD64
    physical_cores: int | None = None
    logical_cores: int | None = None
    # CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)
    usable_cores: float | None = None
    features: tuple[str, ...] = ()  # the ones that matter to llama.cpp's kernels, normalised
    ram_total: int | None = None
    ram_available: int | None = None  # capped by a cgroup memory limit
    memory_limit: int | None = None  # the cgroup limit, when one is set
    source: str = ""


class GpuFacts(Facts):
    """One GPU as its driver reports it."""

    vendor: Literal["nvidia", "amd", "apple", "intel"]
    index: int
    name: str
    vram_total: int | None = None
    vram_free: int | None = None
    unified_memory: bool = False  # shares the host's RAM (Apple silicon, APUs)
    compute_capability: str | None = None  # NVIDIA, e.g. "9.0"
    gfx_target: str | None = None  # AMD, e.g. "gfx1100"
    driver_version: str | None = None
    cuda_version: str | None = None  # the newest CUDA the driver supports
    pci_bus_id: str | None = None
    source: str = ""  # "nvml", "nvidia-smi", "sysfs", "system_profiler"


ProbeStatus = Literal["ok", "absent", "failed", "timeout", "skipped"]


class ProbeOutcome(Facts):
    """How one probe went: a failed or hung probe is reported here, never fatal."""

    name: str
    status: ProbeStatus
    detail: str = ""
    seconds: float = 0.0


class HardwareFacts(Facts):
    cpu: CpuFacts
    gpus: tuple[GpuFacts, ...] = ()
    engines: tuple[EngineCapabilities, ...] = ()
    probes: tuple[ProbeOutcome, ...] = ()
    os: str = ""
    probed_at: str = ""

    def engine(self, name: str) -> EngineCapabilities | None:
        return next((e for e in self.engines if e.engine == name), None)

    def probe(self, name: str) -> ProbeOutcome | None:
        return next((p for p in self.probes if p.name == name), None)
