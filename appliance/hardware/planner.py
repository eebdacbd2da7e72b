"""The planner: hardware facts + engine capabilities + model sizes + user overrides -> a plan per model.

A pure function, so every machine it must handle (no GPU, a small GPU, two GPUs, an AMD card, a
GPU the installed build cannot use, little RAM) is a table row in the tests. Each decision
carries a one-line reason; a value the user set is kept and marked as an override; anything the
user should act on comes as advice with the fix.

Memory is estimated from the model file's own sizes the way llama.cpp lays it out: the last
``n`` repeating layers go to the GPU (the output layer too when all do), each with its share of
the KV cache (f16 K and V per context cell); the compute buffer holds a batch's activations and
logits. The estimates match llama.cpp's own figures for the default model (KV exactly, compute
within 3%; see tests/test_hardware_plan_live.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from appliance.hardware.facts import MIB, CpuFacts, GpuFacts, HardwareFacts, size
from engines.base import EngineCapabilities, ModelShape

T = TypeVar("T")
GPU_ORDER = ("cuda", "rocm", "metal", "vulkan")  # preference among what the build supports
BACKEND_KEYS = {"cuda": "cuda", "rocm": "rocm", "hip": "rocm", "metal": "metal", "mtl": "metal", "vulkan": "vulkan"}
BACKEND_NAMES = {"cuda": "CUDA", "rocm": "ROCm", "metal": "Metal", "vulkan": "Vulkan", "cpu": "CPU"}
VENDOR_BACKEND = {"nvidia": "cuda", "amd": "rocm", "apple": "metal"}
DEFAULT_CTX = 4096
DEFAULT_BATCH = 512
MIN_CTX = 512  # below this a chat does not fit; the plan warns instead
KEEP_CTX = 2048  # a full offload may shrink the context to this before layers leave the GPU
NOT_ENOUGH_MEMORY = "not enough memory"  # how a refused on-demand plan's error begins (a 503 of its own code)
CPU_SLOTS_WIDE = 16  # see _widen_cpu_slots
RAM_HEADROOM = 512 * MIB  # the OS, the server itself, the page cache of the model file's header
ALIGN = 256  # reduced contexts are multiples of this


def gpu_headroom(total: int | None) -> int:
    """VRAM kept free per GPU: the driver's context (~300-500 MiB on CUDA) and fragmentation."""
    return 512 * MIB + (total or 0) // 50


def compute_bytes(shape: ModelShape, n_batch: int) -> int:
    """llama.cpp's compute buffer for a batch: activations and logits (within 3% for the default model)."""
    return n_batch * (shape.n_vocab + 4 * shape.n_embd) * 4


class Plain(BaseModel):
    model_config = ConfigDict(frozen=True)


class Decision(Plain, Generic[T]):
    value: T
    reason: str
    source: str = "auto"  # "auto", or where the override came from (e.g. "--gpu-layers")

    @property
    def overridden(self) -> bool:
        return self.source != "auto"


class Advice(Plain):
    """Something the user should know or do; ``fix`` says what."""

    level: Literal["info", "warning", "error"]
    message: str
    fix: str | None = None


class MemoryUse(Plain):
    """Planned use of one memory pool ("CUDA0", "RAM") by one model, in bytes."""

    pool: str
    weights: int
    kv_cache: int
    compute: int
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


class ModelPlan(Plain):
    model: str
    engine: str
    device: Decision[str]
    gpu_layers: Decision[int]
    n_layers: int  # the model's repeating layers + the output layer: "all" for --gpu-layers
    gpu_devices: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    main_gpu: int = 0
    threads: Decision[int]
    slots: Decision[int]
    ctx_size: Decision[int]
    batch_size: Decision[int]
    memory: tuple[MemoryUse, ...] = ()
    advice: tuple[Advice, ...] = ()
    error: str | None = None  # the model cannot be served as asked; the message says why

    def summary(self) -> str:
        where = self.device.value
        if self.gpu_devices:
            where = f"{'+'.join(self.gpu_devices)}, {self.gpu_layers.value}/{self.n_layers} layers"
        return (
            f"{self.model}: {where}, {self.threads.value} threads, "
            f"{self.slots.value} slots x {self.ctx_size.value} tokens, batch {self.batch_size.value}"
        )


