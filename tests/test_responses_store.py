"""The stored responses of /v1/responses: kept, found, forgotten, aged out, and the file kept private."""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.responses_store import SCHEMA_VERSION, ResponseStore, ResponseStoreError


def response(rid: str, created_at: float | None = None) -> dict[str, Any]:
    output = [{"id": f"msg_{rid}", "type": "message", "role": "assistant", "content": []}]
    return {"id": rid, "created_at": int(created_at if created_at is not None else time.time()), "output": output}


def test_save_get_delete(tmp_path: Path) -> None:
    path = tmp_path / "home" / "responses.sqlite"
    store = ResponseStore(path)
    mine = [{"id": "msg_in", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hé"}]}]
    past = [{"id": "msg_old", "type": "message", "role": "user", "content": []}]
    store.save(response("resp_1"), mine, past)
    stored = store.get("resp_1")
    assert stored is not None
    assert stored.response == response("resp_1") | {"created_at": stored.response["created_at"]}
    assert stored.input_items == mine and stored.history == past
    assert [i["id"] for i in stored.conversation] == ["msg_old", "msg_in", "msg_resp_1"]
    assert store.get("resp_2") is None
    store.close()
    reopened = ResponseStore(path)  # kept on disk
    assert reopened.get("resp_1") is not None
    assert reopened.delete("resp_1") is True
    assert reopened.delete("resp_1") is False
    assert reopened.get("resp_1") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reopened.close()


def test_in_memory_without_a_path() -> None:
    store = ResponseStore(None)
    store.save(response("resp_1"), [], [])
    assert store.get("resp_1") is not None


def test_old_responses_are_dropped_as_new_ones_come() -> None:
    store = ResponseStore(None, max_age_days=1)
    store.save(response("resp_young", time.time() - 0.5 * 86_400), [], [])
    store.save(response("resp_old", time.time() - 2 * 86_400), [], [])
    store.save(response("resp_new"), [], [])
    assert store.get("resp_young") is not None
    assert store.get("resp_old") is None and store.get("resp_new") is not None


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "responses.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ResponseStoreError, match="newer"):
        ResponseStore(path)


def test_migrations_give_the_documented_columns(tmp_path: Path) -> None:
    ResponseStore(tmp_path / "r.sqlite").close()
    conn = sqlite3.connect(tmp_path / "r.sqlite")
    columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
    assert columns == ["id", "created_at", "response", "input_items", "history"]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ResponseStoreError):
        ResponseStore(tmp_path / "file" / "responses.sqlite")
