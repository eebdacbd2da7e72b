"""The NVIDIA probe: each GPU's name, VRAM, compute capability, driver and CUDA version.

NVML (``nvidia-ml-py``) first: it is what nvidia-smi itself reads, and answers in milliseconds.
Where the library cannot be loaded, ``nvidia-smi -q -x`` is parsed instead. Both talk to the
driver, so ``detect`` runs this in a subprocess it can kill.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from typing import Any

from appliance.hardware.facts import MIB, GpuFacts, PlatformAbsentError


def _mib(text: str | None) -> int | None:
    parts = (text or "").split()
    if len(parts) == 2 and parts[1] == "MiB" and parts[0].isdigit():
        return int(parts[0]) * MIB
    return None


def _text(node: ET.Element | None, path: str) -> str | None:
    found = node.find(path) if node is not None else None
    value = (found.text or "").strip() if found is not None else ""
    return value if value and value != "N/A" else None


def parse_nvidia_smi_xml(text: str) -> list[GpuFacts]:
    """The GPUs in ``nvidia-smi -q -x`` output (any schema version seen from driver 375 to 535)."""
    root = ET.fromstring(text)
    driver, cuda = _text(root, "driver_version"), _text(root, "cuda_version")
    gpus = []
    for index, gpu in enumerate(root.findall("gpu")):
        memory = gpu.find("fb_memory_usage")  # the GPU's own, not a MIG slice's (nested deeper)
        gpus.append(
            GpuFacts(
                vendor="nvidia",
                index=index,
                name=_text(gpu, "product_name") or "NVIDIA GPU",
                vram_total=_mib(_text(memory, "total")),
                vram_free=_mib(_text(memory, "free")),
                driver_version=driver,
                cuda_version=cuda,
                pci_bus_id=gpu.get("id"),
                source="nvidia-smi",
            )
        )
    return gpus


def _str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def from_nvml(nvml: Any) -> list[GpuFacts]:
    """The GPUs as NVML reports them; ``nvml`` is the ``pynvml`` module (initialised by the caller)."""
    driver = _str(nvml.nvmlSystemGetDriverVersion())
    cuda_raw = int(nvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040
    cuda = f"{cuda_raw // 1000}.{cuda_raw % 1000 // 10}" if cuda_raw else None
    gpus = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            capability: str | None = f"{major}.{minor}"
        except nvml.NVMLError:
            capability = None
        gpus.append(
            GpuFacts(
                vendor="nvidia",
                index=index,
                name=_str(nvml.nvmlDeviceGetName(handle)),
                vram_total=int(memory.total),
                vram_free=int(memory.free),
                compute_capability=capability,
                driver_version=driver,
                cuda_version=cuda,
                pci_bus_id=_str(nvml.nvmlDeviceGetPciInfo(handle).busId),
                source="nvml",
            )
        )
    return gpus


def _nvml() -> tuple[list[GpuFacts] | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"NVML: {exc}"
    try:
        return from_nvml(pynvml), "NVML"
    finally:
        pynvml.nvmlShutdown()


def probe_nvidia() -> tuple[list[GpuFacts], str]:
    """The NVIDIA GPUs and how they were found; ``PlatformAbsentError`` where there is no NVIDIA driver."""
    gpus, why = _nvml()
    if gpus is not None:
        return gpus, "NVML"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise PlatformAbsentError(f"no NVIDIA driver ({why}; no nvidia-smi on PATH)")
    done = subprocess.run([smi, "-q", "-x"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stdout + done.stderr).strip().splitlines()
        raise RuntimeError(f"nvidia-smi failed (exit {done.returncode}): {message[-1] if message else ''}")
    return parse_nvidia_smi_xml(done.stdout), f"nvidia-smi ({why})"


class NvmlSampler:
    """Live load of the NVIDIA GPUs (utilisation, VRAM used), for ``/v1/appliance/hardware/live``.

    Start-up detection runs in a subprocess because a broken driver can hang; once the probe has
    answered, NVML is known to work on this machine, so the server samples it itself. Each sample
    still runs in a worker thread under a deadline (see the route): a call that does not answer in
    time turns the sampler off for good instead of piling threads up on a stuck driver.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self.disabled: str | None = None

    def sample(self) -> list[dict[str, Any]]:
        """One entry per GPU: index, name, utilization_percent, vram_used, vram_total (bytes)."""
        with self._lock:
            if self.disabled is not None:
                raise RuntimeError(self.disabled)
            if self._nvml is None:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            nvml = self._nvml
            loads = []
            for index in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    utilization: float | None = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nvml.NVMLError:  # MIG instances and some vGPUs do not report it
                    utilization = None
                loads.append(
                    {
                        "index": index,
                        "name": _str(nvml.nvmlDeviceGetName(handle)),
                        "utilization_percent": utilization,
                        "vram_used": int(memory.used),
                        "vram_total": int(memory.total),
                    }
                )
            return loads

    def disable(self, why: str) -> None:
        self.disabled = why
