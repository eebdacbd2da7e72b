"""A bounded soak: many clients for a few minutes, good, bad and cut requests mixed, then the ledger.

    python benchmarks/soak.py --clients 64 --duration 180      # the Reliability figures (--parallel 8)
    python benchmarks/soak.py --clients 8 --duration 20        # a dry run

It starts its own server (``python -m appliance serve --port 0 --threads 2``, the default model) in
a fresh temporary ``APPLIANCE_HOME`` and stops it at the end (SIGTERM, then kill). Each client
loops until the duration is over, every time picking one kind of request at random: a chat
(max_tokens 16-48), a streamed chat with ``stream_options.include_usage``, a completion (plain
or streamed), a stream the client cuts after a few chunks, or a bad request that must get a 4xx
(invalid JSON, unknown model, ``max_tokens`` 0, ``n`` 2, no messages).

Printed: per kind, the count, HTTP statuses, transport errors, 5xx, streams that ended without
``[DONE]`` or an ``error`` event, latency p50/p95; the server's RSS before traffic, every 10 s,
and after traffic plus 5 s idle; ``/health``'s request log figures; and whether the request log
database holds a row, with the same HTTP status, for every response a client got. 503s are
counted apart: overload answers may be stored compactly or rate-limited. Anything that looked
wrong is printed with the request and the response. The last line holds every figure as JSON.

``start_server`` and ``Server`` are shared with ``kill9.py`` and ``ttft_transport.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

MODEL_ID = "smollm2-135m-instruct"
SERVE_LINE = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)")
PROBLEM_LINE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
REPO = Path(__file__).resolve().parents[1]
NO_LOG = {"X-Appliance-Log": "off"}  # warm-up requests stay out of the request log
PROMPTS = [
    "Name three primary colors.",
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea.",
    "Explain how a bicycle works.",
    "Give one tip for learning to cook.",
    "Describe a busy market in the morning.",
    "What is a computer network?",
    "List four fruits.",
]


# -- the server under test ----------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    home: Path
    port: int = 0
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=300))
    problems: list[str] = field(default_factory=list)  # its WARNING/ERROR lines, the first 200

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_db(self) -> Path:
        return self.home / "requests.sqlite"

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.problems.append(f"did not exit within {timeout:.0f} s of SIGTERM; killed")
            self.process.kill()
            return self.process.wait(10)


def start_server(home: Path, *args: str, timeout: float = 180) -> Server:
    """``python -m appliance serve --port 0 --threads 2 ARGS`` with ``home`` as its app home, once healthy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", "0", "--threads", "2", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, home)
    found = threading.Event()
    stdout = proc.stdout
    assert stdout is not None

    def reader() -> None:  # also keeps the pipe drained for the server's whole life
        for line in stdout:
            server.lines.append(line)
            if PROBLEM_LINE.search(line) and len(server.problems) < 200:
                server.problems.append(line.rstrip())
            match = SERVE_LINE.search(line)
            if match and not found.is_set():
                server.port = int(match.group(1))
                found.set()

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop(5)
            raise RuntimeError("server did not start:\n" + "".join(server.lines))
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.base_url + "/health", timeout=2, trust_env=False).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop(5)
    raise RuntimeError("server never became healthy:\n" + "".join(server.lines))


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def read_exchanges(path: Path) -> dict[str, tuple[str, int | None]]:
    """id -> (status, http_status) of every row of the request log (a plain reader, WAL mode)."""
    if not path.exists():
        return {}
    db = sqlite3.connect(path, timeout=10)
    try:
        return {
            rid: (status, code) for rid, status, code in db.execute("SELECT id, status, http_status FROM exchanges")
        }
    finally:
        db.close()


# -- the traffic ----------------------------------------------------------------------------

WEIGHTS = {
    "chat": 25,
    "chat_stream": 25,
    "completion": 12,
    "completion_stream": 8,
    "cut_stream": 10,
    "bad_json": 4,
    "bad_model": 4,
    "bad_max_tokens": 4,
    "bad_n": 4,
    "bad_no_messages": 4,
}
STREAMED = {"chat_stream", "completion_stream", "cut_stream"}
OVERLOAD_PAUSE_S = 0.5


