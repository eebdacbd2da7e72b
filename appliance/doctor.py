"""``appliance doctor [--json]``: the hardware, the engines and their backends, and every model's plan.

Without ``--model`` each model in models.toml is planned as if served alone (what it would get);
with ``--model`` the chosen ones are planned together, as ``serve`` would load them. Flags such
as ``--device`` or ``--gpu-layers`` show what they would change before a restart. A value set in
config.toml or the environment is named as such, so an override nobody remembers setting can be
found. The exit status is 1 when a model cannot be served as asked, so scripts can check it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from appliance.bootstrap import StartupError, model_request, plan_serving
from appliance.config import Paths, Settings
from appliance.hardware.detect import detect
from appliance.hardware.planner import plan_models
from appliance.hardware.report import build_report, render_text
from appliance.registry import RegistryError, load_registry
from engines.base import ModelLoadError


def run_doctor(
    settings: Settings, paths: Paths, *, as_json: bool, chosen: bool, sources: Mapping[str, str] | None = None
) -> int:
    """Print the report; 1 when a plan has an error (the report says which and why), else 0.

    ``sources`` says where each setting came from (``config.load_settings_with_sources``).
    """
    hardware = detect(settings.probe_timeout)
    try:
        registry = load_registry(paths)
    except RegistryError as exc:
        raise StartupError(str(exc)) from exc
    if chosen:
        plans = [plan for _, plan in plan_serving(settings, paths, registry, hardware, sources)]
    else:
        chat = [spec for spec in registry if spec.kind == "chat"]  # embedding models are small and load on demand
        plans = [plan_models(hardware, [model_request(spec, settings, paths, sources)])[0] for spec in chat]
    report = build_report(hardware, plans)
    if as_json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(render_text(report, registry.default_model))
    return 1 if any(plan.error for plan in plans) else 0


def run_onnx_check(path: Path, *, as_json: bool) -> int:
    """``appliance doctor --onnx-model FILE``: one inference through onnxruntime; 1 when it fails."""
    from engines.onnx import check_model

    try:
        check = check_model(path)
    except ModelLoadError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(dataclasses.asdict(check), indent=2))
        return 0
    shapes = ", ".join(f"{t.name} {list(t.shape)}" for t in check.outputs)
    values = ", ".join(f"{v:.6g}" for v in check.first_values)
    print(f"{check.path}: ran on {check.provider} (load {check.load_ms} ms, run {check.run_ms} ms)")
    print(f"  outputs: {shapes}" + (f"; first values: {values}" if values else ""))
    return 0
