"""``appliance ps``, ``load`` and ``unload``: a running server's models, as Ollama's and LM Studio's CLIs show them.

They ask the server over its own HTTP API, as any client would. ``ps`` reads ``/health``,
``/v1/appliance/hardware`` and ``/v1/appliance/loras``: slots busy and free, requests waiting,
the device, the memory its plan booked, idle time, and the adapters loaded on each model.
``load`` and ``unload`` call ``/v1/appliance/models/{id}/load`` and ``.../unload``.
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


def server_args(p: Any) -> None:
    p.add_argument("--url", help="the server (default: http://127.0.0.1:PORT from the settings)")
    p.add_argument("--api-key", help="its API key (default: APPLIANCE_API_KEY or config.toml)")


def add_parser(sub: Any) -> None:
    ps = sub.add_parser("ps", help="the models a running server has loaded: slots, memory, idle time, adapters")
    server_args(ps)
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    load = sub.add_parser("load", help="load a registered model into a running server now (planned beside the others)")
    load.add_argument("model", help="the model's id or alias")
    server_args(load)
    unload = sub.add_parser("unload", help="unload a model from a running server, once its running requests end")
    unload.add_argument("model", help="the model's id or alias")
    server_args(unload)


def client(url: str | None, host: str, port: int, api_key: str | None, timeout: float | None = 10) -> httpx.Client:
    """An HTTP client of the server the settings name (or ``url``)."""
    import httpx  # only these commands need an HTTP client

    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = (url or f"http://{local}:{port}").rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=timeout)


def _no_server(http: httpx.Client, exc: Exception) -> PsError:
    return PsError(f"no server answers at {http.base_url} ({exc}); start one with `appliance serve`, or give --url")


def change_state(url: str | None, host: str, port: int, api_key: str | None, model: str, action: str) -> Any:
    """``POST /v1/appliance/models/{model}/{action}`` (load or unload): the model's state afterwards."""
    import httpx

    with client(url, host, port, api_key, timeout=None) as http:
        try:
            resp = http.post(f"/v1/appliance/models/{model}/{action}")
        except httpx.TransportError as exc:
            raise _no_server(http, exc) from exc
    if resp.status_code == 401:
        raise PsError(f"{http.base_url} wants an API key: give --api-key or set APPLIANCE_API_KEY")
    if resp.status_code >= 400:
        message = resp.json().get("error", {}).get("message", resp.text[:300]) if resp.content else resp.reason_phrase
        raise PsError(f"{action} {model}: {message}")
    return resp.json()


def residency(args: argparse.Namespace, host: str, port: int, api_key: str | None) -> int:
    """``appliance load|unload MODEL``: what the server says of the model afterwards."""
    state = change_state(args.url, host, port, args.api_key or api_key, args.model, args.command)
    if state["state"] == "loaded":
        took = f" in {state['load_seconds']:.1f} s" if state.get("load_seconds") is not None else ""
        stays = state.get("keep_alive_seconds")
        keep = "stays loaded" if stays is None else f"unloaded after {stays:g} s idle"
        memory = size(state.get("memory_bytes") or 0)
        print(f"{state['id']}: loaded{took} on {state.get('device') or '?'}, {memory}; {keep}")
    else:
        print(f"{state['id']}: {state['state'].replace('_', ' ')}")
    return 0


def loaded_state(url: str | None, host: str, port: int, api_key: str | None, model: str) -> str | None:
    """The model's state on the server the settings name; None if no server answers or it does not know it."""
    import httpx

    try:
        with client(url, host, port, api_key, timeout=5) as http:
            resp = http.get(f"/v1/appliance/models/{model}/state")
    except httpx.TransportError:
        return None
    if resp.status_code != 200:
        return None
    state: str = resp.json()["state"]
    return state


def run(args: argparse.Namespace, host: str, port: int, api_key: str | None) -> int:
    import httpx

    http_client = client(args.url, host, port, args.api_key or api_key)
    try:
        with http_client as http:
            health = _get(http, "/health")
            plans = {p["model"]: p for p in _get(http, "/v1/appliance/hardware").get("plans", [])}
            adapters = _get(http, "/v1/appliance/loras").get("data", [])
    except httpx.TransportError as exc:
        raise _no_server(http_client, exc) from exc
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
