"""``kill -9`` under load: of the exchanges clients got a 200 for, how many the request log holds.

    python benchmarks/kill9.py --rounds 3 --clients 16     # the Reliability figures
    python benchmarks/kill9.py --rounds 1                  # a dry run

Each round starts its own server (``--port 0 --threads 2 --parallel 8``, the default model) in a
fresh ``APPLIANCE_HOME``; ``--clients`` clients send non-streamed chats (max_tokens 16, no
headers) and note the id and arrival time of every 200; after ``--after`` acknowledged exchanges
(or ``--max-seconds``) the server gets SIGKILL. The log database is then read with ``sqlite3``
(``SELECT id FROM exchanges``; WAL mode, as the server left it) and checked with
``PRAGMA integrity_check``, and a server is started again on the same home to see it come up.

The writer commits within ~0.2 s of an exchange, so ids acknowledged in the last ~0.3 s before
the kill may be missing by design; the round's line therefore also gives the exchanges
acknowledged more than 1 s before the kill and how many of those were recorded. A last line
holds every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import MODEL_ID, NO_LOG, PROMPTS, Server, start_server

SAFE_AGE_S = 1.0


@dataclass
class Load:
    acked: dict[str, float] = field(default_factory=dict)  # response id -> monotonic arrival of its 200
    statuses: Counter[str] = field(default_factory=Counter)
    errors_before_kill: list[str] = field(default_factory=list)


async def client_loop(client: httpx.AsyncClient, index: int, load: Load, stop: asyncio.Event) -> None:
    rng = random.Random(index)
    while not stop.is_set():
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": 16,
        }
        try:
            response = await client.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            if not stop.is_set():
                load.errors_before_kill.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
            continue
        load.statuses[str(response.status_code)] += 1
        if response.status_code == 200:
            load.acked[response.json()["id"]] = time.monotonic()
        elif not stop.is_set():
            load.errors_before_kill.append(f"{response.status_code} {response.text[:300]}")


async def load_then_kill(server: Server, args: argparse.Namespace) -> tuple[Load, float]:
    """Run the clients until ``--after`` 200s or ``--max-seconds``, SIGKILL the server; the kill's time."""
    load, stop = Load(), asyncio.Event()
    limits = httpx.Limits(max_connections=args.clients * 2)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=timeout, trust_env=False) as client:
        tasks = [asyncio.create_task(client_loop(client, i, load, stop)) for i in range(args.clients)]
        deadline = time.monotonic() + args.max_seconds
        while len(load.acked) < args.after and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        killed_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGKILL)
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
    return load, killed_at


def read_log(path: Path) -> tuple[list[str], Counter[str], str]:
    """The ids and statuses in the log and ``PRAGMA integrity_check``, read as any SQLite client would."""
    if not path.exists():
        return [], Counter(), "no database file"
    db = sqlite3.connect(path, timeout=10)
    try:
        ids = [rid for (rid,) in db.execute("SELECT id FROM exchanges")]
        statuses = Counter(status for (status,) in db.execute("SELECT status FROM exchanges"))
        integrity = str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()
    return ids, statuses, integrity


def restart(home: Path) -> dict[str, Any]:
    """Start a server on the killed one's home: does it come up, and does it still see the rows?"""
    start = time.monotonic()
    try:
        server = start_server(home, "--parallel", "8", timeout=120)
    except RuntimeError as exc:
        return {"ok": False, "error": str(exc)[-2000:]}
    try:
        up_s = time.monotonic() - start
        health = httpx.get(server.base_url + "/health", timeout=10, trust_env=False).json()
    finally:
        exit_code = server.stop()
    ids, _, integrity = read_log(server.log_db)
    return {
        "ok": health.get("status") == "ok" and exit_code == 0,
        "up_s": round(up_s, 1),
        "exit_code": exit_code,
        "rows": len(ids),
        "integrity_check": integrity,
        "problems": server.problems[:5],
    }


