"""``/v1/appliance/requests``: live requests with growing counts, cancelling them, and what a cancel leaves.

The app runs in-process (FastAPI's TestClient, which streams) around a real scheduler with the
real default model and two slots, so a third request waits in the queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api.requests import CANCEL_REASON, request_info
from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.requestlog.record import ExchangeRecord
from appliance.scheduler import RequestSnapshot, Scheduler
from tests.conftest import DEFAULT_MODEL
from tests.test_api_errors import chat

ROUTE = "/v1/appliance/requests"
LONG = {"model": DEFAULT_MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 300, "temperature": 0, "stream": True}
WAIT_S = 10.0


class CollectingLog:
    """A request log that keeps the records in memory (the real writer is tested elsewhere)."""

    def __init__(self, path: Path) -> None:
        self.path: Path | None = path
        self.records: list[ExchangeRecord] = []

    def submit(self, record: ExchangeRecord) -> bool:
        self.records.append(record)
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "error": None}

    def close(self, timeout: float = 10.0) -> None:
        return None


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    sched = build_scheduler(Settings(ctx_size=512, parallel=2, threads=2), Paths(tmp_path_factory.mktemp("home")))
    yield sched
    sched.stop()


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> CollectingLog:
    return CollectingLog(tmp_path_factory.mktemp("log") / "requests.sqlite")


@pytest.fixture(scope="module")
def http(scheduler: Scheduler, log: CollectingLog) -> Iterator[TestClient]:
    app = create_app(scheduler, Settings(ctx_size=512), request_log=log)
    with TestClient(app, base_url="http://localhost") as client:
        yield client


def listing(http: TestClient) -> dict[str, Any]:
    resp = http.get(ROUTE)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def live(http: TestClient, request_id: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [r for r in listing(http)["data"] if r["id"] == request_id]
    assert len(entries) == 1, entries
    return entries[0]


def events(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """The next ``count`` SSE data events of a stream."""
    out: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith("data: {"):
            out.append(json.loads(line.removeprefix("data: ")))
            if len(out) == count:
                break
    return out


def rest(lines: Iterator[str]) -> list[str]:
    return [line for line in lines if line.startswith("data: ")]


def wait_for_record(log: CollectingLog, request_id: str) -> ExchangeRecord:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = [r for r in log.records if r.id == request_id]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"{request_id} was never logged")


def test_a_running_stream_shows_live_then_cancelling_ends_it(http: TestClient, log: CollectingLog) -> None:
    with http.stream("POST", "/v1/completions", json=LONG) as resp:
        assert resp.status_code == 200
        request_id = resp.headers["x-request-id"]
        lines = resp.iter_lines()
        events(lines, 3)
        first = live(http, request_id)
        assert first["state"] == "generating" and first["status"] == "running"
        assert first["model"] == DEFAULT_MODEL and first["client"] == "local" and first["adapters"] == []
        assert first["prompt_tokens"] > 0 and first["prompt_tokens_done"] == first["prompt_tokens"]
        assert first["completion_tokens"] >= 1 and first["max_tokens"] == 300
        assert first["ttft_ms"] is not None and first["queue_ms"] is not None and first["finished_at"] is None
        events(lines, 10)
        second = live(http, request_id)
        assert second["completion_tokens"] > first["completion_tokens"]
        assert second["tokens_per_second"] is not None and second["tokens_per_second"] > 0

        cancelled = http.delete(f"{ROUTE}/{request_id}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json() == {"id": request_id, "object": "appliance.request", "cancelled": True, "ended": True}
        tail = rest(lines)  # the stream ends, as if the client had gone away
    error = json.loads(tail[-1].removeprefix("data: "))["error"]
    assert error["code"] == "cancelled" and CANCEL_REASON in error["message"]

    body = listing(http)
    assert request_id not in [r["id"] for r in body["data"]]
    [done] = [r for r in body["finished"] if r["id"] == request_id]
    assert done["state"] == "finished" and done["status"] == "cancelled" and done["finish_reason"] == "cancelled"
    assert done["error"] == CANCEL_REASON and done["completion_tokens"] >= second["completion_tokens"]
    assert done["finished_at"] >= done["enqueued_at"]
    record = wait_for_record(log, request_id)
    assert record.status == "cancelled" and record.error == CANCEL_REASON


def test_a_queued_request_can_be_cancelled(http: TestClient) -> None:
    with (
        http.stream("POST", "/v1/completions", json=LONG) as one,
        http.stream("POST", "/v1/completions", json=LONG) as two,
    ):
        streams = [one.iter_lines(), two.iter_lines()]  # kept: a dropped iterator closes its stream
        for lines in streams:
            events(lines, 2)
        with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as three:
            queued_id = three.headers["x-request-id"]
            assert queued_id.startswith("chatcmpl-")
            entry = live(http, queued_id)
            assert entry["state"] == "queued" and entry["started_at"] is None and entry["completion_tokens"] == 0
            loads = listing(http)["models"]
            assert [(m["model"], m["slots"], m["active"], m["queued"]) for m in loads] == [(DEFAULT_MODEL, 2, 2, 1)]
            assert http.delete(f"{ROUTE}/{queued_id}").json()["ended"] is True
            assert '"code":"cancelled"' in rest(three.iter_lines())[-1]
        for resp in (one, two):
            assert http.delete(f"{ROUTE}/{resp.headers['x-request-id']}").status_code == 200
    [done] = [r for r in listing(http)["finished"] if r["id"] == queued_id]
    assert done["status"] == "cancelled" and done["started_at"] is None and done["ttft_ms"] is None


def test_a_finished_request_is_listed_and_cannot_be_cancelled(http: TestClient) -> None:
    resp = http.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 200, resp.text
    request_id = resp.json()["id"]
    [done] = [r for r in listing(http)["finished"] if r["id"] == request_id]
    assert done["status"] == "ok" and done["finish_reason"] in ("stop", "length")
    assert done["completion_tokens"] == resp.json()["usage"]["completion_tokens"]
    assert done["ttft_ms"] is not None and done["client"] == "local"
    refused = http.delete(f"{ROUTE}/{request_id}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "request_finished"
    assert http.get(ROUTE, params={"finished": 0}).json()["finished"] == []


def test_unknown_id_is_404(http: TestClient) -> None:
    resp = http.delete(f"{ROUTE}/chatcmpl-nope")
    assert resp.status_code == 404
    assert resp.json()["error"] == {
        "message": "No queued or running request has the id 'chatcmpl-nope'.",
        "type": "invalid_request_error",
        "param": "id",
        "code": "request_not_found",
    }


def test_needs_the_api_key() -> None:
    app = create_app(Scheduler(), Settings(api_key="k" * 16))
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get(ROUTE).status_code == 401
        body = client.get(ROUTE, headers={"Authorization": "Bearer " + "k" * 16}).json()
        assert body["data"] == [] and body["finished"] == [] and body["models"] == []


def test_derived_figures() -> None:
    snap = RequestSnapshot(
        id="cmpl-1",
        model="m",
        adapters=(("pirate", 0.5),),
        client="",
        state="finished",
        prompt_tokens=10,
        prompt_tokens_done=10,
        cached_tokens=4,
        completion_tokens=21,
        max_tokens=21,
        enqueued_at=100.0,
        started_at=100.5,
        first_token_at=101.0,
        finished_at=103.0,
        finish_reason="length",
    )
    info = request_info(snap, now=200.0)
    assert (info.queue_ms, info.ttft_ms, info.tokens_per_second) == (500.0, 1000.0, 10.0)
    assert info.status == "ok" and info.client is None and info.adapters[0].name == "pirate"
