"""No record can stop the request log (issue 13, defects 1 and 11), without a model.

Each test hands the real writer a record a client could cause, then checks that it is stored in
the best form possible, that records after it are still written, and that ``status()`` (what
``/health`` and ``/metrics`` show) tells the truth.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from appliance.requestlog.record import ExchangeRecord
from appliance.requestlog.writer import REFUSALS_PER_MINUTE, LogWriter
from tests.test_log_store import record


def rows(path: Path) -> dict[str, dict[str, object]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM exchanges")}
    finally:
        conn.close()


def nested(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def test_lone_surrogates_anywhere_are_stored_replaced(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path / "log.sqlite", flush_interval=0.02)
    bad = record(
        1,
        request={"model": "m", "user": "\udfff", "messages": [{"role": "user", "content": "a\ud800b"}]},
        prompt_text="user: a\ud800b",
        choices=[{"index": 0, "text": "x\udc00", "finish_reason": "stop"}],
        error="\udfff",
    )
    writer.submit(bad)
    writer.submit(record(2))
    assert writer.flush(5)
    stored = rows(tmp_path / "log.sqlite")
    assert set(stored) == {"chatcmpl-1", "chatcmpl-2"}
    one = stored["chatcmpl-1"]
    assert json.loads(one["request"])["user"] == "\ufffd"  # type: ignore[arg-type]
    assert one["prompt_text"] == "user: a\ufffdb" and one["response_text"] == "x\ufffd"
    assert "lone surrogates" in str(one["log_note"])
    assert stored["chatcmpl-2"]["log_note"] is None
    status = writer.status()
    assert status["error"] is None and status["written"] == 2 and status["failed"] == 0
    writer.close()


def test_content_nested_deeper_than_the_encoder_goes_is_stored_cut(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path / "log.sqlite", flush_interval=0.02)
    deep = record(1, request={"model": "m", "messages": [{"role": "user", "content": nested(5000)}]})
    writer.submit(deep)
    writer.submit(record(2))
    assert writer.flush(10)
    stored = rows(tmp_path / "log.sqlite")
    assert set(stored) == {"chatcmpl-1", "chatcmpl-2"}
    assert "cut short" in str(stored["chatcmpl-1"]["log_note"])
    json.loads(str(stored["chatcmpl-1"]["request"]))  # still a JSON document
    assert writer.status()["error"] is None
    writer.close()


def test_a_record_the_database_refuses_is_stored_without_content(tmp_path: Path) -> None:
    """An int SQLite cannot hold makes the whole batch fail: the others must still be written."""
    writer = LogWriter(tmp_path / "log.sqlite", flush_interval=0.5)
    for i in range(5):
        writer.submit(record(i, prompt_tokens=2**70 if i == 2 else 10))
    assert writer.flush(10)
    stored = rows(tmp_path / "log.sqlite")
    assert set(stored) == {f"chatcmpl-{i}" for i in range(5)}
    assert stored["chatcmpl-0"]["response_text"] == "answer 0"
    assert stored["chatcmpl-2"]["request"] == "{}" and "content not stored" in str(stored["chatcmpl-2"]["log_note"])
    writer.submit(record(9))
    assert writer.flush(5) and "chatcmpl-9" in rows(tmp_path / "log.sqlite")
    writer.close()


def test_a_writer_that_died_shows_in_status(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path / "log.sqlite", flush_interval=0.02)
    assert writer.status()["error"] is None
    writer.close()
    writer._stopping = False  # as if its thread had ended on its own: must never look healthy
    assert writer.status()["error"] == "the request log writer has stopped"


def refusal(i: int, size: int = 0) -> ExchangeRecord:
    return record(
        i,
        status="client_error",
        choices=[],
        http_status=400,
        error="Invalid value",
        request={"model": "m", "messages": [{"role": "user", "content": "x" * size}]},
        prompt_text=None,
    )


def test_refusals_are_stored_compactly(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    writer = LogWriter(path, flush_interval=0.02)
    for i in range(2):
        writer.submit(refusal(i, size=7_000_000))
    assert writer.flush(10)
    stored = rows(path)
    assert len(stored) == 2
    for row in stored.values():
        assert len(str(row["request"])) < 4096
        assert "more characters not stored" in str(row["request"])
        assert "short form" in str(row["log_note"])
    writer.close()
    assert path.stat().st_size < 1 << 20


def test_refusals_are_rate_limited_but_exchanges_never(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "log.sqlite"
    writer = LogWriter(path, flush_interval=0.02, clock=lambda: now[0])
    accepted = sum(writer.submit(refusal(i)) for i in range(REFUSALS_PER_MINUTE + 40))
    assert accepted == REFUSALS_PER_MINUTE
    assert all(writer.submit(record(10_000 + i)) for i in range(100))  # answered exchanges always count
    now[0] += 30  # half a minute later, half the budget is back
    assert sum(writer.submit(refusal(20_000 + i)) for i in range(REFUSALS_PER_MINUTE)) == REFUSALS_PER_MINUTE // 2
    assert writer.flush(10)
    status = writer.status()
    assert status["refusals_not_logged"] == 40 + REFUSALS_PER_MINUTE // 2
    assert status["dropped"] == 0
    assert len(rows(path)) == REFUSALS_PER_MINUTE + 100 + REFUSALS_PER_MINUTE // 2
    writer.close()


def test_the_servers_own_api_key_is_redacted(tmp_path: Path) -> None:
    from appliance.bootstrap import build_request_log
    from appliance.config import Paths, Settings

    key = "team-key-4f9a2c"
    writer = build_request_log(Settings(api_key=key, log_file=tmp_path / "log.sqlite"), Paths(tmp_path))
    writer.submit(
        record(1, request={"model": "m", "messages": [{"role": "user", "content": f"use {key} for it"}]}, error=key)
    )
    assert writer.flush(5)
    writer.close()
    stored = rows(tmp_path / "log.sqlite")["chatcmpl-1"]
    assert key not in json.dumps(stored)
    assert "[REDACTED:api_key]" in str(stored["request"])


def test_health_and_metrics_show_a_failing_log(tmp_path: Path) -> None:
    """Was: after the writer died, /health still said all was well."""
    import time

    from fastapi.testclient import TestClient

    from appliance.api.app import create_app
    from appliance.config import Settings
    from appliance.scheduler import Scheduler

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the log's folder should be")
    writer = LogWriter(blocked / "log.sqlite", flush_interval=0.05)
    writer.submit(record(1))
    deadline = time.monotonic() + 5
    while writer.status()["error"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    app = create_app(Scheduler(), Settings(), writer)
    try:
        with TestClient(app, base_url="http://localhost") as http:
            health = http.get("/health")
            assert health.status_code == 200  # it still serves
            assert health.json()["status"] == "degraded" and health.json()["request_log"]["error"]
            assert "appliance_log_healthy 0.0" in http.get("/metrics").text
    finally:
        writer.close(timeout=0.5)
