"""The planner as a pure function, across a table of machines.

Machine facts come from outputs recorded on real machines (tests/data/hardware): the CI box's
/proc and its engines probe, nvidia-smi of a T4, an A100 and two P100s, the KFD topology of an
MI210 server. A GPU build's device list cannot be recorded on this CPU-only box, so it is written
as llama.cpp's registry reports it (``CUDA0`` with the GPU's name and free memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.hardware.cpu import probe_cpu
from appliance.hardware.facts import GIB, MIB, CpuFacts, GpuFacts, HardwareFacts, ProbeOutcome
from appliance.hardware.nvidia import parse_nvidia_smi_xml
from appliance.hardware.planner import (
    ModelPlan,
    ModelRequest,
    Overrides,
    compute_bytes,
    gpu_headroom,
    hardware_advice,
    plan_addition,
    plan_models,
)
from appliance.hardware.probe import MARKER
from appliance.hardware.rocm import read_topology
from engines.base import BackendDevice, EngineCapabilities, ModelShape
from engines.ggufmeta import model_shape

DATA = Path(__file__).parent / "data" / "hardware"
CI = DATA / "machines" / "epyc-2core-ci"

# Llama-3-8B-Instruct Q4_K_M as its GGUF header states it (sizes rounded to the MB)
LLAMA3_8B = ModelShape(
    architecture="llama",
    n_layer=32,
    n_embd=4096,
    n_vocab=128256,
    n_ctx_train=8192,
    layer_bytes=(131_000_000,) * 32,
    output_bytes=431_000_000,
    tied_output=False,
    input_bytes=295_000_000,
    kv_bytes_per_token=(4096,) * 32,
    file_bytes=4_920_000_000,
)


def ci_cpu() -> CpuFacts:
    return probe_cpu(CI)


def cpu_build() -> EngineCapabilities:
    """The engines probe's real output on the CI machine: llama.cpp built for the CPU only."""
    line = (CI / "engines-probe.out").read_text().strip()
    gguf = json.loads(line.removeprefix(MARKER))["data"][0]
    gguf["devices"] = tuple(BackendDevice(**d) for d in gguf["devices"])
    gguf["backends"] = tuple(gguf["backends"])
    return EngineCapabilities(**gguf)


def gpu_build(*gpus: tuple[str, str, int, int]) -> EngineCapabilities:
    """A GPU build's devices: (name, backend, free, total) each, after the CPU."""
    devices = [BackendDevice("CPU", "CPU", "cpu", "AMD EPYC")]
    devices += [BackendDevice(n, b, "gpu", f"{b} GPU {n}", free, total) for n, b, free, total in gpus]
    backends = tuple(dict.fromkeys(d.backend for d in devices))
    return EngineCapabilities("gguf", "llama-cpp-python 0.3.36", True, True, backends, tuple(devices))


def machine(
    caps: EngineCapabilities | None, gpus: tuple[GpuFacts, ...] = (), cpu: CpuFacts | None = None, **probes: str
) -> HardwareFacts:
    outcomes = tuple(ProbeOutcome(name=n, status=s) for n, s in probes.items())  # type: ignore[arg-type]
    return HardwareFacts(cpu=cpu or ci_cpu(), gpus=gpus, engines=(caps,) if caps else (), probes=outcomes)


def nvidia(name: str) -> tuple[GpuFacts, ...]:
    return tuple(parse_nvidia_smi_xml((DATA / "nvidia" / name).read_text()))


def plan(hw: HardwareFacts, shape: ModelShape, overrides: Overrides | None = None) -> ModelPlan:
    (result,) = plan_models(hw, [ModelRequest("m", "gguf", shape, overrides or Overrides())])
    return result


@pytest.fixture(scope="module")
def smollm2(default_model_path: Path) -> ModelShape:
    return model_shape(default_model_path)


def test_no_gpu_plans_the_cpu_with_physical_cores(smollm2: ModelShape) -> None:
    p = plan(machine(cpu_build()), smollm2)
    assert (p.device.value, p.gpu_layers.value, p.gpu_devices) == ("cpu", 0, ())
    assert p.device.reason == "no GPU found"
    assert (p.threads.value, p.slots.value, p.ctx_size.value, p.batch_size.value) == (2, 16, 4096, 512)
    assert p.threads.reason == "2 physical cores" and not p.advice and p.error is None
    assert p.slots.reason.startswith("16: their KV cache takes at most a quarter of the free RAM")
    (ram,) = p.memory
    assert ram.pool == "RAM" and ram.kv_cache == 16 * 4096 * 30 * 768  # llama.cpp: 1440 MiB
    assert ram.weights == smollm2.file_bytes and ram.compute == compute_bytes(smollm2, 512)