@dataclass
class Outcome:
    kind: str
    status: int | None = None  # None: no response (transport error)
    response_id: str | None = None  # the X-Request-Id header, which the log keys on
    latency: float = 0.0
    transport_error: str | None = None
    end: str | None = None  # streams: done, error_event, cut, truncated
    problem: str | None = None  # something that looked wrong, with the request and the response


def make_request(kind: str, rng: random.Random) -> tuple[str, dict[str, Any] | bytes]:
    """The path and JSON body (or raw bytes) of one request of ``kind``."""
    prompt = rng.choice(PROMPTS)
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(16, 48)}
    if kind == "chat":
        return "/v1/chat/completions", chat
    if kind == "chat_stream":
        return "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}
    if kind == "cut_stream":
        return "/v1/chat/completions", {**chat, "max_tokens": rng.randint(64, 128), "stream": True}
    if kind in ("completion", "completion_stream"):
        body: dict[str, Any] = {"model": MODEL_ID, "prompt": prompt, "max_tokens": rng.randint(16, 48)}
        if kind == "completion_stream":
            body.update(stream=True, stream_options={"include_usage": True})
        return "/v1/completions", body
    if kind == "bad_json":
        return "/v1/chat/completions", b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", '
    if kind == "bad_model":
        return "/v1/chat/completions", {**chat, "model": "no-such-model", "stream": rng.random() < 0.5}
    if kind == "bad_max_tokens":
        return "/v1/chat/completions", {**chat, "max_tokens": 0}
    if kind == "bad_n":
        return "/v1/chat/completions", {**chat, "n": 2}
    if kind == "bad_no_messages":
        return "/v1/chat/completions", {"model": MODEL_ID, "messages": []}
    raise ValueError(kind)


def describe(path: str, body: dict[str, Any] | bytes, response: str) -> str:
    sent = body.decode() if isinstance(body, bytes) else json.dumps(body)
    return f"POST {path} {sent} -> {response[:600]}"


async def send(client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
    path, body = make_request(kind, rng)
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    if isinstance(body, bytes):
        kwargs["headers"] = {"Content-Type": "application/json"}
    out = Outcome(kind)
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, **kwargs) as response:
            out.status = response.status_code
            out.response_id = response.headers.get("x-request-id")
            streaming = response.headers.get("content-type", "").startswith("text/event-stream")
            if streaming:
                await read_stream(response, out, path, body, cut_after=rng.randint(2, 5) if kind == "cut_stream" else 0)
            else:
                text = (await response.aread()).decode(errors="replace")
                check_plain(out, path, body, text)
    except (httpx.HTTPError, httpx.StreamError) as exc:  # TransportError mostly; any is counted, none stops the soak
        out.transport_error = type(exc).__name__
        out.problem = describe(path, body, f"{type(exc).__name__}: {exc}")
    out.latency = time.perf_counter() - start
    return out


def check_plain(out: Outcome, path: str, body: dict[str, Any] | bytes, text: str) -> None:
    """A non-streamed answer: the status its kind should get, and the id of the body in the header."""
    status = out.status or 0
    bad = out.kind.startswith("bad_")
    if status == 503:
        return  # overload, counted apart
    if (bad and not 400 <= status < 500) or (not bad and status != 200):
        out.problem = describe(path, body, f"{status} {text}")
        return
    if status == 200:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            out.problem = describe(path, body, f"200 but not JSON: {text}")
            return
        if data.get("id") != out.response_id:
            out.problem = describe(path, body, f"200, body id {data.get('id')} != X-Request-Id {out.response_id}")
        elif not data.get("choices") or data["choices"][0].get("finish_reason") not in ("stop", "length"):
            out.problem = describe(path, body, f"200 without a finish_reason: {text}")