@dataclass(frozen=True)
class Overrides:
    """What the user set (None: let the planner decide) and where each came from, for the report."""

    device: str = "auto"
    gpu_layers: int | None = None  # -1: all
    threads: int | None = None
    slots: int | None = None
    batch_size: int | None = None
    ctx_size: int | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def source(self, name: str) -> str:
        return self.sources.get(name, f"--{name.replace('_', '-')}")


@dataclass(frozen=True)
class ModelRequest:
    model_id: str
    engine: str
    shape: ModelShape | None
    overrides: Overrides = Overrides()
    problem: str | None = None  # why the shape is unknown (file missing, unreadable)


@dataclass
class _Gpu:
    name: str
    backend: str
    description: str
    free: int
    total: int | None


@dataclass
class _Budget:
    """Memory left while models are planned one after the other."""

    ram: int | None
    gpu: dict[str, int]


def _usable_gpus(caps: EngineCapabilities | None, gpus: Sequence[GpuFacts]) -> dict[str, list[_Gpu]]:
    """The build's GPU devices by backend, with free memory from the engine or else the driver probe."""
    found: dict[str, list[_Gpu]] = {}
    for dev in caps.devices if caps else ():
        key = BACKEND_KEYS.get(dev.backend.lower())
        if key is None or dev.kind not in ("gpu", "igpu"):
            continue
        same = found.setdefault(key, [])
        free, total = dev.memory_free, dev.memory_total
        if free is None:
            vendor = [g for g in gpus if VENDOR_BACKEND.get(g.vendor) == key]
            match = vendor[len(same)] if len(same) < len(vendor) else None
            free = match.vram_free or match.vram_total if match else None
            total = match.vram_total if match else None
        same.append(_Gpu(dev.name, key, dev.description, free or 0, total))
    return found


def install_fix(backend: str, runtime: str, gpus: Sequence[GpuFacts] = ()) -> str:
    """The command that installs a llama.cpp build with this GPU backend."""
    version = runtime.rpartition(" ")[2] if runtime.startswith("llama-cpp-python ") else ""
    flags = {"cuda": "-DGGML_CUDA=on", "metal": "-DGGML_METAL=on", "vulkan": "-DGGML_VULKAN=on"}.get(backend, "")
    if backend == "rocm":
        targets = sorted({g.gfx_target for g in gpus if g.gfx_target})
        flags = "-DGGML_HIP=on" + (f" -DGPU_TARGETS={';'.join(targets)}" if targets else "")
    pin = f"=={version}" if version and version != "?" else ""
    return f'CMAKE_ARGS="{flags}" pip install --force-reinstall --no-cache-dir llama-cpp-python{pin}'


