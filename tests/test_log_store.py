"""The request log without a model: exact schema, writer resilience, redaction, retention, CLI."""

from __future__ import annotations

import json
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.requestlog.record import ExchangeRecord
from appliance.requestlog.redact import RedactionRuleError, Redactor
from appliance.requestlog.schema import SCHEMA_VERSION, LogDatabaseError, connect
from appliance.requestlog.store import LogFilter, LogStore
from appliance.requestlog.writer import LogWriter, Retention

EXPECTED_COLUMNS = {
    "exchanges": [
        ("id", "TEXT", 0, 1),
        ("created_at", "REAL", 1, 0),
        ("finished_at", "REAL", 1, 0),
        ("client", "TEXT", 1, 0),
        ("endpoint", "TEXT", 1, 0),
        ("model", "TEXT", 1, 0),
        ("model_sha256", "TEXT", 0, 0),
        ("quantization", "TEXT", 0, 0),
        ("adapters", "TEXT", 1, 0),
        ("engine", "TEXT", 0, 0),
        ("backend", "TEXT", 0, 0),
        ("device", "TEXT", 0, 0),
        ("stream", "INTEGER", 1, 0),
        ("request", "TEXT", 1, 0),
        ("response", "TEXT", 0, 0),
        ("prompt_text", "TEXT", 0, 0),
        ("response_text", "TEXT", 0, 0),
        ("finish_reason", "TEXT", 0, 0),
        ("prompt_tokens", "INTEGER", 0, 0),
        ("completion_tokens", "INTEGER", 0, 0),
        ("cached_tokens", "INTEGER", 0, 0),
        ("ttft_ms", "REAL", 0, 0),
        ("latency_ms", "REAL", 0, 0),
        ("tokens_per_s", "REAL", 0, 0),
        ("status", "TEXT", 1, 0),
        ("http_status", "INTEGER", 0, 0),
        ("error", "TEXT", 0, 0),
        ("log_note", "TEXT", 0, 0),
    ],
    "feedback": [
        ("exchange_id", "TEXT", 0, 1),
        ("rating", "INTEGER", 0, 0),
        ("correction", "TEXT", 0, 0),
        ("tags", "TEXT", 1, 0),
        ("note", "TEXT", 0, 0),
        ("updated_at", "REAL", 1, 0),
    ],
}
EXPECTED_INDEXES = {
    "exchanges_created_at": ["created_at"],
    "exchanges_model": ["model", "created_at"],
}


def record(i: int, **changes: object) -> ExchangeRecord:
    values: dict[str, object] = {
        "id": f"chatcmpl-{i}",
        "created_at": 1_700_000_000.0 + i,
        "finished_at": 1_700_000_001.0 + i,
        "client": "local",
        "endpoint": "chat.completions",
        "model": "m",
        "stream": False,
        "request": {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}]},
        "status": "ok",
        "choices": [{"index": 0, "text": f"answer {i}", "finish_reason": "stop"}],
        "prompt_text": f"user: question {i}",
        "prompt_tokens": 10,
        "completion_tokens": 5,
    }
    values.update(changes)
    return ExchangeRecord(**values)  # type: ignore[arg-type]


