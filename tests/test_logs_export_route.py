"""``GET /v1/appliance/logs/export``: the CLI's export, streamed over HTTP for the desktop app.

The app runs in-process around an empty scheduler and a real log writer; exchanges are put in the
log with the store directly, so no model runs. The reference for every body is what
``appliance logs export`` writes to a file from the same log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance.api import logs as logs_route
from appliance.api.app import create_app
from appliance.config import Settings
from appliance.requestlog.export import ExportResult, export, export_lines
from appliance.requestlog.store import LogFilter, LogStore
from appliance.requestlog.writer import LogWriter
from appliance.scheduler import Scheduler
from tests.test_log_export import add, user

LOCAL = "http://localhost"  # the edge serves loopback Hosts only
EXPORT = "/v1/appliance/logs/export"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log.sqlite"


@pytest.fixture
def store(log_path: Path) -> Iterator[LogStore]:
    log = LogStore.open(log_path)
    add(log, "a", messages=user("What is 2+2?"), answers=["4"], model="m1", rating=1)
    add(log, "b", messages=user("Capital of France?"), answers=["Lyon"], model="m1", rating=-1, correction="Paris")
    add(log, "c", messages=user("What is 2+2?"), answers=["4"], model="m2")
    add(log, "d", messages=user("Broken"), answers=[], model="m1", status="server_error")
    add(log, "e", prompt="Once upon", answers=[" a time"], model="m1")
    yield log
    log.close()


@pytest.fixture
def http(log_path: Path, store: LogStore) -> Iterator[TestClient]:
    writer = LogWriter(log_path, flush_interval=0.05)
    app = create_app(Scheduler(), Settings(), request_log=writer)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        yield client
    writer.close()


def reference(store: LogStore, tmp_path: Path, fmt: str, filters: LogFilter, **kwargs: bool) -> bytes:
    out = tmp_path / f"reference-{fmt}.jsonl"
    export(store, fmt, out, filters, progress=False, **kwargs)  # type: ignore[arg-type]
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["chat", "dpo", "completions"])
def test_streams_what_the_cli_writes(http: TestClient, store: LogStore, tmp_path: Path, fmt: str) -> None:
    resp = http.get(EXPORT, params={"format": fmt})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.headers["cache-control"] == "no-store"
    assert f"appliance-{fmt}.jsonl" in resp.headers["content-disposition"]
    assert resp.content == reference(store, tmp_path, fmt, LogFilter(status="ok"))
    assert resp.content.endswith(b"\n")


def test_total_counts_the_records_read_not_the_lines(http: TestClient) -> None:
    resp = http.get(EXPORT, params={"format": "chat"})
    # chat reads the 3 answered chat records (not the failed one, not the completion)
    assert resp.headers["x-total-records"] == "3"
    answers = [json.loads(line)["messages"][-1]["content"] for line in resp.text.splitlines()]
    assert answers == ["4", "Paris", "4"]  # b's correction replaces its answer
    dpo = http.get(EXPORT, params={"format": "dpo"})
    assert dpo.headers["x-total-records"] == "3"
    assert len(dpo.text.splitlines()) == 1  # the one correction gives the one pair


def test_filters_and_dedupe(http: TestClient, store: LogStore, tmp_path: Path) -> None:
    resp = http.get(EXPORT, params={"format": "chat", "model": "m1", "rating": "1"})
    assert resp.headers["x-total-records"] == "1"
    assert resp.content == reference(store, tmp_path, "chat", LogFilter(status="ok", model="m1", rating=1))
    twice = http.get(EXPORT, params={"format": "chat"}).text.splitlines()
    once = http.get(EXPORT, params={"format": "chat", "dedupe": "true"}).text.splitlines()
    assert len(twice) == 3 and len(once) == 2  # a and c are the same example
    since = http.get(EXPORT, params={"format": "chat", "since": "2100-01-01"})
    assert since.headers["x-total-records"] == "0" and since.content == b""
    failed = http.get(EXPORT, params={"format": "chat", "status": "server_error"})
    assert failed.headers["x-total-records"] == "1" and failed.content == b""  # read, and skipped: no answer


def test_export_is_not_taken_for_a_record_id(http: TestClient) -> None:
    assert http.get("/v1/appliance/logs/a").json()["id"] == "a"
    assert http.get(EXPORT).status_code == 200


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"format": "parquet"}, "format"),
        ({"status": "fine"}, "status"),
        ({"rating": "2"}, "rating"),
        ({"since": "yesterday"}, "since"),
    ],
)
def test_bad_parameters_are_400s_naming_them(http: TestClient, params: dict[str, str], param: str) -> None:
    resp = http.get(EXPORT, params=params)
    assert resp.status_code == 400, resp.text
    assert param in json.dumps(resp.json()["error"])


def test_without_a_log_the_export_says_so() -> None:
    with TestClient(create_app(Scheduler(), Settings()), base_url=LOCAL) as client:
        resp = client.get(EXPORT)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "request_log_disabled"


def test_needs_the_api_key(log_path: Path, store: LogStore) -> None:
    writer = LogWriter(log_path)
    app = create_app(Scheduler(), Settings(api_key="k" * 12), request_log=writer)
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get(EXPORT).status_code == 401
        ok = client.get(EXPORT, headers={"authorization": "Bearer " + "k" * 12})
        assert ok.status_code == 200 and ok.content
    writer.close()


def test_chunks_are_whole_lines_and_the_connection_is_closed(
    log_path: Path, store: LogStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs_route, "EXPORT_CHUNK_BYTES", 1)  # one line a chunk
    closed: list[LogStore] = []
    real_close = LogStore.close

    def close(self: LogStore) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(LogStore, "close", close)
    chunks = list(logs_route._export_chunks(log_path, "chat", LogFilter(status="ok"), dedupe=False))
    assert len(chunks) == 3 and all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
    assert b"".join(chunks) == b"".join(export_lines(store, "chat", LogFilter(status="ok")))
    assert len(closed) == 1
    # a client that goes away midway: the generator is closed, and so is its connection
    stream = logs_route._export_chunks(log_path, "chat", LogFilter(status="ok"), dedupe=False)
    next(stream)
    stream.close()
    assert len(closed) == 2


def test_export_lines_reports_like_export(store: LogStore, tmp_path: Path) -> None:
    streamed = ExportResult()
    lines = list(export_lines(store, "chat", LogFilter(), dedupe=True, result=streamed))
    written = export(store, "chat", tmp_path / "out.jsonl", LogFilter(), dedupe=True, progress=False)
    assert b"".join(lines) == (tmp_path / "out.jsonl").read_bytes()
    assert (streamed.examples, streamed.duplicates, streamed.skipped) == (
        written.examples,
        written.duplicates,
        written.skipped,
    )
    assert streamed.skip_reasons == written.skip_reasons and streamed.files == []
    with pytest.raises(ValueError, match="unknown export format"):
        list(export_lines(store, "parquet", LogFilter()))  # type: ignore[arg-type]
