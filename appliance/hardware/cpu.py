"""The CPU probe: model, cores, the instruction sets llama.cpp's kernels use, and usable memory.

On Linux everything comes from ``/proc`` and the cgroup files, so a container's CPU quota and
memory limit count (what a process may use, not what the host has); elsewhere from psutil, with
``sysctl`` on macOS and py-cpuinfo on Windows for the model name and instruction sets. The
parsers are pure functions of the files' text, tested on outputs recorded on real machines.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.hardware.facts import CpuFacts

# /proc/cpuinfo flag -> our name, in the order a report lists them
X86_FEATURES = {
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx_vnni": "avx_vnni",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}
ARM_FEATURES = {
    "asimd": "neon",
    "neon": "neon",  # 32-bit ARM kernels name it so
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
}
# macOS sysctl hw.optional.* -> our name
SYSCTL_FEATURES = {
    "hw.optional.neon": "neon",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
}
# ARM "CPU implementer" / "CPU part" -> core name (the common server and board cores)
ARM_CORES = {
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD8E): "Neoverse-N3",
    (0x41, 0xD84): "Neoverse-V3",
    (0x41, 0xD83): "Neoverse-V3AE",
    (0x41, 0xB76): "ARM1176",
    (0xC0, 0xAC3): "Ampere-1",
    (0xC0, 0xAC4): "Ampere-1a",
}
ARM_VENDORS = {0x41: "ARM", 0xC0: "Ampere", 0x61: "Apple", 0x48: "HiSilicon", 0x51: "Qualcomm", 0x4E: "NVIDIA"}
_NO_LIMIT = 1 << 60  # cgroup v1 writes a huge number for "no limit"


@dataclass
class CpuInfo:
    """What /proc/cpuinfo (or sysctl) says."""

    model: str | None = None
    physical_cores: int | None = None
    logical_cores: int | None = None
    features: list[str] = field(default_factory=list)


def _blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def _arm_model(block: dict[str, str]) -> str | None:
    try:
        implementer = int(block.get("cpu implementer", ""), 16)
        part = int(block.get("cpu part", ""), 16)
    except ValueError:
        return None
    core = ARM_CORES.get((implementer, part))
    vendor = ARM_VENDORS.get(implementer, f"implementer 0x{implementer:x}")
    return f"{vendor} {core}" if core else f"{vendor} CPU (part 0x{part:x})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """/proc/cpuinfo of an x86 or ARM Linux machine."""
    blocks = _blocks(text)
    processors = [b for b in blocks if b.get("processor", "").isdigit()]
    first = processors[0] if processors else next((b for b in blocks if "cpu implementer" in b), {})
    flags = set(first.get("flags", "").split())
    if flags:
        features = [name for flag, name in X86_FEATURES.items() if flag in flags]
    else:
        arm_flags = set(first.get("features", "").split())
        features = list(dict.fromkeys(name for flag, name in ARM_FEATURES.items() if flag in arm_flags))
    # x86 names its model; ARM gives ids (and old 32-bit kernels a "Processor" line)
    model = first.get("model name") or _arm_model(first)
    if not first.get("model name") and not first.get("processor", "0").isdigit():
        model = first["processor"]
    hardware = next((b["hardware"] for b in blocks if "hardware" in b), None)
    if hardware and not flags:  # the board's SoC: Raspberry Pi and other ARM boards
        model = f"{model} ({hardware})" if model else hardware
    logical = len(processors) or (1 if first else None)
    cores = {(b.get("physical id"), b.get("core id")) for b in processors if "core id" in b}
    # ARM cores have no SMT siblings (and cpuinfo no core ids): one logical CPU is one core
    physical = len(cores) or (logical if not flags else None)
    return CpuInfo(model=model, physical_cores=physical, logical_cores=logical, features=features)


def parse_sysctl(text: str) -> tuple[CpuInfo, int | None]:
    """``sysctl hw machdep.cpu`` output of a Mac (``key: value`` lines), and its RAM in bytes."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()

    def number(key: str) -> int | None:
        return int(values[key]) if values.get(key, "").isdigit() else None

    info = CpuInfo(
        model=values.get("machdep.cpu.brand_string"),
        physical_cores=number("hw.physicalcpu"),
        logical_cores=number("hw.logicalcpu"),
        features=[name for key, name in SYSCTL_FEATURES.items() if values.get(key) == "1"],
    )
    return info, number("hw.memsize")


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """MemTotal and MemAvailable of /proc/meminfo, in bytes."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values.get("MemTotal"), values.get("MemAvailable", values.get("MemFree"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text("utf-8", "replace")
    except OSError:
        return None


def _v1_file(root: Path, groups: dict[str, str], controller: str, name: str) -> str | None:
    """A cgroup v1 controller file: in this process's group, else at the controller's root
    (a container sees its own group as the root)."""
    base = root / "sys/fs/cgroup" / controller
    own = base / groups.get(controller, "/").lstrip("/") / name
    return _read(own) if own.exists() else _read(base / name)


def cgroup_limits(root: Path) -> tuple[float | None, int | None, int | None]:
    """(CPU quota in cores, memory limit, memory in use) of this process's cgroup, v2 or v1."""
    groups: dict[str, str] = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        for controller in controllers.split(",") if controllers else [""]:
            groups[controller] = path.strip() or "/"
    v2 = root / "sys/fs/cgroup" / groups.get("", "/").lstrip("/")
    cpu = mem = used = None
    if (raw := _read(v2 / "cpu.max")) is not None:  # v2: "max 100000" or "200000 100000"
        quota, period = [*raw.split(), "100000"][:2]
        cpu = int(quota) / int(period) if quota != "max" else None
    else:
        quota_raw = _v1_file(root, groups, "cpu", "cpu.cfs_quota_us")
        period_raw = _v1_file(root, groups, "cpu", "cpu.cfs_period_us")
        if quota_raw and period_raw and int(quota_raw) > 0:
            cpu = int(quota_raw) / int(period_raw)
    if (raw := _read(v2 / "memory.max")) is not None:
        mem = None if raw.strip() == "max" else int(raw)
        used_raw = _read(v2 / "memory.current")
    else:
        limit_raw = _v1_file(root, groups, "memory", "memory.limit_in_bytes")
        mem = int(limit_raw) if limit_raw and int(limit_raw) < _NO_LIMIT else None
        used_raw = _v1_file(root, groups, "memory", "memory.usage_in_bytes")
    if mem is not None and used_raw:
        used = int(used_raw)
    return cpu, mem, used


