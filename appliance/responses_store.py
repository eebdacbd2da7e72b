"""Stored responses of ``/v1/responses`` (OpenAI's ``store: true``), for ``previous_response_id``.

A stored response keeps what a later request needs to continue the conversation: its own input
items, the items of the responses before it (``history``) and the response object itself (with its
output). Keeping the whole history on each row, rather than following ``previous_response_id``
links back, means deleting one response never breaks the ones built on it.

The file is SQLite in the app home (``responses.sqlite``, mode 0600: it holds conversations);
``PRAGMA user_version`` counts the migrations applied, as in the request log. Rows older than
``MAX_AGE_DAYS`` are dropped as new ones come, as OpenAI keeps responses 30 days. Calls block on
disk: the API runs them off the event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.sqlitemigrate import apply_migrations

MIGRATIONS: tuple[str, ...] = (
    # 1: one row per stored response
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        response TEXT NOT NULL,
        input_items TEXT NOT NULL,
        history TEXT NOT NULL
    );
    CREATE INDEX responses_created_at ON responses (created_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
MAX_AGE_DAYS = 30.0
BUSY_TIMEOUT_S = 2.0

Item = dict[str, Any]


class ResponseStoreError(Exception):
    """The store's file cannot be used; the message says why."""


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the Response object as sent
    input_items: list[Item]  # the request's own input items
    history: list[Item]  # the items of the responses it continues, oldest first

    @property
    def conversation(self) -> list[Item]:
        """Everything a response continuing this one builds on: history, input and output."""
        return [*self.history, *self.input_items, *self.response.get("output", [])]


class ResponseStore:
    """SQLite-backed; ``path=None`` keeps responses in memory (an app built without a home)."""

    def __init__(self, path: Path | None, *, max_age_days: float | None = MAX_AGE_DAYS) -> None:
        self.path = path
        self._max_age_s = max_age_days * 86_400 if max_age_days is not None else None
        self._lock = threading.Lock()
        self._conn = self._open(path)

    @staticmethod
    def _open(path: Path | None) -> sqlite3.Connection:
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():  # private before SQLite creates it; its -wal/-shm files follow its mode
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            target = ":memory:" if path is None else str(path)
            conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ResponseStoreError(f"cannot open the response store {path}: {exc}") from exc
        try:
            if path is not None:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            _migrate(conn, path)
        except (sqlite3.Error, ResponseStoreError) as exc:
            conn.close()
            if isinstance(exc, ResponseStoreError):
                raise
            raise ResponseStoreError(f"cannot use the response store {path}: {exc}") from exc
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, under the lock that serialises this connection's users."""
        with self._lock, _as_store_error(self.path):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def save(self, response: dict[str, Any], input_items: list[Item], history: list[Item]) -> None:
        row = (
            response["id"],
            float(response["created_at"]),
            json.dumps(response, ensure_ascii=False),
            json.dumps(input_items, ensure_ascii=False),
            json.dumps(history, ensure_ascii=False),
        )
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)
            if self._max_age_s is not None:
                conn.execute("DELETE FROM responses WHERE created_at < ?", (time.time() - self._max_age_s,))

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock, _as_store_error(self.path):
            row = self._conn.execute(
                "SELECT response, input_items, history FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        if row is None:
            return None
        response, input_items, history = (json.loads(column) for column in row)
        return StoredResponse(response, input_items, history)

    def delete(self, response_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()


def _migrate(conn: sqlite3.Connection, path: Path | None) -> None:
    """Apply the migrations the file lacks, each in its own transaction; a newer file is refused."""

    def too_new(version: int) -> ResponseStoreError:
        return ResponseStoreError(
            f"{path} has schema version {version}, newer than this appliance's {SCHEMA_VERSION}: upgrade the appliance"
        )

    apply_migrations(conn, MIGRATIONS, too_new)


@contextlib.contextmanager
def _as_store_error(path: Path | None) -> Iterator[None]:
    """A disk or database failure as this module's error, which the API logs without failing the answer."""
    try:
        yield
    except sqlite3.Error as exc:
        raise ResponseStoreError(f"the response store {path} failed: {exc}") from exc