def one_round(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    home = tmp / f"round-{n}"
    server = start_server(home, "--parallel", "8")
    try:
        warm = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        httpx.post(server.base_url + "/v1/chat/completions", json=warm, headers=NO_LOG, timeout=60, trust_env=False)
        started = time.monotonic()
        load, killed_at = asyncio.run(load_then_kill(server, args))
        server.process.wait(10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.process.kill()
    ids, statuses, integrity = read_log(server.log_db)
    recorded = set(ids)
    safe = {rid for rid, t in load.acked.items() if killed_at - t > SAFE_AGE_S}
    missing = {rid: round((killed_at - t) * 1000) for rid, t in load.acked.items() if rid not in recorded}
    result: dict[str, Any] = {
        "round": n,
        "load_s": round(killed_at - started, 2),
        "acknowledged": len(load.acked),
        "recorded": len(recorded),
        "acknowledged_recorded": len(recorded & set(load.acked)),
        "safe_acknowledged": len(safe),
        "safe_recorded": len(safe & recorded),
        # ms before the kill each missing 200 arrived, newest first
        "missing_ms_before_kill": dict(sorted(missing.items(), key=lambda item: item[1])),
        "recorded_not_acknowledged": len(recorded - set(load.acked)),
        "log_statuses": dict(statuses),
        "integrity_check": integrity,
        "client_statuses": dict(load.statuses),
        "errors_before_kill": load.errors_before_kill[:5],
        "server_exit": server.process.returncode,
        "server_problems": server.problems[:10],
    }
    if not args.no_restart:
        result["restart"] = restart(home)
    return result


def print_round(r: dict[str, Any]) -> None:
    print(
        f"round {r['round']}: killed after {r['load_s']:.1f} s; acknowledged {r['acknowledged']}, recorded "
        f"{r['recorded']} ({r['acknowledged_recorded']} of them acknowledged, {r['recorded_not_acknowledged']} "
        f"not); acknowledged more than {SAFE_AGE_S:.0f} s before the kill: {r['safe_acknowledged']}, recorded: "
        f"{r['safe_recorded']}; integrity {r['integrity_check']}",
        flush=True,
    )
    if r["missing_ms_before_kill"]:
        missing = ", ".join(f"{rid} ({ms} ms)" for rid, ms in r["missing_ms_before_kill"].items())
        print(f"  acknowledged but missing (arrived N ms before the kill): {missing}")
    print(f"  log statuses {r['log_statuses']}; client statuses {r['client_statuses']}; server exit {r['server_exit']}")
    for error in r["errors_before_kill"]:
        print(f"  error before the kill: {error}")
    for line in r["server_problems"]:
        print(f"  server: {line[:300]}")
    if "restart" in r:
        again = r["restart"]
        if "error" in again:
            print(f"  restart on the same home FAILED: {again['error']}")
        else:
            print(
                f"  restart on the same home: up in {again['up_s']} s, exit code {again['exit_code']} after SIGTERM, "
                f"{again['rows']} rows after it stopped, integrity {again['integrity_check']}"
            )
            for line in again["problems"]:
                print(f"  restarted server: {line[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--after", type=int, default=60, help="acknowledged exchanges before the kill")
    parser.add_argument("--max-seconds", type=float, default=10, help="kill after this long in any case")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--no-restart", action="store_true", help="skip starting a server on the killed home")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="kill9-") as tmp:
        for n in range(1, args.rounds + 1):
            rounds.append(one_round(n, args, Path(tmp)))
            print_round(rounds[-1])
    total = {
        key: sum(r[key] for r in rounds)
        for key in ("acknowledged", "recorded", "acknowledged_recorded", "safe_acknowledged", "safe_recorded")
    }
    print(
        f"\nall rounds: acknowledged {total['acknowledged']}, recorded {total['recorded']}, acknowledged and "
        f"recorded {total['acknowledged_recorded']}; acknowledged more than {SAFE_AGE_S:.0f} s before the kill: "
        f"{total['safe_acknowledged']}, recorded: {total['safe_recorded']}"
    )
    print(json.dumps({"clients": args.clients, "totals": total, "rounds": rounds}))


if __name__ == "__main__":
    main()