async def read_stream(
    response: httpx.Response, out: Outcome, path: str, body: dict[str, Any] | bytes, *, cut_after: int
) -> None:
    """Read SSE events until ``[DONE]``, an error event, the end, or (``cut_after``) the client's cut."""
    chunks, finish, usage, last = 0, None, False, ""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        last = line
        data = line[len("data: ") :]
        if data == "[DONE]":
            if out.end == "error_event":
                out.problem = describe(path, body, f"{out.status} stream: [DONE] after an error event")
            out.end = "done"
            break
        try:
            event = json.loads(data)
        except ValueError:
            out.problem = describe(path, body, f"{out.status} stream, an event that is not JSON: {line}")
            continue
        if "error" in event:
            out.end = "error_event"
            out.problem = describe(path, body, f"{out.status} stream, error event: {data}")
            continue  # the server stops after it; anything more would show as a problem below
        chunks += 1
        usage = usage or bool(event.get("usage"))
        for choice in event.get("choices", []):
            finish = choice.get("finish_reason") or finish
        if cut_after and chunks >= cut_after:
            out.end = "cut"
            return  # leaving the ``stream`` block closes the response: the client is gone
    if out.end is None:
        out.end = "truncated"
        out.problem = describe(path, body, f"{out.status} stream ended after {chunks} chunks without [DONE]: {last}")
    elif out.end == "done" and finish is None:
        out.problem = describe(path, body, "stream ended with [DONE] but no finish_reason")
    elif out.end == "done" and not usage and isinstance(body, dict) and body.get("stream_options"):
        out.problem = describe(path, body, "include_usage set but the stream carried no usage chunk")


async def client_loop(
    client: httpx.AsyncClient, index: int, seed: int, until: float, max_requests: int
) -> list[Outcome]:
    rng = random.Random(seed * 1000 + index)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    outcomes: list[Outcome] = []
    while time.monotonic() < until and len(outcomes) < max_requests:
        outcomes.append(await send(client, rng.choices(kinds, weights)[0], rng))
        if outcomes[-1].status == 503:
            await asyncio.sleep(OVERLOAD_PAUSE_S)  # as a polite client would; Retry-After asks for more
    return outcomes


async def sample_rss(pid: int, every: float, samples: list[tuple[float, float]], start: float) -> None:
    while True:
        await asyncio.sleep(every)
        samples.append((time.monotonic() - start, rss_mib(pid)))


async def soak(server: Server, args: argparse.Namespace) -> tuple[list[Outcome], list[tuple[float, float]]]:
    limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=timeout, trust_env=False) as client:
        start = time.monotonic()
        samples: list[tuple[float, float]] = [(0.0, rss_mib(server.process.pid))]
        sampler = asyncio.create_task(sample_rss(server.process.pid, 10, samples, start))
        until = start + args.duration
        loops = [client_loop(client, i, args.seed, until, args.max_requests_per_client) for i in range(args.clients)]
        try:
            results = await asyncio.wait_for(asyncio.gather(*loops), args.duration + args.request_timeout + 30)
        finally:
            sampler.cancel()
    return [o for per_client in results for o in per_client], samples


# -- the ledger -----------------------------------------------------------------------------


def kind_table(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for kind in WEIGHTS:
        mine = [o for o in outcomes if o.kind == kind]
        latencies = [o.latency * 1000 for o in mine if is_answered(o)]
        table[kind] = {
            "count": len(mine),
            "statuses": dict(sorted(Counter(str(o.status) for o in mine if o.status is not None).items())),
            "transport_errors": dict(Counter(o.transport_error for o in mine if o.transport_error)),
            "503": sum(1 for o in mine if o.status == 503),
            "other_5xx": sum(1 for o in mine if o.status is not None and o.status >= 500 and o.status != 503),
            "bad_stream_ends": sum(1 for o in mine if o.end == "truncated"),
            "stream_ends": dict(Counter(o.end for o in mine if o.end)) if kind in STREAMED else {},
            "p50_ms": round(median(latencies), 1),
            "p95_ms": round(percentile(latencies, 0.95), 1),
        }
    return table


def print_kind_table(table: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'kind':18s} {'count':>6s}  {'statuses':24s} {'transport':>9s} {'503':>5s} {'5xx':>4s} {'no end':>6s}"
        f" {'p50 ms':>8s} {'p95 ms':>8s}  stream ends"
    )
    for kind, row in table.items():
        statuses = " ".join(f"{code}:{n}" for code, n in row["statuses"].items()) or "-"
        transport = sum(row["transport_errors"].values())
        ends = " ".join(f"{end}:{n}" for end, n in sorted(row["stream_ends"].items()))
        print(
            f"{kind:18s} {row['count']:6d}  {statuses:24s} {transport:9d} {row['503']:5d} {row['other_5xx']:4d}"
            f" {row['bad_stream_ends']:6d} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f}  {ends}"
        )