def hardware_advice(hw: HardwareFacts, engine: str = "gguf") -> list[Advice]:
    """Machine-wide advice: GPUs the build cannot use, probes that failed, a slow CPU."""
    advice: list[Advice] = []
    caps = hw.engine(engine)
    usable = _usable_gpus(caps, hw.gpus)
    runtime = caps.runtime if caps else "llama-cpp-python"
    for vendor, label in (("nvidia", "NVIDIA"), ("amd", "AMD"), ("apple", "Apple")):
        present = [g for g in hw.gpus if g.vendor == vendor]
        backend = VENDOR_BACKEND[vendor]
        if not present or caps is None or backend in usable:
            continue
        names = ", ".join(sorted({g.name for g in present}))
        name = BACKEND_NAMES[backend]
        if any(BACKEND_KEYS.get(b.lower()) == backend for b in caps.backends):  # built in, but no device came up
            problem = f"{label} GPU found ({names}) but llama.cpp's {name} backend sees no device"
            fix = "check that the driver works (nvidia-smi / rocm-smi) and supports the build's CUDA/ROCm version"
        else:
            problem = f"{label} GPU found ({names}) but this llama.cpp build has no {name}"
            fix = f"install the {name} build: {install_fix(backend, runtime, present)}"
        advice.append(Advice(level="warning", message=f"{problem}: models run on the CPU", fix=fix))
    for probe in hw.probes:
        if probe.status in ("failed", "timeout"):
            what = "GPU offload is off" if probe.name == "engines" else "its facts are missing"
            advice.append(
                Advice(
                    level="warning",
                    message=f"the {probe.name} probe {probe.status}: {probe.detail}; {what}",
                    fix="run `appliance doctor` again; if it persists, check the driver",
                )
            )
    if hw.cpu.arch in ("x86_64", "AMD64") and hw.cpu.features and "avx2" not in hw.cpu.features:
        advice.append(
            Advice(level="warning", message="this CPU has no AVX2: llama.cpp's CPU kernels run several times slower")
        )
    return advice


def _threads(cpu: CpuFacts, o: Overrides, advice: list[Advice]) -> Decision[int]:
    logical = cpu.logical_cores or 1
    usable = max(1, math.floor(cpu.usable_cores)) if cpu.usable_cores else logical
    if o.threads is not None:
        if o.threads > usable:
            advice.append(
                Advice(
                    level="warning",
                    message=f"{o.source('threads')} {o.threads} is more than the {usable} usable cores: "
                    "threads then wait on each other and decoding slows",
                    fix=f"use at most {usable}",
                )
            )
        return Decision(value=o.threads, reason="set by the user", source=o.source("threads"))
    physical = cpu.physical_cores or logical
    value = max(1, min(physical, usable))
    reason = f"{physical} physical cores"
    if usable < physical:
        reason += f", {usable} usable by this process (CPU affinity or container quota)"
    elif physical < logical:
        reason += f" (not the {logical} logical ones: hyper-threads share the cores' vector units)"
    return Decision(value=value, reason=reason)


def onnx_cpu_reason(caps: EngineCapabilities, hw: HardwareFacts) -> str:
    """Why an ONNX model runs on the CPU here, naming what onnxruntime found."""
    providers = ", ".join(caps.providers) or "none"
    if not caps.installed:
        return f"onnxruntime is not installed ({caps.detail})"
    if "CUDAExecutionProvider" in caps.providers:
        return (
            f"onnxruntime has CUDA ({providers}), but the ONNX engine keeps its KV cache in host memory and "
            "runs on the CPU so far: serve the GGUF model for GPU offload"
        )
    if any(g.vendor == "nvidia" for g in hw.gpus):
        return (
            f"the ONNX engine runs on the CPU (onnxruntime providers: {providers}); for the NVIDIA GPU here, "
            "serve the GGUF model (llama.cpp offloads it)"
        )
    return f"the ONNX engine runs on the CPU (onnxruntime providers: {providers})"