def _affinity() -> int | None:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return None


def _linux(root: Path) -> CpuFacts:
    info = parse_cpuinfo(_read(root / "proc/cpuinfo") or "")
    total, available = parse_meminfo(_read(root / "proc/meminfo") or "")
    quota, limit, used = cgroup_limits(root)
    if info.physical_cores is None:  # ARM, and VMs that hide the topology: psutil knows from sysfs
        import psutil

        info.physical_cores = psutil.cpu_count(logical=False) or info.logical_cores
    usable: float | None = _affinity() or info.logical_cores
    if quota is not None and usable is not None:
        usable = min(usable, quota)
    if limit is not None and available is not None:
        available = min(available, max(0, limit - (used or 0)))
    return CpuFacts(
        model=info.model,
        arch=platform.machine(),
        physical_cores=info.physical_cores,
        logical_cores=info.logical_cores,
        usable_cores=usable,
        features=tuple(info.features),
        ram_total=min(total, limit) if total and limit else total,
        ram_available=available,
        memory_limit=limit,
        source="/proc, cgroup",
    )


def psutil_facts() -> CpuFacts:
    """Cores and memory as psutil sees them, on any platform."""
    import psutil

    memory = psutil.virtual_memory()
    logical = psutil.cpu_count()
    return CpuFacts(
        arch=platform.machine(),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=logical,
        usable_cores=_affinity() or logical,
        ram_total=int(memory.total),
        ram_available=int(memory.available),
        source="psutil",
    )


def _other() -> CpuFacts:
    facts = psutil_facts()
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "hw", "machdep.cpu"], capture_output=True, text=True, check=False).stdout
        info = parse_sysctl(out)[0]
        return facts.model_copy(
            update={
                "model": info.model,
                "physical_cores": info.physical_cores or facts.physical_cores,
                "logical_cores": info.logical_cores or facts.logical_cores,
                "features": tuple(info.features),
                "source": "psutil, sysctl",
            }
        )
    import cpuinfo  # py-cpuinfo: the model name and flags on Windows

    details = cpuinfo.get_cpu_info()
    flags = set(details.get("flags", []))
    features = tuple(name for flag, name in X86_FEATURES.items() if flag.replace("_", "") in flags or flag in flags)
    return facts.model_copy(
        update={"model": details.get("brand_raw"), "features": features, "source": "psutil, py-cpuinfo"}
    )


def probe_cpu(root: Path = Path("/")) -> CpuFacts:
    """This machine's CPU and memory (``root`` points at a recorded file tree in tests)."""
    if (root / "proc/cpuinfo").exists():
        return _linux(root)
    return _other()
