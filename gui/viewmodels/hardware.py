"""The Hardware screen's state: the server's ``doctor`` report as readable sections, and the live load.

The report is what the server found at start-up and the plan it chose for each model, each choice
with its value, its reason and who decided it (the planner, a setting, a model's own entry): the
answer to "why is my model on the CPU?". It is turned into plain rows here (``Section``/``Fact``),
so the view only lays them out and the tests check words, not widgets.

The live load (CPU per core, RAM, the server's memory) is polled by the view while it is shown;
one poll at most is in flight, so a slow server gets fewer polls instead of a pile of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import Signal

from gui import tasks
from gui.client import ApiClient
from gui.viewmodels.base import ScreenViewModel

HISTORY = 150  # live samples kept for the chart: 5 minutes at one per 2 s
HIDDEN_FEATURES = ("sse4_2", "fma", "f16c")  # every x86-64 CPU of the last decade has them


@dataclass(frozen=True)
class Fact:
    """One row: what, its value, and (for the plan's decisions) why and who decided."""

    label: str
    value: str
    reason: str = ""
    source: str = ""
    level: str = ""  # "warning" or "error" for advice the user should act on


@dataclass(frozen=True)
class Section:
    title: str
    facts: tuple[Fact, ...]
    decisions: bool = False  # a model's plan: each row a choice with its reason and who made it


@dataclass(frozen=True)
class LiveSample:
    time: float
    cpu_percent: float
    cpu_per_core: tuple[float, ...]
    ram_used: int
    ram_total: int
    process_rss: int
    gpus: tuple[dict[str, Any], ...] | None  # None: the server does not measure GPU load

    @property
    def ram_percent(self) -> float:
        return 100.0 * self.ram_used / self.ram_total if self.ram_total else 0.0


def human_size(n: int | None) -> str:
    if n is None:
        return "unknown"
    units = ("B", "KB", "MB", "GB", "TB")
    value, i = float(n), 0
    while abs(value) >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{value:.0f} {units[i]}" if i < 2 else f"{value:.1f} {units[i]}"


# -- the report as sections -------------------------------------------------------------------


def _cpu_section(cpu: dict[str, Any]) -> Section:
    cores = f"{cpu.get('physical_cores') or '?'} cores"
    if cpu.get("logical_cores") and cpu["logical_cores"] != cpu.get("physical_cores"):
        cores += f", {cpu['logical_cores']} threads"
    usable = cpu.get("usable_cores")
    if usable is not None and cpu.get("logical_cores") and usable < cpu["logical_cores"]:
        cores += f" ({usable:g} usable in this container)"
    features = " ".join(f.upper() for f in cpu.get("features", ()) if f not in HIDDEN_FEATURES)
    return Section(
        "CPU",
        (
            Fact("Model", cpu.get("model") or "unknown CPU", source=cpu.get("source", "")),
            Fact("Architecture", cpu.get("arch", "?")),
            Fact("Cores", cores),
            Fact("Instruction sets", features or "no SIMD listed", reason="what llama.cpp's CPU kernels can use"),
        ),
    )


def _memory_section(cpu: dict[str, Any]) -> Section:
    facts = [Fact("Total", human_size(cpu.get("ram_total"))), Fact("Available", human_size(cpu.get("ram_available")))]
    if cpu.get("memory_limit"):
        facts.append(Fact("Container limit", human_size(cpu["memory_limit"]), reason="what this server may use"))
    return Section("Memory", tuple(facts))


def _gpu_fact(gpu: dict[str, Any]) -> Fact:
    if gpu.get("unified_memory"):
        memory = f"unified memory {human_size(gpu.get('vram_total'))}"
    else:
        memory = human_size(gpu.get("vram_total"))
        if gpu.get("vram_free") is not None:
            memory += f", {human_size(gpu['vram_free'])} free"
    extra = [
        f"compute {gpu['compute_capability']}" if gpu.get("compute_capability") else "",
        gpu.get("gfx_target") or "",
        f"driver {gpu['driver_version']}" if gpu.get("driver_version") else "",
        f"CUDA {gpu['cuda_version']}" if gpu.get("cuda_version") else "",
    ]
    label = f"{str(gpu.get('vendor', '')).upper()} #{gpu.get('index', '?')} {gpu.get('name', '')}".strip()
    return Fact(label, ", ".join(x for x in [memory, *extra] if x), source=gpu.get("source", ""))


def _gpu_section(gpus: list[dict[str, Any]]) -> Section:
    facts = tuple(_gpu_fact(g) for g in gpus) or (Fact("GPU", "none found", reason="models run on the CPU"),)
    return Section("GPUs", facts)


def _engine_fact(engine: dict[str, Any]) -> Fact:
    name = engine.get("engine", "?")
    if not engine.get("installed"):
        return Fact(name, "not available", reason=engine.get("detail", ""), level="info")
    if engine.get("providers"):
        return Fact(name, engine.get("runtime", ""), reason="providers " + ", ".join(engine["providers"]))
    devices = ", ".join(f"{d.get('name')} ({d.get('description')})" for d in engine.get("devices", ())) or "none"
    offload = "GPU offload" if engine.get("gpu_offload") else "CPU only: no GPU offload in this build"
    cpu_code = f"; CPU code: {engine['cpu_variant']}" if engine.get("cpu_variant") else ""
    return Fact(name, f"{engine.get('runtime', '')}; {offload}", reason=f"devices: {devices}{cpu_code}")


def _probe_fact(probe: dict[str, Any]) -> Fact:
    took = f"{probe['seconds']:.2f} s" if probe.get("seconds") else ""
    level = "warning" if probe.get("status") in ("failed", "timeout") else ""
    return Fact(
        probe.get("name", "?"), probe.get("status", "?"), reason=probe.get("detail", ""), source=took, level=level
    )


def _advice_facts(advice: list[dict[str, Any]]) -> list[Fact]:
    facts = []
    for a in advice:
        fix = f"fix: {a['fix']}" if a.get("fix") else ""
        facts.append(
            Fact(str(a.get("level", "info")).capitalize(), a.get("message", ""), fix, level=a.get("level", ""))
        )
    return facts


def _decision(label: str, decision: dict[str, Any] | None, suffix: str = "") -> Fact:
    if not decision:
        return Fact(label, "?")
    return Fact(label, f"{decision.get('value')}{suffix}", decision.get("reason", ""), decision.get("source", ""))


def plan_facts(plan: dict[str, Any]) -> tuple[Fact, ...]:
    """A model's plan as rows: each decision with its reason and source, memory, and the plan's advice."""
    facts = []
    if plan.get("error"):
        facts.append(Fact("Cannot serve", "as asked", plan["error"], level="error"))
    facts.append(Fact("Engine", plan.get("engine", "?"), "from the model's entry (models.toml)", "registry"))
    facts.append(_decision("Device", plan.get("device")))
    of_layers = f" of {plan['n_layers']}" if plan.get("n_layers") else ""
    facts.append(_decision("GPU layers", plan.get("gpu_layers"), of_layers))
    if plan.get("gpu_devices"):
        split = f", split {plan['tensor_split']}" if plan.get("tensor_split") else ""
        facts.append(Fact("GPUs", ", ".join(plan["gpu_devices"]) + split))
    facts.append(_decision("Threads", plan.get("threads")))
    facts.append(_decision("Slots", plan.get("slots"), " parallel requests"))
    facts.append(_decision("Context", plan.get("ctx_size"), " tokens per slot"))
    facts.append(_decision("Batch", plan.get("batch_size"), " tokens"))
    for use in plan.get("memory", ()):
        total = use.get("weights", 0) + use.get("kv_cache", 0) + use.get("compute", 0)
        parts = (
            f"weights {human_size(use.get('weights'))} + KV cache {human_size(use.get('kv_cache'))} + "
            f"compute {human_size(use.get('compute'))}"
        )
        available = f" of {human_size(use['available'])} available" if use.get("available") is not None else ""
        facts.append(Fact(f"Memory ({use.get('pool', '?')})", human_size(total) + available, parts))
    facts.extend(_advice_facts(plan.get("advice", [])))
    return tuple(facts)


def report_sections(report: dict[str, Any]) -> list[Section]:
    hw = report.get("hardware", {})
    cpu = hw.get("cpu", {})
    sections = [_cpu_section(cpu), _memory_section(cpu), _gpu_section(hw.get("gpus", []))]
    engines = tuple(_engine_fact(e) for e in hw.get("engines", ()))
    sections.append(Section("Engines", engines or (Fact("unknown", "the engines probe did not answer"),)))
    for plan in report.get("plans", ()):
        sections.append(Section(f"Plan for {plan.get('model', '?')}", plan_facts(plan), decisions=True))
    if report.get("advice"):
        sections.append(Section("Advice", tuple(_advice_facts(report["advice"]))))
    probes = tuple(_probe_fact(p) for p in hw.get("probes", ()))
    if probes:
        sections.append(Section("Probes", probes))
    if hw.get("os") or hw.get("probed_at"):
        sections.append(Section("System", (Fact("OS", hw.get("os", "?"), source=hw.get("probed_at", "")),)))
    return sections


def parse_live(data: dict[str, Any]) -> LiveSample:
    gpus = data.get("gpus")
    return LiveSample(
        time=float(data.get("time", 0.0)),
        cpu_percent=float(data.get("cpu_percent", 0.0)),
        cpu_per_core=tuple(float(p) for p in data.get("cpu_per_core", ())),
        ram_used=int(data.get("ram_used", 0)),
        ram_total=int(data.get("ram_total", 0)),
        process_rss=int(data.get("process_rss", 0)),
        gpus=tuple(gpus) if gpus is not None else None,
    )


class HardwareViewModel(ScreenViewModel):
    title = "Hardware"
    live_changed = Signal()  # a live sample (or a failed poll) arrived

    def __init__(self, client: ApiClient) -> None:
        super().__init__(client)
        self.report: dict[str, Any] | None = None
        self.sections: list[Section] = []
        self.live: LiveSample | None = None
        self.live_error: str | None = None
        self.history: deque[LiveSample] = deque(maxlen=HISTORY)
        self._polling = False

    def refresh(self) -> None:
        self.call(self.client.hardware, self._got_report, notify_loaded=True)

    def _got_report(self, report: dict[str, Any]) -> None:
        self.report = report
        self.sections = report_sections(report)

    @property
    def polling(self) -> bool:
        """Whether a live poll is in flight (then ``poll_live`` does nothing)."""
        return self._polling

    def poll_live(self) -> None:
        """Ask for one live sample, unless one is still on its way."""
        if self._polling:
            return
        self._polling = True
        tasks.run(self.client.hardware_live, self._got_live, self._live_failed)

    def _got_live(self, data: dict[str, Any]) -> None:
        self._polling = False
        self.live, self.live_error = parse_live(data), None
        self.history.append(self.live)
        self.live_changed.emit()

    def _live_failed(self, message: str) -> None:
        # not ``error``: a poll every 2 s would repeat the same message; the live panel shows it instead
        self._polling = False
        self.live_error = message
        self.live_changed.emit()