def _device(
    request: ModelRequest, usable: dict[str, list[_Gpu]], hw: HardwareFacts, caps: EngineCapabilities | None
) -> tuple[Decision[str], str | None]:
    """The device, and an error when an override asks for one the build cannot use."""
    o = request.overrides
    available = [key for key in GPU_ORDER if usable.get(key)]
    if o.device != "auto":
        if request.engine == "onnx" and o.device != "cpu":
            why = onnx_cpu_reason(caps, hw) if caps else "the ONNX engine runs on the CPU only"
            error = f"{o.source('device')} {o.device}: {why}"
            return Decision(value=o.device, reason="not available (see the error)", source=o.source("device")), error
        if o.device == "cpu" or o.device in available:
            return Decision(value=o.device, reason="set by the user", source=o.source("device")), None
        present = [g for g in hw.gpus if VENDOR_BACKEND.get(g.vendor) == o.device]
        name = BACKEND_NAMES.get(o.device, o.device)
        if present:
            fix = install_fix(o.device, caps.runtime if caps else "", present)
            error = f"{o.source('device')} {o.device}: this llama.cpp build has no {name}; install it: {fix}"
        else:
            error = f"{o.source('device')} {o.device}: no {name} GPU usable here"
        return Decision(value=o.device, reason="not available (see the error)", source=o.source("device")), error
    if o.gpu_layers == 0:
        return Decision(value="cpu", reason=f"{o.source('gpu_layers')} 0", source=o.source("gpu_layers")), None
    if available:
        key = available[0]
        gpus = usable[key]
        names = ", ".join(f"{g.name} ({g.description}, {size(g.free)} free)" for g in gpus)
        others = f"; preferred over {', '.join(BACKEND_NAMES[k] for k in available[1:])}" if available[1:] else ""
        return Decision(value=key, reason=f"{BACKEND_NAMES[key]}: {names}{others}"), None
    if caps is None:
        return Decision(value="cpu", reason="the engine probe did not answer, so GPU offload is off"), None
    if request.engine == "onnx":
        return Decision(value="cpu", reason=onnx_cpu_reason(caps, hw)), None
    if hw.gpus:
        return Decision(value="cpu", reason="the GPU found is not usable by this llama.cpp build (see advice)"), None
    return Decision(value="cpu", reason="no GPU found"), None


