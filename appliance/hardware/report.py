"""The hardware report: what was found, what each model will run on and why, and what to fix.

One data shape for ``appliance doctor --json`` and ``GET /v1/appliance/hardware``; a text rendering
for people; and the one-line summaries logged at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from appliance.hardware.facts import CpuFacts, GpuFacts, HardwareFacts, size
from appliance.hardware.planner import Advice, Decision, ModelPlan, hardware_advice
from engines.base import EngineCapabilities


class HardwareReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    hardware: HardwareFacts
    plans: tuple[ModelPlan, ...]
    advice: tuple[Advice, ...]  # machine-wide; each plan carries its own as well


def build_report(hw: HardwareFacts, plans: Sequence[ModelPlan]) -> HardwareReport:
    return HardwareReport(hardware=hw, plans=tuple(plans), advice=tuple(hardware_advice(hw)))


def cpu_line(cpu: CpuFacts) -> str:
    cores = f"{cpu.physical_cores or '?'} cores"
    if cpu.logical_cores and cpu.logical_cores != cpu.physical_cores:
        cores += f" / {cpu.logical_cores} threads"
    if cpu.usable_cores is not None and cpu.logical_cores and cpu.usable_cores < cpu.logical_cores:
        cores += f" ({cpu.usable_cores:g} usable)"
    features = " ".join(f.upper() for f in cpu.features if f not in ("sse4_2", "fma", "f16c")) or "no SIMD listed"
    return f"{cpu.model or 'unknown CPU'} ({cpu.arch}): {cores}; {features}"


def ram_line(cpu: CpuFacts) -> str:
    line = f"{size(cpu.ram_total)} total, {size(cpu.ram_available)} available"
    return line + (f" (container limit {size(cpu.memory_limit)})" if cpu.memory_limit else "")


def gpu_line(gpu: GpuFacts) -> str:
    memory = f"{size(gpu.vram_total)}" + (f", {size(gpu.vram_free)} free" if gpu.vram_free is not None else "")
    if gpu.unified_memory:
        memory = f"unified memory {size(gpu.vram_total)}"
    extra = [
        f"compute {gpu.compute_capability}" if gpu.compute_capability else "",
        gpu.gfx_target or "",
        f"driver {gpu.driver_version}" if gpu.driver_version else "",
        f"CUDA {gpu.cuda_version}" if gpu.cuda_version else "",
    ]
    details = ", ".join(x for x in [memory, *extra] if x)
    return f"{gpu.vendor.upper()} #{gpu.index} {gpu.name}: {details} [{gpu.source}]"


def engine_line(caps: EngineCapabilities) -> str:
    if not caps.installed:
        return f"{caps.engine}: not available ({caps.detail})"
    if caps.providers:
        return f"{caps.engine}: {caps.runtime}; providers {', '.join(caps.providers)}"
    devices = ", ".join(f"{d.name} ({d.description})" for d in caps.devices) or "none"
    offload = "GPU offload" if caps.gpu_offload else "CPU only, no GPU offload in this build"
    cpu_code = f"; CPU code: {caps.cpu_variant}" if caps.cpu_variant else ""
    return f"{caps.engine}: llama.cpp via {caps.runtime}; {offload}; devices: {devices}{cpu_code}"


def hardware_summary(hw: HardwareFacts) -> str:
    """The one line logged at start-up."""
    cpu = hw.cpu
    gpus = "; ".join(f"{g.name} ({size(g.vram_total)})" for g in hw.gpus) or "no GPU"
    gguf = hw.engine("gguf")
    build = "unknown (probe failed)"
    if gguf is not None:
        backends = sorted({d.backend for d in gguf.devices if d.kind != "cpu"})
        build = "+".join(backends) if backends else "CPU only"
    features = ",".join(f.upper() for f in cpu.features if f in ("avx2", "avx512f", "amx", "neon", "sve", "dotprod"))
    return (
        f"{cpu.model or 'CPU'}, {cpu.physical_cores or '?'} cores ({features or 'no SIMD'}), "
        f"{size(cpu.ram_available)} RAM free; {gpus}; llama.cpp build: {build}"
    )


def _decision(name: str, d: Decision[int] | Decision[str], suffix: str = "") -> str:
    mark = f" [override: {d.source}]" if d.overridden else ""
    return f"    {name:<11} {str(d.value) + suffix:<14} {d.reason}{mark}"


def _advice_lines(advice: Sequence[Advice], indent: str) -> list[str]:
    lines = []
    for a in advice:
        lines.append(f"{indent}{'!' if a.level != 'info' else '-'} {a.message}")
        if a.fix:
            lines.append(f"{indent}  fix: {a.fix}")
    return lines


def plan_lines(plan: ModelPlan, label: str = "") -> list[str]:
    lines = [f"  {plan.model}{label}"]
    if plan.error:
        lines.append(f"    cannot be served as asked: {plan.error}")
    device = plan.device
    lines.append(_decision("engine", Decision(value=plan.engine, reason="from models.toml")))
    lines.append(_decision("device", device))
    layers = plan.gpu_layers
    lines.append(_decision("gpu layers", layers, f" of {plan.n_layers}" if plan.n_layers else ""))
    if plan.gpu_devices:
        split = f", split {list(plan.tensor_split)}" if plan.tensor_split else ""
        lines.append(f"    {'gpus':<11} {', '.join(plan.gpu_devices)}{split}")
    lines.append(_decision("threads", plan.threads))
    lines.append(_decision("slots", plan.slots))
    lines.append(_decision("context", plan.ctx_size, " /slot"))
    lines.append(_decision("batch", plan.batch_size))
    for use in plan.memory:
        lines.append(
            f"    {'memory':<11} {use.pool}: weights {size(use.weights)} + KV cache {size(use.kv_cache)} + "
            f"compute {size(use.compute)} = {size(use.total)} of {size(use.available)} available"
        )
    lines.extend(_advice_lines(plan.advice, "    "))
    return lines


def render_text(report: HardwareReport, default_model: str | None = None) -> str:
    hw = report.hardware
    lines = ["Hardware", f"  CPU      {cpu_line(hw.cpu)}", f"  RAM      {ram_line(hw.cpu)}"]
    if hw.gpus:
        lines.extend(f"  GPU      {gpu_line(g)}" for g in hw.gpus)
    else:
        lines.append("  GPU      none found")
    lines.append(f"  OS       {hw.os}")
    lines.append("Probes")
    for p in hw.probes:
        took = f" ({p.seconds:.2f} s)" if p.seconds else ""
        lines.append(f"  {p.name:<8} {p.status:<8} {p.detail}{took}")
    lines.append("Engines")
    lines.extend(f"  {engine_line(e)}" for e in hw.engines)
    if not hw.engines:
        lines.append("  unknown: the engines probe did not answer")
    lines.append("Plans")
    for plan in report.plans:
        lines.extend(plan_lines(plan, " (default)" if plan.model == default_model else ""))
    if report.advice:
        lines.append("Advice")
        lines.extend(_advice_lines(report.advice, "  "))
    return "\n".join(lines)