def is_answered(o: Outcome) -> bool:
    """A response read to its end (or cut by the client on purpose): a transport error mid-way is the client's loss."""
    return o.status is not None and o.transport_error is None


def expected_status(o: Outcome) -> str:
    """The ``status`` column the request log should hold for what this client saw."""
    assert o.status is not None
    if o.status >= 500:
        return "server_error"
    if o.status >= 400:
        return "client_error"
    return "cancelled" if o.end in ("cut", "error_event") else "ok"  # an error event: cancelled or server_error


def check_log(outcomes: list[Outcome], rows: dict[str, tuple[str, int | None]], not_logged: int) -> dict[str, Any]:
    """Every response a client got against the log's rows.

    A 200 (something was generated) must have its row. Refusals (4xx, 503: nothing generated) are
    kept at most 60 a minute and otherwise only counted (``not_logged``, from ``/health``), so for
    them the check is: answered = logged + counted.
    """
    answered = [o for o in outcomes if is_answered(o) and o.response_id]
    generated = [o for o in answered if o.status == 200]
    refused = [o for o in answered if o.status is not None and o.status >= 400]
    row_of = {o.response_id: rows[o.response_id] for o in answered if o.response_id in rows}
    missing = [o for o in generated if o.response_id not in row_of]
    logged = [(o, *row_of[o.response_id]) for o in answered if o.response_id in row_of]
    other_http = [(o, http) for o, _, http in logged if http != o.status]
    other_status = [
        (o, status)
        for o, status, _ in logged
        if status != expected_status(o)
        # a cut stream the server had finished writing before it saw the cut is rightly "ok"
        and not (o.end == "cut" and status == "ok")
        and not (o.end == "error_event" and status == "server_error")
    ]
    refused_logged = [o for o in refused if o.response_id in rows]
    seen_ids = {o.response_id for o in outcomes if o.response_id}
    return {
        "rows": len(rows),
        "logged_by_status": dict(sorted(Counter(status for status, _ in rows.values()).items())),
        "generated": len(generated),
        "generated_logged": len(generated) - len(missing),
        "generated_by_status": dict(sorted(Counter(expected_status(o) for o in generated).items())),
        "generated_missing": len(missing),
        "generated_missing_by_kind": dict(Counter(o.kind for o in missing)),
        "missing_examples": [o.response_id for o in missing[:5]],
        "refused": len(refused),
        "refused_4xx": sum(1 for o in refused if o.status is not None and o.status < 500),
        "refused_503": sum(1 for o in refused if o.status == 503),
        "refused_other_5xx": sum(1 for o in refused if o.status is not None and o.status >= 500 and o.status != 503),
        "refused_logged": len(refused_logged),
        "refused_503_logged": sum(1 for o in refused_logged if o.status == 503),
        "refusals_not_logged": not_logged,
        "refused_unaccounted": len(refused) - len(refused_logged) - not_logged,
        "other_http_status": len(other_http),
        "other_http_examples": [
            f"{o.response_id} {o.kind}: client {o.status}, log {http}" for o, http in other_http[:5]
        ],
        "other_status": len(other_status),
        "other_status_examples": [
            f"{o.response_id} {o.kind} end={o.end}: expected {expected_status(o)}, log {s}" for o, s in other_status[:5]
        ],
        "rows_no_client_saw": len(set(rows) - seen_ids),
    }


