"""Backpressure over real HTTP: a full queue answers 503 + Retry-After at once, a long wait times
out clearly, and both show up in /health and /metrics. One slot, one queue place, real model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from tests.conftest import DEFAULT_MODEL, LiveServer


def chat_body(**extra: object) -> dict[str, object]:
    return {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 8,
        **extra,
    }


def test_full_queue_503_then_queue_timeout(start_server: Callable[..., LiveServer]) -> None:
    server = start_server("--parallel", "1", "--max-queue", "1", "--queue-timeout", "1", "--ctx-size", "1024")
    url = server.base_url
    busy_body = {"model": DEFAULT_MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0, "stream": True}
    first_token, done = threading.Event(), threading.Event()

    def busy() -> None:  # holds the only slot until the checks are done, then hangs up (which frees it)
        with httpx.stream("POST", f"{url}/v1/completions", json=busy_body, timeout=60) as response:
            for _ in response.iter_lines():
                first_token.set()
                if done.is_set():
                    break

    busy_thread = threading.Thread(target=busy)
    busy_thread.start()
    assert first_token.wait(30)
    waiting: dict[str, httpx.Response] = {}
    waiter = threading.Thread(
        target=lambda: waiting.update(r=httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=30))
    )
    waiter.start()
    deadline = time.monotonic() + 5
    while server.model_stats()["queued"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = server.model_stats()
    assert (stats["active"], stats["queued"], stats["slots"]) == (1, 1, 1)

    started = time.monotonic()
    full = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=30)
    assert time.monotonic() - started < 1.0
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    assert full.json()["error"]["code"] == "server_overloaded"
    assert full.json()["error"]["type"] == "server_error"

    waiter.join(30)
    timed_out = waiting["r"]
    assert timed_out.status_code == 503 and timed_out.headers["Retry-After"]
    error = timed_out.json()["error"]
    assert error["code"] == "queue_timeout" and "queue timeout" in error["message"]

    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    label = f'{{model="{DEFAULT_MODEL}"}}'
    assert f"appliance_requests_rejected_total{label} 1.0" in metrics
    assert f"appliance_queue_timeouts_total{label} 1.0" in metrics
    assert f"appliance_slots{label} 1.0" in metrics
    for name in (
        "queue_depth",
        "slots_active",
        "tokens_per_second",
        "prefix_cache_hits_total",
        "completion_tokens_total",
    ):
        assert f"appliance_{name}{label}" in metrics

    done.set()  # the busy client hangs up; the slot frees once the server notices (a loaded machine: seconds)
    busy_thread.join(60)
    deadline = time.monotonic() + 30
    while (stats := server.model_stats())["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["active"] == 0, stats
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=30)  # and it serves normally again
    assert ok.status_code == 200, ok.text
