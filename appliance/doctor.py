"""``appliance doctor [--json]``: the hardware, the engines and their backends, and every model's plan.

Without ``--model`` each model in models.toml is planned as if served alone (what it would get);
with ``--model`` the chosen ones are planned together, as ``serve`` would load them. Flags such
as ``--device`` or ``--gpu-layers`` show what they would change before a restart.
"""

from __future__ import annotations

import json

from appliance.bootstrap import StartupError, model_request, plan_serving
from appliance.config import Paths, Settings
from appliance.hardware.detect import detect
from appliance.hardware.planner import plan_models
from appliance.hardware.report import build_report, render_text
from appliance.registry import RegistryError, load_registry


def run_doctor(settings: Settings, paths: Paths, *, as_json: bool, chosen: bool) -> int:
    hardware = detect(settings.probe_timeout)
    try:
        registry = load_registry(paths)
    except RegistryError as exc:
        raise StartupError(str(exc)) from exc
    if chosen:
        plans = [plan for _, plan in plan_serving(settings, paths, registry, hardware)]
    else:
        plans = [plan_models(hardware, [model_request(spec, settings, paths)])[0] for spec in registry]
    report = build_report(hardware, plans)
    if as_json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(render_text(report, registry.default_model))
    return 0