def test_a_small_machine_keeps_8_cpu_slots_and_the_full_context(smollm2: ModelShape) -> None:
    small = ci_cpu().model_copy(update={"ram_total": 4 * GIB, "ram_available": 4 * GIB})
    p = plan(machine(cpu_build(), cpu=small), smollm2)  # 16 x 4096 tokens would take 1.4 of its 4 GiB
    assert (p.slots.value, p.ctx_size.value) == (8, 4096) and not p.advice


def test_big_gpu_takes_every_layer(smollm2: ModelShape) -> None:
    (a100,) = nvidia("a100-sxm4-80gb-mig.xml")
    caps = gpu_build(("CUDA0", "CUDA", a100.vram_free or 0, a100.vram_total or 0))
    p = plan(machine(caps, (a100,)), LLAMA3_8B)
    assert (p.device.value, p.gpu_layers.value, p.n_layers, p.gpu_devices) == ("cuda", 33, 33, ("CUDA0",))
    assert p.gpu_layers.reason.startswith("all 33: weights, KV cache and compute")
    assert p.slots.value == 16 and p.ctx_size.value == 4096 and p.tensor_split == ()
    gpu, ram = p.memory
    assert gpu.pool == "CUDA0" and gpu.weights == 32 * 131_000_000 + 431_000_000
    assert gpu.kv_cache == 16 * 4096 * 32 * 4096  # 8 GiB: 16 slots x 4096 tokens
    assert ram.weights == LLAMA3_8B.file_bytes - gpu.weights and ram.kv_cache == 0
    assert "preferred" not in p.device.reason and "CUDA0" in p.device.reason


def test_small_gpu_keeps_every_layer_with_a_shorter_context(smollm2: ModelShape) -> None:
    """A T4 with 13.6 GiB free holds the 8B's weights but not 24 x 4096 tokens of KV cache beside them."""
    (t4,) = nvidia("tesla-t4.xml")
    caps = gpu_build(("CUDA0", "CUDA", t4.vram_free or 0, t4.vram_total or 0))
    p = plan(machine(caps, (t4,)), LLAMA3_8B, Overrides(slots=24))
    assert p.gpu_layers.value == 33 and p.device.value == "cuda"
    assert 2048 <= p.ctx_size.value < 4096 and p.ctx_size.value % 256 == 0
    assert p.ctx_size.reason.startswith("reduced to keep all layers on CUDA0")
    assert any("context reduced from 4096" in a.message for a in p.advice)
    pool = (t4.vram_free or 0) - gpu_headroom(t4.vram_total)
    assert p.memory[0].total <= pool


def test_small_gpu_partial_offload() -> None:
    """4 GiB free: even 2048 tokens per slot cannot keep all 33 layers there; the last ones go."""
    caps = gpu_build(("CUDA0", "CUDA", 4 * GIB, 6 * GIB))
    p = plan(machine(caps), LLAMA3_8B, Overrides(slots=4))
    assert p.device.value == "cuda" and 0 < p.gpu_layers.value < 32
    assert p.gpu_layers.reason.startswith(f"{p.gpu_layers.value} of 33: as many as fit")
    assert p.ctx_size.value == 4096 and any(a.message.startswith("partial offload") for a in p.advice)
    gpu, ram = p.memory
    assert gpu.total <= 4 * GIB - gpu_headroom(6 * GIB)
    cpu_layers = 32 - p.gpu_layers.value
    assert ram.kv_cache == cpu_layers * 4096 * 4 * 4096 and gpu.kv_cache == p.gpu_layers.value * 4096 * 4 * 4096


def test_gpu_with_too_little_free_memory_falls_back_to_the_cpu_with_a_warning(smollm2: ModelShape) -> None:
    (vgpu,) = nvidia("grid-p4-1q-vgpu-windows.xml")  # 106 MiB free
    caps = gpu_build(("CUDA0", "CUDA", vgpu.vram_free or 0, vgpu.vram_total or 0))
    p = plan(machine(caps, (vgpu,)), smollm2)
    assert (p.device.value, p.gpu_layers.value, p.gpu_devices, p.slots.value) == ("cpu", 0, (), 16)
    assert p.device.reason.startswith("not one layer fits")
    assert any("the model runs on the CPU" in a.message for a in p.advice)