def print_ledger(ledger: dict[str, Any]) -> None:
    print(
        f"request log: {ledger['rows']} rows {ledger['logged_by_status']}\n"
        f"  answered 200: {ledger['generated']} {ledger['generated_by_status']}, logged {ledger['generated_logged']},"
        f" missing {ledger['generated_missing']} {ledger['generated_missing_by_kind'] or ''}\n"
        f"  refused (4xx {ledger['refused_4xx']}, 503 {ledger['refused_503']}, other 5xx "
        f"{ledger['refused_other_5xx']}): {ledger['refused']}, logged {ledger['refused_logged']} (503s "
        f"{ledger['refused_503_logged']}), only counted (refusals_not_logged) {ledger['refusals_not_logged']}, "
        f"unaccounted {ledger['refused_unaccounted']}\n"
        f"  rows with another http_status {ledger['other_http_status']}, another status {ledger['other_status']}, "
        f"rows no client saw an answer for {ledger['rows_no_client_saw']}"
    )
    for key in ("missing_examples", "other_http_examples", "other_status_examples"):
        for example in ledger[key]:
            print(f"  {key.removesuffix('_examples')}: {example}")


def settle_health(server: Server, timeout: float = 20) -> dict[str, Any]:
    """``/health`` once the log has nothing pending (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        health: dict[str, Any] = httpx.get(server.base_url + "/health", timeout=10, trust_env=False).json()
        if health.get("request_log", {}).get("pending", 0) == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=180, help="seconds of traffic")
    parser.add_argument("--parallel", type=int, default=8, help="the server's slots")
    parser.add_argument("--max-queue", type=int, help="the server's --max-queue (default: its own, 64)")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--max-requests-per-client", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    extra = ["--max-queue", str(args.max_queue)] if args.max_queue else []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server = start_server(Path(tmp) / "home", "--parallel", str(args.parallel), *extra)
        try:
            warm = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            url = server.base_url + "/v1/chat/completions"
            httpx.post(url, json=warm, headers=NO_LOG, timeout=60, trust_env=False).raise_for_status()
            print(
                f"server pid {server.process.pid} on {server.base_url}, home {server.home}; "
                f"{args.clients} clients for {args.duration:.0f} s",
                flush=True,
            )
            rss_before = rss_mib(server.process.pid)
            started = time.monotonic()
            outcomes, samples = asyncio.run(soak(server, args))
            traffic_s = time.monotonic() - started
            time.sleep(5)
            rss_after = rss_mib(server.process.pid)
            health = settle_health(server)
            rows = read_exchanges(server.log_db)
        finally:
            exit_code = server.stop()
    table = kind_table(outcomes)
    log_status = health.get("request_log", {})
    ledger = check_log(outcomes, rows, int(log_status.get("refusals_not_logged", 0)))
    rss: dict[str, Any] = {
        "before": round(rss_before, 1),
        "after": round(rss_after, 1),
        "max": round(max([rss_after, *(r for _, r in samples)]), 1),
        "samples": [[round(t), round(r, 1)] for t, r in samples],
    }
    problems = [o.problem for o in outcomes if o.problem]
    answered = sum(1 for o in outcomes if is_answered(o))
    print(f"\n{len(outcomes)} requests in {traffic_s:.1f} s ({len(outcomes) / traffic_s:.1f}/s), {answered} answered\n")
    print_kind_table(table)
    print(
        f"\nRSS MiB: before {rss['before']}, after (+5 s idle) {rss['after']}, max {rss['max']}; "
        f"every 10 s: {' '.join(str(r) for _, r in rss['samples'])}"
    )
    print(f"/health: {health.get('status')}; request_log {json.dumps(log_status)}")
    print_ledger(ledger)
    print(f"server: exit code {exit_code} after SIGTERM; {len(server.problems)} WARNING/ERROR lines")
    for line in server.problems[:10]:
        print(f"  {line[:300]}")
    print(f"client-side problems: {len(problems)}")
    for problem, n in Counter(problems).most_common(10):
        print(f"  {n}x {problem}")
    summary = {
        "clients": args.clients,
        "duration_s": args.duration,
        "parallel": args.parallel,
        "requests": len(outcomes),
        "answered": answered,
        "kinds": table,
        "rss_mib": {k: v for k, v in rss.items() if k != "samples"},
        "health_status": health.get("status"),
        "request_log": log_status,
        "ledger": {k: v for k, v in ledger.items() if not k.endswith("_examples")},
        "model": health.get("models", [{}])[0],
        "server_exit_code": exit_code,
        "server_problem_lines": len(server.problems),
        "client_problems": len(problems),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
