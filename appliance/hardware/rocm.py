"""The AMD ROCm probe: each GPU's gfx target, VRAM and name, from the amdgpu driver's sysfs files.

The KFD topology (``/sys/class/kfd/kfd/topology/nodes/N/properties``) lists what ROCm can compute
on: GPU nodes have SIMDs, CPU nodes none. VRAM comes from the DRM card that node renders through
(``mem_info_vram_total``/``_used``), else from the node's memory banks. ``amd-smi`` or
``rocm-smi``, when installed, add the marketing name. ``root`` points at a recorded tree in tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.hardware.facts import GpuFacts, PlatformAbsentError

TOPOLOGY = "sys/class/kfd/kfd/topology/nodes"
AMD_VENDOR_ID = 0x1002
_VRAM_HEAPS = {1, 2}  # HSA_HEAPTYPE_FRAME_BUFFER_PUBLIC / _PRIVATE


def parse_properties(text: str) -> dict[str, int]:
    """A KFD ``properties`` file: ``name value`` lines of integers."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def gfx_target(version: int) -> str:
    """``gfx_target_version`` to LLVM's target name: 90010 -> gfx90a, 110000 -> gfx1100, 90402 -> gfx942.

    The number is major * 10000 + minor * 100 + stepping; the name writes minor and stepping in hex.
    """
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    return f"gfx{major}{minor:x}{stepping:x}"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _drm_device(root: Path, props: dict[str, int]) -> Path | None:
    """The DRM device directory of a KFD node: by its render node, else by its unique id."""
    minor = props.get("drm_render_minor")
    if minor is not None:
        device = root / f"sys/class/drm/renderD{minor}/device"
        if device.exists():
            return device
    unique = props.get("unique_id")
    for card in sorted((root / "sys/class/drm").glob("card*/device")):
        if unique is not None and _read_int(card / "unique_id") == unique:
            return card
    return None


def _bank_vram(node: Path) -> int | None:
    total = 0
    for bank in sorted(node.glob("mem_banks/*/properties")):
        props = parse_properties(bank.read_text())
        if props.get("heap_type") in _VRAM_HEAPS:
            total += props.get("size_in_bytes", 0)
    return total or None


def _node_key(path: Path) -> int:
    return int(path.name) if path.name.isdigit() else 1 << 30


def read_topology(root: Path) -> list[tuple[int, GpuFacts]]:
    """The GPU nodes of a KFD topology tree with their node ids, in ROCm's device order."""
    nodes = root / TOPOLOGY
    if not nodes.is_dir():
        raise PlatformAbsentError("no AMD ROCm driver (no /sys/class/kfd)")
    gpus: list[tuple[int, GpuFacts]] = []
    for node in sorted(nodes.iterdir(), key=_node_key):
        try:
            props = parse_properties((node / "properties").read_text())
        except OSError:
            continue
        if props.get("simd_count", 0) == 0 or props.get("vendor_id", AMD_VENDOR_ID) != AMD_VENDOR_ID:
            continue  # a CPU node
        version = props.get("gfx_target_version", 0)
        target = gfx_target(version) if version else None  # kernels before 5.x do not say
        device = _drm_device(root, props)
        total = used = None
        if device is not None:
            total = _read_int(device / "mem_info_vram_total")
            used = _read_int(device / "mem_info_vram_used")
        total = total or _bank_vram(node) or props.get("local_mem_size") or None
        label = f"{target}, " if target else ""
        gpu = GpuFacts(
            vendor="amd",
            index=len(gpus),
            name=f"AMD GPU ({label}device 0x{props.get('device_id', 0):04x})",
            vram_total=total,
            vram_free=total - used if total is not None and used is not None else None,
            unified_memory=props.get("cpu_cores_count", 0) > 0,  # an APU's node has both
            gfx_target=target,
            source="sysfs" if device is not None else "sysfs (kfd only)",
        )
        gpus.append((_node_key(node), gpu))
    return gpus


@dataclass(frozen=True)
class SmiCard:
    node: int | None
    name: str | None
    vram_total: int | None
    vram_used: int | None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else None


def parse_rocm_smi(text: str) -> list[SmiCard]:
    """``rocm-smi --showproductname [--showmeminfo vram] --json`` output, in card order."""
    data: Any = json.loads(text)
    cards = []
    for key in sorted((k for k in data if k.startswith("card")), key=lambda k: int(k[4:] or 0)):
        card = data[key]
        cards.append(
            SmiCard(
                node=_int(card.get("Node ID")),
                name=card.get("Card Series") or card.get("Card series") or None,
                vram_total=_int(card.get("VRAM Total Memory (B)")),
                vram_used=_int(card.get("VRAM Total Used Memory (B)")),
            )
        )
    return cards


def merge_smi(gpus: list[tuple[int, GpuFacts]], cards: list[SmiCard]) -> list[GpuFacts]:
    """Names (and VRAM where sysfs lacked it) from rocm-smi, matched by KFD node id, else by order."""
    by_node = {c.node: c for c in cards if c.node is not None}
    merged = []
    for position, (node, gpu) in enumerate(gpus):
        card = by_node.get(node) or (cards[position] if not by_node and position < len(cards) else None)
        if card is None:
            merged.append(gpu)
            continue
        update: dict[str, Any] = {"source": gpu.source + " + rocm-smi"}
        if card.name:
            update["name"] = card.name
        if gpu.vram_total is None and card.vram_total:
            update["vram_total"] = card.vram_total
            if card.vram_used is not None:
                update["vram_free"] = card.vram_total - card.vram_used
        merged.append(gpu.model_copy(update=update))
    return merged


def _rocm_smi() -> list[SmiCard]:
    exe = shutil.which("rocm-smi")
    if exe is None:
        return []
    command = [exe, "--showproductname", "--showmeminfo", "vram", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        return parse_rocm_smi(done.stdout) if done.returncode == 0 else []
    except (ValueError, AttributeError, TypeError):
        return []


def probe_rocm(root: Path = Path("/")) -> tuple[list[GpuFacts], str]:
    found = read_topology(root)
    if not found:
        raise PlatformAbsentError("the ROCm driver is loaded but lists no GPU")
    cards = _rocm_smi() if root == Path("/") else []
    return merge_smi(found, cards), "sysfs" + (" + rocm-smi" if cards else "")
