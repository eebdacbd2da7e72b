"""The probes' parsers on outputs recorded on real machines (tests/data/hardware, sources in SOURCES.md)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.hardware.cpu import cgroup_limits, parse_cpuinfo, parse_meminfo, parse_sysctl, probe_cpu
from appliance.hardware.facts import GIB, MIB, GpuFacts, PlatformAbsentError
from appliance.hardware.metal import parse_displays
from appliance.hardware.nvidia import from_nvml, parse_nvidia_smi_xml
from appliance.hardware.rocm import gfx_target, merge_smi, parse_rocm_smi, read_topology

DATA = Path(__file__).parent / "data" / "hardware"
CI_MACHINE = DATA / "machines" / "epyc-2core-ci"


@pytest.mark.parametrize(
    ("name", "model", "physical", "logical", "has", "lacks"),
    [
        (
            "cpuinfo-epyc9754-lxc-2socket.txt",
            "AMD EPYC 9754 128-Core Processor",
            8,
            8,
            {"avx512f", "avx512_vnni"},
            {"amx"},
        ),
        (
            "cpuinfo-xeon6-6972p-graniterapids-rhel9.txt",
            "Intel(R) Xeon(R) 6972P",
            1,
            1,
            {"amx", "amx_int8", "avx_vnni"},
            set(),
        ),
        (
            "cpuinfo-xeon-gold-6326-vmware-8socket.txt",
            "Intel(R) Xeon(R) Gold 6326 CPU @ 2.90GHz",
            8,
            8,
            {"avx512f"},
            {"amx"},
        ),
        (
            "cpuinfo-core-i7-1065g7-icelake-fedora32.txt",
            "Intel(R) Core(TM) i7-1065G7 CPU @ 1.30GHz",
            1,
            1,
            {"avx2"},
            set(),
        ),
        ("cpuinfo-graviton2-t4g-small-al2023.txt", "ARM Neoverse-N1", 2, 2, {"neon", "dotprod"}, {"sve", "i8mm"}),
        ("cpuinfo-neoverse-v3ae-ubuntu24.04.txt", "ARM Neoverse-V3AE", 1, 1, {"sve", "sve2", "i8mm", "bf16"}, set()),
        ("cpuinfo-ampereone-ampere1a-ubuntu22.04.txt", "Ampere Ampere-1a", 1, 1, {"i8mm", "bf16"}, {"sve"}),
        ("cpuinfo-odroid-c2-aarch64.txt", "ARM Cortex-A53 (ODROID-C2)", 4, 4, {"neon"}, {"dotprod"}),
        ("cpuinfo-raspberrypi4-armv7-32bit.txt", "ARMv7 Processor rev 3 (v7l) (BCM2835)", 4, 4, {"neon"}, set()),
        (
            "cpuinfo-raspberrypi-model-b-armv6.txt",
            "ARMv6-compatible processor rev 7 (v6l) (BCM2708)",
            1,
            1,
            set(),
            {"neon"},
        ),
    ],
)
def test_cpuinfo_of_real_machines(
    name: str, model: str, physical: int, logical: int, has: set[str], lacks: set[str]
) -> None:
    info = parse_cpuinfo((DATA / "cpu" / name).read_text())
    assert (info.model, info.physical_cores, info.logical_cores) == (model, physical, logical)
    assert has <= set(info.features)
    assert not lacks & set(info.features)


def test_cpu_probe_on_the_recorded_ci_machine() -> None:
    """/proc and cgroup v1 files recorded on the 2-core CI box: no quota, no memory limit."""
    facts = probe_cpu(CI_MACHINE)
    assert facts.model == "AMD EPYC"
    assert (facts.physical_cores, facts.logical_cores) == (2, 2)
    assert {"avx", "avx2", "fma", "f16c"} <= set(facts.features) and "avx512f" not in facts.features
    total, available = parse_meminfo((CI_MACHINE / "proc/meminfo").read_text())
    assert facts.ram_total == total and total is not None and total > 20 * GIB
    assert facts.ram_available == available and facts.memory_limit is None
    assert cgroup_limits(CI_MACHINE) == (None, None, None)


def test_cgroup_v1_limits_in_the_process_group(tmp_path: Path) -> None:
    """The CI machine's tree with its memory group limited and a CPU quota set: both count."""
    root = tmp_path / "m"
    shutil.copytree(CI_MACHINE, root)
    group = root / "sys/fs/cgroup/memory/process_api/aa3cb1148d9f657ac836e04b5b1cee1b"
    (group / "memory.limit_in_bytes").write_text(f"{4 * GIB}\n")
    (root / "sys/fs/cgroup/cpu/cpu.cfs_quota_us").write_text("150000\n")
    quota, limit, used = cgroup_limits(root)
    assert quota == 1.5 and limit == 4 * GIB
    assert used == int((group / "memory.usage_in_bytes").read_text())
    facts = probe_cpu(root)
    assert facts.usable_cores == 1.5 and facts.memory_limit == 4 * GIB
    assert facts.ram_total == 4 * GIB and facts.ram_available is not None and facts.ram_available <= 4 * GIB


