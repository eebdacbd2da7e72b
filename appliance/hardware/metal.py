"""The Apple Metal probe (macOS): the GPUs ``system_profiler`` lists, and whether memory is unified.

On Apple silicon the GPU shares the machine's RAM; how much of it Metal lets one process use
(its "recommended working set") is what llama.cpp's Metal device reports, so the planner takes
the memory figure from the engine. This probe names the GPU and its cores for the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from appliance.hardware.facts import GpuFacts, PlatformAbsentError

_VENDORS = {"apple": "apple", "amd": "amd", "ati": "amd", "intel": "intel", "nvidia": "nvidia"}
_UNITS = {"MB": 1 << 20, "GB": 1 << 30}


def _vram(text: str | None) -> int | None:
    parts = (text or "").split()
    if len(parts) == 2 and parts[0].isdigit() and parts[1] in _UNITS:
        return int(parts[0]) * _UNITS[parts[1]]
    return None


def parse_displays(text: str, memsize: int | None) -> list[GpuFacts]:
    """``system_profiler SPDisplaysDataType -json`` output; ``memsize`` is ``hw.memsize``."""
    data: Any = json.loads(text)
    gpus: list[GpuFacts] = []
    for item in data.get("SPDisplaysDataType", []):
        if item.get("sppci_device_type", "spdisplays_gpu") != "spdisplays_gpu":
            continue
        vendor_raw = str(item.get("spdisplays_vendor", "")).lower()
        vendor = next((v for k, v in _VENDORS.items() if k in vendor_raw), "apple")
        vram = _vram(item.get("spdisplays_vram") or item.get("spdisplays_vram_shared"))
        unified = vendor == "apple" or vram is None
        cores = item.get("sppci_cores")
        name = str(item.get("sppci_model") or item.get("_name") or "GPU")
        gpus.append(
            GpuFacts(
                vendor=vendor,
                index=len(gpus),
                name=f"{name} ({cores}-core GPU)" if cores else name,
                vram_total=memsize if unified else vram,
                unified_memory=unified,
                source="system_profiler",
            )
        )
    return gpus


def probe_metal() -> tuple[list[GpuFacts], str]:
    if sys.platform != "darwin":
        raise PlatformAbsentError("not macOS")
    memsize_raw = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=False).stdout
    displays = subprocess.run(
        ["system_profiler", "SPDisplaysDataType", "-json"], capture_output=True, text=True, check=False
    ).stdout
    memsize = int(memsize_raw) if memsize_raw.strip().isdigit() else None
    gpus = parse_displays(displays, memsize)
    if not gpus:
        raise PlatformAbsentError("system_profiler lists no GPU")
    return gpus, "system_profiler"
