"""The request log with the real model behind a live server: what is recorded, and that it lasts.

Streamed, non-streamed, cancelled and refused requests each become one record with the response
id the client saw; kill -9 loses nothing that completed a second before; opting out works.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, LiveServer

USER = [{"role": "user", "content": "Name one colour. Reply to ops@example.com"}]


def logged(server: LiveServer, record_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{server.base_url}/v1/appliance/logs/{record_id}", timeout=10)
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]
        time.sleep(0.1)


def test_non_streamed_chat_is_recorded_in_full(live_server: LiveServer, client: Any) -> None:
    response = client.chat.completions.create(model=DEFAULT_MODEL, messages=USER, max_tokens=8, temperature=0)
    row = logged(live_server, response.id)
    assert row["status"] == "ok" and row["http_status"] == 200 and row["stream"] is False
    assert row["endpoint"] == "chat.completions" and row["client"] == "local"
    assert (row["model"], row["quantization"], row["engine"], row["backend"], row["device"]) == (
        DEFAULT_MODEL,
        "Q4_1",
        "gguf",
        "llama.cpp",
        "cpu",
    )
    assert len(row["model_sha256"]) == 64
    assert row["request"]["messages"][0]["content"] == "Name one colour. Reply to [REDACTED:email]"
    assert row["request"]["max_tokens"] == 8 and row["request"]["temperature"] == 0
    assert row["response_text"] == response.choices[0].message.content
    assert row["finish_reason"] == response.choices[0].finish_reason
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
    )
    assert 0 < row["ttft_ms"] <= row["latency_ms"] and row["tokens_per_s"] > 0


def test_streamed_chat_is_recorded_with_the_streamed_text(live_server: LiveServer, client: Any) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=USER, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    row = logged(live_server, chunks[0].id)
    assert row["stream"] is True and row["status"] == "ok" and row["response_text"] == text
    assert row["completion_tokens"] > 0 and row["ttft_ms"] > 0


def test_client_cut_stream_is_recorded_as_cancelled_with_what_was_sent(live_server: LiveServer) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
    body = {"model": DEFAULT_MODEL, "messages": story, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{live_server.base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        record_id = resp.headers["x-request-id"]
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 6:
                break
    row = logged(live_server, record_id)
    assert row["status"] == "cancelled" and row["error"] == "the client went away"
    assert 0 < row["completion_tokens"] < 300 and row["response_text"]


def test_refused_requests_are_client_errors(live_server: LiveServer) -> None:
    too_long = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}
    r = httpx.post(f"{live_server.base_url}/v1/chat/completions", json=too_long, timeout=60)
    assert r.status_code == 400
    row = logged(live_server, r.headers["x-request-id"])
    assert (row["status"], row["http_status"]) == ("client_error", 400)
    assert "maximum context length" in row["error"]
    invalid = {"model": DEFAULT_MODEL, "prompt": "x", "temperature": "hot"}
    r = httpx.post(f"{live_server.base_url}/v1/completions", json=invalid, timeout=60)
    row = logged(live_server, r.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["request"]["temperature"]) == ("completions", "client_error", "hot")
    r = httpx.post(f"{live_server.base_url}/v1/chat/completions", json={**too_long, "model": "nope"}, timeout=60)
    assert r.status_code == 404 and logged(live_server, r.headers["x-request-id"])["model"] == "nope"


def test_unix_socket_client_and_completions_endpoint(live_server: LiveServer) -> None:
    assert live_server.socket is not None
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(live_server.socket)), timeout=60) as unix:
        r = unix.post("http://appliance/v1/completions", json={"model": DEFAULT_MODEL, "prompt": ["A", "B"]})
    row = logged(live_server, r.json()["id"])
    assert row["client"] == "unix-socket" and row["endpoint"] == "completions"
    assert [c["text"] for c in row["response"]["choices"]] == [c["text"] for c in r.json()["choices"]]


def test_header_opt_out_skips_one_request(live_server: LiveServer) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": "Hello", "max_tokens": 2}
    r = httpx.post(f"{live_server.base_url}/v1/completions", json=body, headers={"X-Appliance-Log": "off"}, timeout=60)
    assert r.status_code == 200
    missing = httpx.get(f"{live_server.base_url}/v1/appliance/logs/{r.json()['id']}", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "log_not_found"


def test_feedback_and_listing_over_http(live_server: LiveServer, client: Any) -> None:
    response = client.completions.create(model=DEFAULT_MODEL, prompt="The sky is", max_tokens=3)
    base = f"{live_server.base_url}/v1/appliance/logs"
    logged(live_server, response.id)
    r = httpx.post(f"{base}/{response.id}/feedback", json={"rating": -1, "correction": "blue", "tags": ["sky"]})
    assert r.status_code == 200 and (r.json()["rating"], r.json()["correction"]) == (-1, "blue")
    listing = httpx.get(base, params={"tag": "sky", "rating": -1}).json()
    assert [row["id"] for row in listing["data"]] == [response.id] and listing["total"] == 1
    assert httpx.get(base, params={"q": "the sky is", "limit": 1}).json()["data"][0]["id"] == response.id
    bad = httpx.post(f"{base}/{response.id}/feedback", json={"rating": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    assert httpx.post(f"{base}/nope/feedback", json={"rating": 1}).status_code == 404
    assert httpx.get(base, params={"since": "yesterday"}).status_code == 400
    assert live_server.health()["request_log"]["error"] is None


def test_no_log_records_nothing(start_server: Callable[..., LiveServer]) -> None:
    server = start_server("--no-log")
    r = httpx.post(f"{server.base_url}/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    assert server.health()["request_log"] == {"enabled": False}
    assert httpx.get(f"{server.base_url}/v1/appliance/logs").json()["error"]["code"] == "request_log_disabled"
    assert not (server.home / "requests.sqlite").exists()
    assert any("request log: off" in line for line in server.output)


def test_kill_9_loses_no_completed_exchange(start_server: Callable[..., LiveServer]) -> None:
    server = start_server("--parallel", "4")
    assert any("request log: on" in line for line in server.output)
    ids = []
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for i in range(12):
            body = {"model": DEFAULT_MODEL, "prompt": f"Number {i}:", "max_tokens": 3, "stream": i % 2 == 0}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200
            ids.append(r.headers["x-request-id"])
    time.sleep(1.0)
    server.stop(signal.SIGKILL)
    conn = sqlite3.connect(server.home / "requests.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in conn.execute("SELECT id FROM exchanges WHERE status = 'ok'")}
    assert stored == set(ids)


@pytest.mark.parametrize("value", ["off", "OFF", "0"])
def test_opt_out_values(value: str) -> None:
    from appliance.api.recording import OPT_OUT_VALUES

    assert value.lower() in OPT_OUT_VALUES