def test_cgroup_v2_limits(tmp_path: Path) -> None:
    """cgroup v2 files as the kernel documents them (Documentation/admin-guide/cgroup-v2.rst)."""
    group = tmp_path / "sys/fs/cgroup/system.slice/app.scope"
    group.mkdir(parents=True)
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/system.slice/app.scope\n")
    (group / "cpu.max").write_text("200000 100000\n")
    (group / "memory.max").write_text(f"{2 * GIB}\n")
    (group / "memory.current").write_text(f"{GIB // 2}\n")
    assert cgroup_limits(tmp_path) == (2.0, 2 * GIB, GIB // 2)
    (group / "cpu.max").write_text("max 100000\n")
    (group / "memory.max").write_text("max\n")
    assert cgroup_limits(tmp_path) == (None, None, None)


@pytest.mark.parametrize(
    ("name", "model", "cores", "memsize", "features"),
    [
        ("sysctl-m3max-sequoia.txt", "Apple M3 Max", 14, 36 * GIB, {"neon", "fp16", "dotprod", "i8mm", "bf16"}),
        ("sysctl-m4max-sequoia.txt", "Apple M4 Max", 16, 64 * GIB, {"neon", "fp16", "dotprod", "i8mm", "bf16", "sme"}),
    ],
)
def test_macos_sysctl(name: str, model: str, cores: int, memsize: int, features: set[str]) -> None:
    info, ram = parse_sysctl((DATA / "metal" / name).read_text())
    assert (info.model, info.physical_cores, ram) == (model, cores, memsize)
    assert set(info.features) == features


def test_macos_system_profiler_apple_gpu() -> None:
    (gpu,) = parse_displays((DATA / "metal" / "system_profiler-displays-m1.json").read_text(), 16 * GIB)
    assert (gpu.vendor, gpu.name, gpu.unified_memory, gpu.vram_total) == (
        "apple",
        "Apple M1 (7-core GPU)",
        True,
        16 * GIB,
    )


def test_nvidia_smi_single_gpu() -> None:
    (gpu,) = parse_nvidia_smi_xml((DATA / "nvidia" / "tesla-t4.xml").read_text())
    assert (gpu.name, gpu.vram_total, gpu.vram_free) == ("Tesla T4", 15360 * MIB, 13939 * MIB)
    assert (gpu.driver_version, gpu.cuda_version, gpu.pci_bus_id) == ("515.105.01", "11.7", "00000000:00:1E.0")
    assert gpu.source == "nvidia-smi"


def test_nvidia_smi_of_an_h200_recorded_on_the_lent_device() -> None:
    (gpu,) = parse_nvidia_smi_xml((DATA / "nvidia" / "h200-driver-580.xml").read_text())
    assert (gpu.name, gpu.driver_version, gpu.cuda_version, gpu.pci_bus_id) == (
        "NVIDIA H200",
        "580.159.04",
        "13.0",
        "00000000:00:06.0",
    )
    assert gpu.vram_total == 143_771 << 20  # NVML said 150,754,820,096 bytes on the same machine
    assert gpu.vram_free is not None and gpu.vram_free < gpu.vram_total


def test_nvidia_smi_two_gpus_on_an_old_driver_without_cuda_version() -> None:
    gpus = parse_nvidia_smi_xml((DATA / "nvidia" / "tesla-p100-x2-no-cuda-version.xml").read_text())
    assert [(g.index, g.vram_total, g.vram_free) for g in gpus] == [
        (0, 11567 * MIB, 167 * MIB),
        (1, 12290 * MIB, 490 * MIB),
    ]
    assert all(g.cuda_version is None and g.driver_version == "375.66" for g in gpus)


def test_nvidia_smi_mig_reads_the_gpus_own_memory_not_a_slice() -> None:
    (gpu,) = parse_nvidia_smi_xml((DATA / "nvidia" / "a100-sxm4-80gb-mig.xml").read_text())
    assert (gpu.name, gpu.vram_total, gpu.vram_free) == ("NVIDIA A100-SXM4-80GB", 81920 * MIB, 80999 * MIB)


def test_nvidia_smi_vgpu_with_many_na_values() -> None:
    (gpu,) = parse_nvidia_smi_xml((DATA / "nvidia" / "grid-p4-1q-vgpu-windows.xml").read_text())
    assert (gpu.name, gpu.vram_total, gpu.vram_free, gpu.cuda_version) == ("GRID P4-1Q", 1024 * MIB, 106 * MIB, "11.6")


class FakeNvml:
    """NVML's Python API (pynvml) answering with the T4 machine's recorded values."""

    NVMLError = RuntimeError

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802 - NVML's names
        return "515.105.01"

    def nvmlSystemGetCudaDriverVersion(self) -> int:  # noqa: N802
        return 11070

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        return b"Tesla T4"  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(total=15360 * MIB, free=13939 * MIB, used=1032 * MIB)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return (7, 5)

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(busId="00000000:00:1E.0")


def test_nvml_gives_what_nvidia_smi_gives_and_the_compute_capability() -> None:
    (nvml,) = from_nvml(FakeNvml())
    (smi,) = parse_nvidia_smi_xml((DATA / "nvidia" / "tesla-t4.xml").read_text())
    same = ("name", "vram_total", "vram_free", "driver_version", "cuda_version", "pci_bus_id")
    assert {k: getattr(nvml, k) for k in same} == {k: getattr(smi, k) for k in same}
    assert nvml.compute_capability == "7.5" and nvml.source == "nvml"


@pytest.mark.parametrize(
    ("version", "name"),
    [(90010, "gfx90a"), (90402, "gfx942"), (110000, "gfx1100"), (110003, "gfx1103"), (90008, "gfx908")],
)
def test_gfx_target_names(version: int, name: str) -> None:
    assert gfx_target(version) == name


def test_rocm_topology_of_an_eight_mi210_server() -> None:
    """Two CPU nodes (no SIMDs) are skipped; the 8 GPUs keep ROCm's node order."""
    gpus = read_topology(DATA / "rocm" / "mi210-x8-dual-epyc")
    assert [node for node, _ in gpus] == list(range(2, 10))
    assert {g.gfx_target for _, g in gpus} == {"gfx90a"} and [g.index for _, g in gpus] == list(range(8))


def test_rocm_partitioned_mi308x_counts_every_partition() -> None:
    """In CPX mode each MI308X is 4 compute partitions; HIP sees (and llama.cpp uses) 32 devices."""
    gpus = read_topology(DATA / "rocm" / "mi308x-x8-cpx")
    assert len(gpus) == 32 and {g.gfx_target for _, g in gpus} == {"gfx942"}


def test_rocm_old_kernel_without_gfx_version_takes_vram_from_memory_banks() -> None:
    ((node, gpu),) = read_topology(DATA / "rocm" / "vega10-mi25-k8s-capture")
    assert node == 1 and gpu.gfx_target is None
    assert gpu.vram_total == 17163091968 and gpu.name == "AMD GPU (device 0x6860)"


def test_rocm_apu_node() -> None:
    ((_, gpu),) = read_topology(DATA / "rocm" / "phoenix-780m-gpu-node-only")
    assert gpu.gfx_target == "gfx1103"


def test_rocm_smi_names_and_vram_matched_by_node() -> None:
    cards = parse_rocm_smi(
        (DATA / "rocm" / "rx7900xt-rocm-smi" / "rocm-smi-showproductname-showuse-showmeminfo-vram.json").read_text()
    )
    assert [(c.node, c.name, c.vram_total, c.vram_used) for c in cards] == [
        (1, "Radeon RX 7900 XT", 21458059264, 27856896)
    ]
    (mi250x,) = parse_rocm_smi((DATA / "rocm" / "mi250x-rocm-smi" / "rocm-smi-showproductname.json").read_text())
    assert (mi250x.node, mi250x.name, mi250x.vram_total) == (7, "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2", None)
    # the 7900 XT's KFD node 1, as read_topology gives a node whose sysfs has no VRAM figure
    node = GpuFacts(
        vendor="amd", index=0, name="AMD GPU (gfx1100, device 0x744c)", gfx_target="gfx1100", source="sysfs"
    )
    (merged,) = merge_smi([(1, node)], cards)
    assert merged.name == "Radeon RX 7900 XT" and merged.vram_total == 21458059264
    assert merged.vram_free == 21458059264 - 27856896 and merged.source.endswith("rocm-smi")


def test_no_rocm_driver_is_absent_not_failed(tmp_path: Path) -> None:
    with pytest.raises(PlatformAbsentError):
        read_topology(tmp_path)