def test_two_gpus_split_in_proportion_to_free_memory() -> None:
    p100s = nvidia("tesla-p100-x2-no-cuda-version.xml")
    caps = gpu_build(("CUDA0", "CUDA", 11 * GIB, 12 * GIB), ("CUDA1", "CUDA", 5 * GIB, 12 * GIB))
    p = plan(machine(caps, p100s), LLAMA3_8B)
    assert p.gpu_devices == ("CUDA0", "CUDA1") and p.gpu_layers.value == 33
    share0 = 11 * GIB - gpu_headroom(12 * GIB)
    share1 = 5 * GIB - gpu_headroom(12 * GIB)
    assert p.tensor_split == (round(share0 / (share0 + share1), 4), round(share1 / (share0 + share1), 4))
    assert p.main_gpu == 0 and "split over 2 GPUs" in p.gpu_layers.reason
    assert [m.pool for m in p.memory] == ["CUDA0", "CUDA1", "RAM"]
    assert all(m.total <= s for m, s in zip(p.memory, (share0, share1), strict=False))


def test_amd_gpus_use_rocm() -> None:
    mi210s = tuple(g for _, g in read_topology(DATA / "rocm" / "mi210-x8-dual-epyc"))
    caps = gpu_build(*((f"ROCm{i}", "ROCm", 63 * GIB, 64 * GIB) for i in range(8)))
    p = plan(machine(caps, mi210s), LLAMA3_8B)
    assert p.device.value == "rocm" and p.device.reason.startswith("ROCm: ROCm0")
    assert len(p.gpu_devices) == 8 and p.gpu_layers.value == 33 and sum(p.tensor_split) == pytest.approx(1, abs=1e-3)


def test_cuda_is_preferred_over_vulkan_when_the_build_has_both() -> None:
    caps = gpu_build(("Vulkan0", "Vulkan", 20 * GIB, 24 * GIB), ("CUDA0", "CUDA", 20 * GIB, 24 * GIB))
    p = plan(machine(caps), LLAMA3_8B)
    assert p.gpu_devices == ("CUDA0",) and "preferred over Vulkan" in p.device.reason


def test_nvidia_gpu_with_a_cpu_only_build_says_how_to_install_the_cuda_build(smollm2: ModelShape) -> None:
    hw = machine(cpu_build(), nvidia("tesla-t4.xml"))
    p = plan(hw, smollm2)
    assert p.device.value == "cpu" and "not usable by this llama.cpp build" in p.device.reason
    (advice,) = hardware_advice(hw)
    assert advice.message == "NVIDIA GPU found (Tesla T4) but this llama.cpp build has no CUDA: models run on the CPU"
    assert advice.fix == (
        'install the CUDA build: CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
        "llama-cpp-python==0.3.36"
    )


def test_cuda_build_whose_backend_finds_no_device_points_at_the_driver(smollm2: ModelShape) -> None:
    """The CUDA build on a machine where the driver is too old for its runtime: CUDA registers, no device."""
    caps = gpu_build()
    caps = EngineCapabilities(**{**caps.__dict__, "backends": ("CPU", "CUDA")})
    hw = machine(caps, nvidia("tesla-p100-x2-no-cuda-version.xml"))
    assert plan(hw, smollm2).device.value == "cpu"
    (advice,) = hardware_advice(hw)
    assert "but llama.cpp's CUDA backend sees no device" in advice.message
    assert advice.fix is not None and advice.fix.startswith("check that the driver works")


def test_amd_gpu_with_a_cpu_only_build_names_its_gfx_target() -> None:
    mi210s = tuple(g for _, g in read_topology(DATA / "rocm" / "mi210-x8-dual-epyc"))
    (advice,) = hardware_advice(machine(cpu_build(), mi210s))
    assert "AMD GPU found" in advice.message and advice.fix is not None
    assert 'CMAKE_ARGS="-DGGML_HIP=on -DGPU_TARGETS=gfx90a"' in advice.fix


def test_low_ram_reduces_the_context_with_a_warning(smollm2: ModelShape) -> None:
    cpu = ci_cpu().model_copy(update={"ram_available": GIB})
    p = plan(machine(cpu_build(), cpu=cpu), smollm2)
    room = GIB - 512 * MIB - smollm2.file_bytes - compute_bytes(smollm2, 512)
    assert p.ctx_size.value == room // (8 * 30 * 768) // 256 * 256  # 1792 tokens per slot
    assert p.ctx_size.reason == "reduced to fit the RAM (4096 asked)" and p.slots.value == 8
    (warning,) = p.advice
    assert warning.level == "warning" and "context reduced to 8 slots x 1792 tokens (from 8 x 4096)" in warning.message


