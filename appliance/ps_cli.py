"""``appliance ps``: the models a running server has loaded, as Ollama's and LM Studio's ``ps`` show them.

It asks the server over its own HTTP API (``/health``, ``/v1/appliance/hardware``,
``/v1/appliance/loras``), as any client would: slots busy and free, requests waiting, the
device, the memory its plan booked, idle time, and the adapters loaded on each model.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from appliance.hardware.facts import size

if TYPE_CHECKING:
    import httpx


class PsError(Exception):
    """No server answered, or it refused; the message says which and what to do."""


def add_parser(sub: Any) -> None:
    ps = sub.add_parser("ps", help="the models a running server has loaded: slots, memory, idle time, adapters")
    ps.add_argument("--url", help="the server (default: http://127.0.0.1:PORT from the settings)")
    ps.add_argument("--api-key", help="its API key (default: APPLIANCE_API_KEY or config.toml)")
    ps.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, host: str, port: int, api_key: str | None) -> int:
    import httpx  # only this command needs an HTTP client

    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = (args.url or f"http://{local}:{port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key or api_key}"} if (args.api_key or api_key) else {}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
            health = _get(http, "/health")
            plans = {p["model"]: p for p in _get(http, "/v1/appliance/hardware").get("plans", [])}
            adapters = _get(http, "/v1/appliance/loras").get("data", [])
    except httpx.TransportError as exc:
        raise PsError(f"no server answers at {base} ({exc}); start one with `appliance serve`, or give --url") from exc
    rows = []
    for stats in health.get("models", []):
        plan = plans.get(stats["model"], {})
        rows.append(
            {
                "model": stats["model"],
                "engine": plan.get("engine"),
                "device": plan.get("device", {}).get("value"),
                "memory_bytes": sum(m["weights"] + m["kv_cache"] + m["compute"] for m in plan.get("memory", [])),
                "slots": stats["slots"],
                "active": stats["active"],
                "queued": stats["queued"],
                "idle_seconds": stats.get("idle_seconds", 0.0),
                "adapters": sorted(a["name"] for a in adapters if a.get("base") == stats["model"] and a.get("loaded")),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<32} {'ENGINE':<6} {'DEVICE':<8} {'MEMORY':>9} {'SLOTS':>9} {'QUEUED':>6}  {'STATE':<12} ADAPTERS")
    for row in rows:
        busy = f"{row['active']}/{row['slots']} busy"
        idle = "busy" if row["active"] or row["queued"] else f"idle {row['idle_seconds']:.0f} s"
        print(
            f"{row['model']:<32} {row['engine'] or '?':<6} {row['device'] or '?':<8} {size(row['memory_bytes']):>9} "
            f"{busy:>9} {row['queued']:>6}  {idle:<12} {', '.join(row['adapters']) or '-'}"
        )
    return 0


def _get(http: httpx.Client, path: str) -> dict[str, Any]:
    resp = http.get(path)
    if resp.status_code == 401:
        raise PsError(f"{http.base_url} wants an API key: give --api-key or set APPLIANCE_API_KEY")
    if resp.status_code >= 400 and path != "/health":  # a shutting-down server still answers /health (503)
        raise PsError(f"{http.base_url}{path} answered {resp.status_code}: {resp.text[:200]}")
    data: dict[str, Any] = resp.json()
    return data