def test_schema_is_exactly_the_documented_one(tmp_path: Path) -> None:
    db = connect(tmp_path / "log.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert sorted(db.table_names()) == ["exchanges", "feedback"]
    for table, columns in EXPECTED_COLUMNS.items():
        info = [(r[1], r[2], r[3], r[5]) for r in db.execute(f"PRAGMA table_info({table})").fetchall()]
        assert info == columns, table
    indexes = {
        name: [r[2] for r in db.execute(f"PRAGMA index_info({name})").fetchall()]
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")
    }
    assert indexes == EXPECTED_INDEXES
    fks = db.execute("PRAGMA foreign_key_list(feedback)").fetchall()
    assert [(r[2], r[3], r[4], r[6]) for r in fks] == [("exchanges", "exchange_id", "id", "CASCADE")]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_is_private_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    connect(path).conn.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(LogDatabaseError, match="schema version 99, newer"):
        connect(path)


def test_writer_commits_within_a_second(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path / "log.sqlite")
    try:
        for i in range(20):
            assert writer.submit(record(i))
        deadline = time.monotonic() + 1.0
        store = LogStore.open(tmp_path / "log.sqlite")
        while store.count(LogFilter()) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.count(LogFilter()) == 20
        assert writer.status() | {"path": None} == {
            "enabled": True,
            "path": None,
            "written": 20,
            "pending": 0,
            "dropped": 0,
            "failed": 0,
            "refusals_not_logged": 0,
            "error": None,
        }
    finally:
        writer.close()


def test_locked_database_keeps_records_waiting_then_writes_them(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    connect(path).conn.close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    writer = LogWriter(path, max_pending=5, flush_interval=0.05)
    try:
        for i in range(7):
            writer.submit(record(i))
        deadline = time.monotonic() + 15
        while writer.status()["error"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        status = writer.status()
        assert "locked" in status["error"]
        assert (status["written"], status["pending"], status["dropped"]) == (0, 5, 2)
        blocker.execute("ROLLBACK")
        assert writer.flush(timeout=20)
        assert writer.status()["error"] is None and writer.status()["written"] == 5
    finally:
        blocker.close()
        writer.close()
    assert LogStore.open(path).count(LogFilter()) == 5


def test_unwritable_location_is_reported_and_serving_code_never_blocks(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the log's folder should be")
    writer = LogWriter(blocked / "log.sqlite", flush_interval=0.05)
    try:
        started = time.monotonic()
        for i in range(100):
            writer.submit(record(i))
        assert time.monotonic() - started < 0.5
        deadline = time.monotonic() + 5
        while writer.status()["error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.status()["error"] is not None and writer.status()["pending"] == 100
    finally:
        writer.close(timeout=0.5)


def test_redaction_applies_before_writing(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path / "log.sqlite", Redactor([r"\bORD-\d{6}\b"]))
    secret = (
        "mail jane.doe@example.org, key sk-abcdefghijklmnopqrstuv, Authorization: Bearer eyJhbGciOi.x.y, ORD-123456"
    )
    writer.submit(
        record(
            1,
            request={"messages": [{"role": "user", "content": secret}]},
            choices=[{"index": 0, "text": "reply to jane.doe@example.org", "finish_reason": "stop"}],
            prompt_text=secret,
            error="token=abcdefghijkl",
        )
    )
    writer.close()
    raw = b"".join(f.read_bytes() for f in tmp_path.glob("log.sqlite*"))
    row = LogStore.open(tmp_path / "log.sqlite").get("chatcmpl-1")
    content = row["request"]["messages"][0]["content"]
    assert content == (
        "mail [REDACTED:email], key [REDACTED:openai_key], Authorization: [REDACTED:bearer], [REDACTED:rule1]"
    )
    assert row["prompt_text"] == content
    assert row["response_text"] == "reply to [REDACTED:email]"
    assert row["error"] == "[REDACTED:secret_assignment]"
    assert b"jane.doe" not in raw and b"ORD-123456" not in raw
    with pytest.raises(RedactionRuleError, match="not a valid regular expression"):
        Redactor(["(unclosed"])


def test_feedback_filters_and_stats(tmp_path: Path) -> None:
    store = LogStore(connect(tmp_path / "log.sqlite"))
    store.db["exchanges"].insert_all(  # type: ignore[union-attr]
        [
            record(1).to_row(),
            record(2, model="other", status="client_error", error="bad", choices=[]).to_row(),
            record(3, adapters=[{"name": "support", "scale": 1.0}]).to_row(),
        ]
    )
    store.set_feedback("chatcmpl-1", rating=1, tags=["good", "greeting"])
    merged = store.set_feedback("chatcmpl-1", note="checked")
    assert (merged["rating"], merged["tags"], merged["note"]) == (1, ["good", "greeting"], "checked")
    ids = lambda f: [r["id"] for r in store.page(f)]  # noqa: E731
    assert ids(LogFilter(model="other")) == ["chatcmpl-2"]
    assert ids(LogFilter(status="ok")) == ["chatcmpl-3", "chatcmpl-1"]
    assert ids(LogFilter(rating=1)) == ids(LogFilter(tag="greeting")) == ["chatcmpl-1"]
    assert ids(LogFilter(adapter="support")) == ["chatcmpl-3"]
    assert ids(LogFilter(text="QUESTION 3")) == ["chatcmpl-3"]
    assert ids(LogFilter(since=1_700_000_002.0, until=1_700_000_003.0)) == ["chatcmpl-2"]
    assert [r["id"] for r in store.page(LogFilter(), limit=1, offset=1)] == ["chatcmpl-2"]
    stats = {(s["model"], s["adapters"]): s for s in store.stats(LogFilter())}
    assert stats[("m", "-")]["requests"] == 1 and stats[("m", "support")]["requests"] == 1
    assert stats[("other", "-")]["client_error"] == 1
    assert store.purge(LogFilter(model="other")) == 1
    assert store.count(LogFilter()) == 2


def test_retention_by_age_rows_and_size(tmp_path: Path) -> None:
    store = LogStore(connect(tmp_path / "log.sqlite"))
    now = time.time()
    big = "x" * 4000
    rows = [record(i, created_at=now - (100 - i) * 86400, prompt_text=big).to_row() for i in range(100)]
    store.db["exchanges"].insert_all(rows)  # type: ignore[union-attr]
    store.set_feedback("chatcmpl-0", rating=-1)
    assert store.enforce_retention(max_age_days=50.5, max_rows=None, max_bytes=None) == 50
    assert store.db.execute("SELECT count(*) FROM feedback").fetchone()[0] == 0  # cascaded
    assert store.enforce_retention(max_age_days=None, max_rows=30, max_bytes=None) == 20
    oldest = store.page(LogFilter(), limit=1000)[-1]["id"]
    assert oldest == "chatcmpl-70"
    store.enforce_retention(max_age_days=None, max_rows=None, max_bytes=60_000)
    assert store.data_bytes() <= 60_000 and 0 < store.count(LogFilter()) < 30


def test_writer_enforces_retention_in_the_background(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path / "log.sqlite", retention=Retention(max_rows=10, every_s=0.0), flush_interval=0.05)
    try:
        for i in range(30):
            writer.submit(record(i))
            writer.flush()
    finally:
        writer.close()
    assert LogStore.open(tmp_path / "log.sqlite").count(LogFilter()) <= 10


def test_cli_list_show_stats_feedback_export_purge(
    tmp_path: Path, app_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = LogWriter(app_home / "requests.sqlite")
    for i in range(4):
        writer.submit(record(i))
    writer.close()
    assert main(["logs", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert main(["logs", "feedback", "chatcmpl-2", "--rating", "-1", "--correction", "better 2", "--tag", "fix"]) == 0
    capsys.readouterr()
    assert main(["logs", "show", "chatcmpl-2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["rating"], shown["correction"], shown["tags"]) == (-1, "better 2", ["fix"])
    assert main(["logs", "list", "--rating", "-1"]) == 0
    assert "chatcmpl-2" in capsys.readouterr().out
    assert main(["logs", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["requests"] == 4
    out = tmp_path / "train.jsonl"
    assert main(["logs", "export", "--format", "chat", "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and lines[2]["messages"][-1] == {"role": "assistant", "content": "better 2"}
    assert main(["logs", "show", "nope"]) == 1
    assert "No logged exchange with id 'nope'" in capsys.readouterr().err
    assert main(["logs", "purge", "--yes"]) == 1  # no filter: refuses without --all
    assert main(["logs", "purge", "--tag", "fix", "--yes"]) == 0
    assert "deleted 1 exchanges" in capsys.readouterr().out
    assert main(["logs", "purge", "--all", "--yes"]) == 0
    assert LogStore.open(app_home / "requests.sqlite").count(LogFilter()) == 0


def test_concurrent_reader_and_writer(tmp_path: Path) -> None:
    """The CLI reading next to the server's writer: WAL keeps both going."""
    writer = LogWriter(tmp_path / "log.sqlite", flush_interval=0.01)
    stop = threading.Event()
    counts: list[int] = []

    def read() -> None:
        store = LogStore.open(tmp_path / "log.sqlite")
        while not stop.is_set():
            counts.append(store.count(LogFilter()))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(300):
        writer.submit(record(i))
    writer.close()
    stop.set()
    reader.join()
    assert counts and counts == sorted(counts) and writer.status()["written"] == 300