def test_very_low_ram_then_reduces_slots_and_finally_warns(smollm2: ModelShape) -> None:
    cpu = ci_cpu().model_copy(update={"ram_available": 512 * MIB + 220 * MIB})
    p = plan(machine(cpu_build(), cpu=cpu), smollm2, Overrides(ctx_size=4096))
    assert p.ctx_size.value == 4096 and p.ctx_size.source == "--ctx-size"  # the user's context is kept
    assert p.slots.value < 8 and p.slots.reason == "reduced to fit the RAM"
    tiny = ci_cpu().model_copy(update={"ram_available": 600 * MIB})
    q = plan(machine(cpu_build(), cpu=tiny), smollm2, Overrides(ctx_size=4096, slots=8))
    assert (q.slots.value, q.ctx_size.value) == (8, 4096)
    assert any("expect swapping or an out-of-memory kill" in a.message for a in q.advice)


def test_overrides_win_and_are_shown_as_such() -> None:
    (a100,) = nvidia("a100-sxm4-80gb-mig.xml")
    caps = gpu_build(("CUDA0", "CUDA", a100.vram_free or 0, a100.vram_total or 0))
    hw = machine(caps, (a100,))
    cpu = plan(hw, LLAMA3_8B, Overrides(device="cpu"))
    assert (cpu.device.value, cpu.device.source, cpu.gpu_layers.value, cpu.slots.value) == ("cpu", "--device", 0, 8)
    some = plan(hw, LLAMA3_8B, Overrides(gpu_layers=10, threads=1, slots=3, batch_size=256))
    assert (some.gpu_layers.value, some.gpu_layers.source) == (10, "--gpu-layers")
    assert (some.threads.value, some.slots.value, some.batch_size.value) == (1, 3, 256)
    assert all(d.overridden for d in (some.gpu_layers, some.threads, some.slots, some.batch_size))
    assert some.memory[0].weights == 10 * 131_000_000  # the last 10 layers, not the output layer
    everything = plan(hw, LLAMA3_8B, Overrides(gpu_layers=-1, sources={"gpu_layers": "models.toml (m.gpu_layers)"}))
    assert everything.gpu_layers.value == 33 and everything.gpu_layers.source == "models.toml (m.gpu_layers)"
    off = plan(hw, LLAMA3_8B, Overrides(gpu_layers=0))
    assert off.device.value == "cpu" and off.device.reason == "--gpu-layers 0"


def test_too_many_gpu_layers_asked_is_kept_with_a_warning() -> None:
    caps = gpu_build(("CUDA0", "CUDA", 4 * GIB, 6 * GIB))
    p = plan(machine(caps), LLAMA3_8B, Overrides(gpu_layers=-1))
    assert p.gpu_layers.value == 33
    assert any("may not fit" in a.message for a in p.advice)


def test_threads_beyond_the_usable_cores_warn() -> None:
    p = plan(machine(cpu_build()), LLAMA3_8B, Overrides(threads=8))
    assert p.threads.value == 8 and any("more than the 2 usable cores" in a.message for a in p.advice)


def test_container_cpu_quota_caps_the_threads(smollm2: ModelShape) -> None:
    cpu = CpuFacts(physical_cores=16, logical_cores=32, usable_cores=4.0, ram_available=64 * GIB)
    p = plan(machine(cpu_build(), cpu=cpu), smollm2)
    assert p.threads.value == 4 and "4 usable by this process" in p.threads.reason


def test_asking_for_a_device_the_build_lacks_is_an_error(smollm2: ModelShape) -> None:
    p = plan(machine(cpu_build(), nvidia("tesla-t4.xml")), smollm2, Overrides(device="cuda"))
    assert p.error is not None and p.error.startswith("--device cuda: this llama.cpp build has no CUDA; install it:")
    q = plan(machine(cpu_build()), smollm2, Overrides(device="rocm"))
    assert q.error == "--device rocm: no ROCm GPU usable here"


def test_engine_probe_that_hung_means_cpu_and_says_so(smollm2: ModelShape) -> None:
    hw = machine(None, nvidia("tesla-t4.xml"), engines="timeout")
    p = plan(hw, smollm2)
    assert p.device.value == "cpu" and p.device.reason == "the engine probe did not answer, so GPU offload is off"
    assert any(
        "the engines probe timeout" in a.message and "GPU offload is off" in a.message for a in hardware_advice(hw)
    )


def test_two_models_share_the_gpu() -> None:
    caps = gpu_build(("CUDA0", "CUDA", 8 * GIB, 10 * GIB))
    first, second = plan_models(
        machine(caps),
        [
            ModelRequest("a", "gguf", LLAMA3_8B, Overrides(slots=2)),
            ModelRequest("b", "gguf", LLAMA3_8B, Overrides(slots=2)),
        ],
    )
    assert first.gpu_layers.value == 33
    assert second.gpu_layers.value < 33  # what is left after the first one