def _fit_ctx(budget: int, fixed: int, per_cell: int, slots: int) -> int:
    """The largest context per slot (a multiple of ALIGN) whose KV cache fits ``budget`` beside ``fixed``."""
    if per_cell <= 0:
        return 1 << 30
    cells = (budget - fixed) // (per_cell * slots)
    return max(0, cells // ALIGN * ALIGN)


def _pool(gpus: Sequence[_Gpu], budget: _Budget) -> list[int]:
    """What each GPU can still give, its headroom kept."""
    return [max(0, budget.gpu.get(g.name, g.free) - gpu_headroom(g.total)) for g in gpus]


def _gpu_weights(shape: ModelShape, gpu_layers: int) -> int:
    first = shape.n_layer - min(gpu_layers, shape.n_layer)
    return sum(shape.layer_bytes[first:]) + (shape.output_bytes if gpu_layers > shape.n_layer else 0)


def _vram_need(shape: ModelShape, gpu_layers: int, cells: int, n_batch: int) -> int:
    first = shape.n_layer - min(gpu_layers, shape.n_layer)
    kv = sum(shape.kv_bytes_per_token[first:]) * cells
    return _gpu_weights(shape, gpu_layers) + kv + compute_bytes(shape, n_batch)


def _layers_that_fit(shape: ModelShape, pool: int, cells: int, n_batch: int) -> int:
    """How many layers fit in ``pool`` bytes: all (n_layer + 1), or the most of the last ones."""
    if _vram_need(shape, shape.n_layer + 1, cells, n_batch) <= pool:
        return shape.n_layer + 1
    need, fitted = compute_bytes(shape, n_batch), 0
    for i in reversed(range(shape.n_layer)):  # llama.cpp offloads the last layers first
        need += shape.layer_bytes[i] + shape.kv_bytes_per_token[i] * cells
        if need > pool:
            break
        fitted += 1
    return fitted


@dataclass
class _Draft:
    """A plan being worked out; ``plan_model`` turns it into a ``ModelPlan``."""

    device: Decision[str]
    threads: Decision[int]
    slots: Decision[int]
    ctx: Decision[int]
    batch: Decision[int]
    layers: Decision[int]
    gpus: list[_Gpu]
    advice: list[Advice]


def _gpu_offload(d: _Draft, shape: ModelShape, o: Overrides, budget: _Budget) -> None:
    """Decide the layers on the GPU: the user's number, all, all with a shorter context, some, or none."""
    n_layers = shape.n_layer + 1
    pool = sum(_pool(d.gpus, budget))
    where = "+".join(g.name for g in d.gpus)
    cells = d.slots.value * d.ctx.value
    fitted = _layers_that_fit(shape, pool, cells, d.batch.value)
    all_need = _vram_need(shape, n_layers, cells, d.batch.value)
    if o.gpu_layers is not None:
        value = n_layers if o.gpu_layers < 0 else min(o.gpu_layers, n_layers)
        d.layers = Decision(value=value, reason="set by the user", source=o.source("gpu_layers"))
        if value > fitted:
            d.advice.append(
                Advice(
                    level="warning",
                    message=f"{o.source('gpu_layers')} {o.gpu_layers}: {value} layers may not fit in the "
                    f"{size(pool)} free on {where} (about {fitted} do)",
                    fix="lower --gpu-layers, --ctx-size or --parallel if loading fails",
                )
            )
        return
    if fitted == n_layers:
        reason = f"all {n_layers}: weights, KV cache and compute ({size(all_need)}) fit in {size(pool)} free on {where}"
        d.layers = Decision(value=n_layers, reason=reason)
        return
    fixed = _gpu_weights(shape, n_layers) + compute_bytes(shape, d.batch.value)
    fit = _fit_ctx(pool, fixed, sum(shape.kv_bytes_per_token), d.slots.value)
    if o.ctx_size is None and fit >= min(d.ctx.value, KEEP_CTX):
        d.advice.append(
            Advice(
                level="warning",
                message=f"context reduced from {d.ctx.value} to {fit} tokens per slot to keep every layer on {where}: "
                f"{d.slots.value} slots x {d.ctx.value} tokens of KV cache do not fit beside the weights",
                fix="choose the trade-off yourself with --ctx-size and --parallel",
            )
        )
        d.ctx = Decision(value=fit, reason=f"reduced to keep all layers on {where} ({d.ctx.value} asked)")
        d.layers = Decision(value=n_layers, reason=f"all {n_layers}, with the context reduced to fit {size(pool)}")
    elif fitted:
        d.layers = Decision(
            value=fitted,
            reason=f"{fitted} of {n_layers}: as many as fit in {size(pool)} free on {where} "
            f"(all need {size(all_need)})",
        )
        d.advice.append(
            Advice(
                level="info",
                message=f"partial offload: {n_layers - fitted} of {n_layers} layers run on the CPU, which is slower",
                fix="a smaller quantisation, a shorter --ctx-size or fewer --parallel slots fit more",
            )
        )
    else:
        d.device = Decision(value="cpu", reason=f"not one layer fits in the {size(pool)} free on {where}")
        d.gpus = []
        d.advice.append(
            Advice(
                level="warning",
                message=f"{where} has only {size(pool)} free beyond its headroom: the model runs on the CPU",
                fix="free GPU memory (other processes: nvidia-smi / rocm-smi), or a smaller --ctx-size",
            )
        )
        d.slots = _slots("cpu", d.threads.value, o)
        d.batch = _batch(d.slots.value, o)


def _host_need(shape: ModelShape, gpu_layers: int, cells: int, n_batch: int) -> tuple[int, int, int]:
    """Host RAM for weights (mapped from the file), KV cache and compute of what stays on the CPU."""
    cpu_layers = shape.n_layer - min(gpu_layers, shape.n_layer)
    offloaded = _gpu_weights(shape, gpu_layers) - (
        shape.output_bytes if shape.tied_output and gpu_layers > shape.n_layer else 0
    )
    weights = shape.file_bytes - offloaded
    kv = sum(shape.kv_bytes_per_token[:cpu_layers]) * cells
    if gpu_layers == 0 or cpu_layers:
        compute = compute_bytes(shape, n_batch)
    else:  # all on the GPU: the host keeps a batch's input embeddings and the logits read back
        compute = n_batch * shape.n_embd * 4 + shape.n_vocab * 4 * 16
    return weights, kv, compute


def _widen_cpu_slots(d: _Draft, shape: ModelShape, request: ModelRequest, budget: _Budget) -> None:
    """16 slots instead of fewer on the CPU when their KV cache takes at most a quarter of the RAM
    left beside the weights: a llama.cpp step of 16 sequences costs ~0.8x per token what one of 8
    does here, and 16 clients then all run at once instead of half waiting (out of the box against
    llama-server's defaults at 16 clients: 1.40x tokens/s with 16 slots, 1.20x with 8; BENCHMARKS.md).
    A model whose cache would crowd the RAM keeps the fewer slots and its full context."""
    if request.overrides.slots is not None or request.engine != "gguf" or budget.ram is None:
        return
    if d.slots.value >= CPU_SLOTS_WIDE:
        return
    room = budget.ram - RAM_HEADROOM - shape.file_bytes
    if CPU_SLOTS_WIDE * d.ctx.value * sum(shape.kv_bytes_per_token) <= room // 4:
        d.slots = Decision(
            value=CPU_SLOTS_WIDE,
            reason=f"{CPU_SLOTS_WIDE}: their KV cache takes at most a quarter of the free RAM, and batched CPU "
            "decoding gains up to about 16",
        )
        d.batch = _batch(d.slots.value, request.overrides)


def _fit_host(d: _Draft, shape: ModelShape, o: Overrides, budget: _Budget) -> MemoryUse:
    """Shrink the context, then the slots, until the host's share fits the RAM left; warn when it cannot."""
    gpu_layers = d.layers.value if d.gpus else 0
    weights, kv, compute = _host_need(shape, gpu_layers, d.slots.value * d.ctx.value, d.batch.value)
    available = budget.ram
    if available is None or d.device.value == "metal":  # unified memory: the GPU's share was the RAM
        return MemoryUse(pool="RAM", weights=weights, kv_cache=kv, compute=compute, available=available)
    room = available - RAM_HEADROOM
    if weights + kv + compute > room:
        asked = (d.slots.value, d.ctx.value)
        per_cell = sum(shape.kv_bytes_per_token[: shape.n_layer - min(gpu_layers, shape.n_layer)])
        fit = _fit_ctx(room, weights + compute, per_cell, d.slots.value)
        if o.ctx_size is None and fit >= MIN_CTX:
            d.ctx = Decision(value=min(fit, d.ctx.value), reason=f"reduced to fit the RAM ({asked[1]} asked)")
        elif o.slots is None and d.slots.value > 1:
            ctx = d.ctx.value if o.ctx_size else MIN_CTX
            fit_slots = (room - weights - compute) // max(1, per_cell * ctx)
            d.slots = Decision(value=int(max(1, min(fit_slots, d.slots.value))), reason="reduced to fit the RAM")
            if ctx != d.ctx.value:
                d.ctx = Decision(value=ctx, reason=f"reduced to fit the RAM ({asked[1]} asked)")
        weights, kv, compute = _host_need(shape, gpu_layers, d.slots.value * d.ctx.value, d.batch.value)
        if (d.slots.value, d.ctx.value) != asked:
            d.advice.append(
                Advice(
                    level="warning",
                    message=f"context reduced to {d.slots.value} slots x {d.ctx.value} tokens (from {asked[0]} x "
                    f"{asked[1]}): the KV cache did not fit in the {size(room)} of RAM left beside the weights",
                    fix="add RAM, or choose with --ctx-size and --parallel",
                )
            )
        if weights + kv + compute > room:
            d.advice.append(
                Advice(
                    level="warning",
                    message=f"needs {size(weights + kv + compute)} of RAM where {size(room)} is available: "
                    "expect swapping or an out-of-memory kill",
                    fix="a smaller model or quantisation, or a lower --ctx-size / --parallel",
                )
            )
    budget.ram = available - (weights + kv + compute)
    return MemoryUse(pool="RAM", weights=weights, kv_cache=kv, compute=compute, available=available)


def _take_vram(d: _Draft, shape: ModelShape, budget: _Budget) -> tuple[list[MemoryUse], tuple[float, ...], int]:
    """Split the offloaded layers over the GPUs in proportion to their free memory, and book it."""
    shares = _pool(d.gpus, budget)
    whole = sum(shares)
    split = tuple(round(s / whole, 4) for s in shares) if len(d.gpus) > 1 and whole else ()
    main_gpu = max(range(len(d.gpus)), key=lambda i: shares[i]) if split else 0
    if split:
        reason = d.layers.reason + f"; split over {len(d.gpus)} GPUs in proportion to their free memory"
        d.layers = d.layers.model_copy(update={"reason": reason})
    first = shape.n_layer - min(d.layers.value, shape.n_layer)
    weights = _gpu_weights(shape, d.layers.value)
    kv = sum(shape.kv_bytes_per_token[first:]) * d.slots.value * d.ctx.value
    memory = []
    for i, (g, share) in enumerate(zip(d.gpus, split or (1.0,), strict=True)):
        use = MemoryUse(
            pool=g.name,
            weights=int(weights * share),
            kv_cache=int(kv * share),
            compute=compute_bytes(shape, d.batch.value) if i == main_gpu else 0,
            available=budget.gpu.get(g.name, g.free),
        )
        budget.gpu[g.name] = budget.gpu.get(g.name, g.free) - use.total
        memory.append(use)
    return memory, split, main_gpu


def _slots(device: str, threads: int, o: Overrides) -> Decision[int]:
    if o.slots is not None:
        return Decision(value=o.slots, reason="set by the user", source=o.source("slots"))
    if device != "cpu":
        return Decision(value=16, reason="a GPU decodes 16 sequences a step for little more than the time of one")
    n = min(CPU_SLOTS_WIDE, max(8, 2 * threads))
    return Decision(value=n, reason=f"2 per thread, 8 to 16: batched CPU decoding gains up to about {n}")


def _batch(slots: int, o: Overrides) -> Decision[int]:
    batch: Decision[int]
    if o.batch_size is not None:
        batch = Decision(value=o.batch_size, reason="set by the user", source=o.source("batch_size"))
    else:
        batch = Decision(value=DEFAULT_BATCH, reason="llama.cpp's default: prompts are evaluated 512 tokens a step")
    if batch.value < slots:
        batch = Decision(value=slots, reason=f"raised to the {slots} slots: each decodes every step")
    return batch


def _defaults(request: ModelRequest, hw: HardwareFacts, device: Decision[str], advice: list[Advice]) -> _Draft:
    """Threads, slots, context and batch before memory is looked at."""
    o, shape = request.overrides, request.shape
    threads = _threads(hw.cpu, o, advice)
    ctx: Decision[int]
    if o.ctx_size:
        ctx = Decision(value=o.ctx_size, reason="set by the user", source=o.source("ctx_size"))
    else:
        ctx = Decision(value=DEFAULT_CTX, reason="the default")
    if shape and shape.n_ctx_train and ctx.value > shape.n_ctx_train:
        ctx = Decision(value=shape.n_ctx_train, reason=f"capped at the model's trained context ({ctx.value} asked)")
    slots = _slots(device.value, threads.value, o)
    batch = _batch(slots.value, o)
    layers: Decision[int] = Decision(value=0, reason="CPU plan")
    return _Draft(device, threads, slots, ctx, batch, layers, [], advice)


def plan_model(request: ModelRequest, hw: HardwareFacts, budget: _Budget) -> ModelPlan:
    """One model's plan against what is left of the machine; books its memory in ``budget``."""
    o, shape = request.overrides, request.shape
    advice: list[Advice] = []
    caps = hw.engine(request.engine)
    usable = _usable_gpus(caps, hw.gpus)
    device, error = _device(request, usable, hw, caps)
    d = _defaults(request, hw, device, advice)
    if caps is not None and not caps.installed:
        error = error or f"the {request.engine} engine is not installed: {caps.detail}"
    memory: list[MemoryUse] = []
    split: tuple[float, ...] = ()
    main_gpu = 0
    if shape is not None and error is None:
        if d.device.value != "cpu":
            d.gpus = list(usable.get(d.device.value, []))
            _gpu_offload(d, shape, o, budget)
        elif o.gpu_layers and d.device.source == "auto" and o.device == "auto":
            advice.append(
                Advice(level="warning", message=f"{o.source('gpu_layers')} {o.gpu_layers} ignored: no usable GPU")
            )
        if d.gpus and d.layers.value:
            memory, split, main_gpu = _take_vram(d, shape, budget)
        else:
            d.gpus, d.layers = [], Decision(value=0, reason="CPU plan")
            _widen_cpu_slots(d, shape, request, budget)
        memory.append(_fit_host(d, shape, o, budget))
    return ModelPlan(
        model=request.model_id,
        engine=request.engine,
        device=d.device,
        gpu_layers=d.layers,
        n_layers=shape.n_layer + 1 if shape else 0,
        gpu_devices=tuple(g.name for g in d.gpus),
        tensor_split=split,
        main_gpu=main_gpu,
        threads=d.threads,
        slots=d.slots,
        ctx_size=d.ctx,
        batch_size=d.batch,
        memory=tuple(memory),
        advice=tuple(advice),
        error=error or request.problem or (None if shape else "the model's sizes are unknown"),
    )


def plan_models(hw: HardwareFacts, requests: Sequence[ModelRequest]) -> list[ModelPlan]:
    """Plans for models served together: each books its memory before the next is planned."""
    free = {g.name: g.free for caps in hw.engines for gs in _usable_gpus(caps, hw.gpus).values() for g in gs}
    ram = hw.cpu.ram_available if hw.cpu.ram_available is not None else hw.cpu.ram_total
    budget = _Budget(ram=ram, gpu=free)
    return [plan_model(request, hw, budget) for request in requests]


def plan_addition(
    hw: HardwareFacts, loaded: Sequence[ModelPlan], request: ModelRequest, ram_now: int | None = None
) -> ModelPlan:
    """The plan of one more model beside the loaded ones; it must fit, or its ``error`` says why not.

    At start-up a plan that overcommits RAM is only a warning (the user named the model); a model
    loaded on demand, by a request, must never risk an out-of-memory kill of the whole server. The
    budget is what the start-up probe found free less what the loaded models' plans booked, or the
    RAM free now (``ram_now``) where another process took some since, whichever is less.
    """
    gpu = {g.name: g.free for caps in hw.engines for gs in _usable_gpus(caps, hw.gpus).values() for g in gs}
    ram = hw.cpu.ram_available if hw.cpu.ram_available is not None else hw.cpu.ram_total
    for other in loaded:
        for use in other.memory:
            if use.pool == "RAM" and ram is not None:
                ram -= use.total
            elif use.pool in gpu:
                gpu[use.pool] -= use.total
    if ram_now is not None:
        ram = ram_now if ram is None else min(ram, ram_now)
    plan = plan_model(request, hw, _Budget(ram=ram, gpu=gpu))
    host = next((use for use in plan.memory if use.pool == "RAM"), None)
    if plan.error or host is None or host.available is None or plan.device.value == "metal":
        return plan
    room = host.available - RAM_HEADROOM
    if host.total <= room:
        return plan
    beside = ", ".join(p.model for p in loaded) or "no other model"
    error = (
        f"{NOT_ENOUGH_MEMORY} to load '{request.model_id}': it needs {size(host.total)} of RAM and "
        f"{size(max(0, room))} is free beside what is loaded ({beside}); unload a model "
        "(POST /v1/appliance/models/ID/unload, or `appliance unload ID`), or set a smaller ctx_size or parallel"
    )
    return plan.model_copy(update={"error": error})