def test_metal_unified_memory() -> None:
    cpu = CpuFacts(
        model="Apple M3 Max", physical_cores=14, logical_cores=14, ram_total=36 * GIB, ram_available=20 * GIB
    )
    caps = gpu_build(("MTL0", "Metal", 27 * GIB, 27 * GIB))
    p = plan(machine(caps, cpu=cpu), LLAMA3_8B)
    assert p.device.value == "metal" and p.gpu_layers.value == 33 and not p.advice


def test_unknown_model_file_is_an_error_not_a_crash() -> None:
    (p,) = plan_models(machine(cpu_build()), [ModelRequest("gone", "gguf", None, problem="the file does not exist")])
    assert p.error == "the file does not exist" and p.memory == ()


def onnx_runtime(*providers: str) -> EngineCapabilities:
    return EngineCapabilities(
        "onnx", "onnxruntime 1.32.0", True, "CUDAExecutionProvider" in providers, providers=providers
    )


def onnx_plan(hw: HardwareFacts, shape: ModelShape, device: str = "auto") -> ModelPlan:
    return plan_models(hw, [ModelRequest("m-onnx", "onnx", shape, Overrides(device=device))])[0]  # type: ignore[arg-type]


def test_onnx_models_run_on_the_cpu_and_say_why(onnx_model_dir: Path) -> None:
    from engines.formats import model_shape as any_shape

    shape = any_shape(onnx_model_dir, "onnx")
    assert shape.n_layer == 30 and shape.kv_bytes_per_token == (2 * 3 * 64 * 4,) * 30
    cpu_only = onnx_plan(machine(onnx_runtime("CPUExecutionProvider")), shape)
    assert cpu_only.device.value == "cpu" and cpu_only.error is None
    assert "runs on the CPU" in cpu_only.device.reason
    # a T4 with the CPU onnxruntime: the GGUF engine is the way onto it
    no_cuda = onnx_plan(machine(onnx_runtime("CPUExecutionProvider"), nvidia("tesla-t4.xml")), shape)
    assert "serve the GGUF model" in no_cuda.device.reason
    assert onnx_plan(machine(None), shape, device="cuda").error is not None
    # onnxruntime-gpu sees CUDA: the engine still runs on the CPU, and says so
    gpu_ort = machine(onnx_runtime("CUDAExecutionProvider", "CPUExecutionProvider"), nvidia("tesla-t4.xml"))
    assert onnx_plan(gpu_ort, shape).device.value == "cpu"
    assert "host memory" in onnx_plan(gpu_ort, shape).device.reason
    forced = onnx_plan(gpu_ort, shape, device="cuda")
    assert forced.error is not None and "serve the GGUF model for GPU offload" in forced.error


def test_a_model_loaded_on_demand_is_planned_beside_the_loaded_ones(smollm2: ModelShape) -> None:
    """What the loaded models booked is not free; a second model that fits gets a plan without error."""
    hw = machine(cpu_build(), cpu=ci_cpu().model_copy(update={"ram_available": 8 * GIB}))
    first = plan(hw, smollm2)
    second = plan_addition(hw, [first], ModelRequest("second", "gguf", smollm2, Overrides()))
    assert second.error is None
    (ram,) = second.memory
    assert ram.available == 8 * GIB - first.memory[0].total


def test_a_model_that_would_not_fit_is_refused_not_overcommitted(smollm2: ModelShape) -> None:
    """At start-up an overcommitted plan is a warning; loaded on demand, it is refused with the figures."""
    hw = machine(cpu_build(), cpu=ci_cpu().model_copy(update={"ram_available": 2 * GIB}))
    first = plan(hw, smollm2)
    fixed = Overrides(ctx_size=8192, slots=8, sources={"ctx_size": "models.toml"})
    refused = plan_addition(hw, [first], ModelRequest("big", "gguf", smollm2, fixed))
    assert refused.error is not None and refused.error.startswith("not enough memory to load 'big'")
    assert "beside what is loaded (m)" in refused.error and "unload" in refused.error
    # the RAM free now wins where it is lower than what the start-up probe left
    squeezed = plan_addition(hw, [], ModelRequest("x", "gguf", smollm2, fixed), ram_now=600 * MIB)
    assert squeezed.error is not None and "not enough memory" in squeezed.error
    # left to choose its context, the planner shrinks it to fit instead
    fitted = plan_addition(hw, [first], ModelRequest("small", "gguf", smollm2, Overrides()))
    assert fitted.error is None and fitted.ctx_size.value < 4096
