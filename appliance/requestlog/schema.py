"""The log database's schema, as numbered migrations, and how every connection to it is opened.

The schema is plain and documented (README, "Request log") so the file opens in sqlite-utils or
Datasette. ``PRAGMA user_version`` is the number of migrations applied; a database written by a
newer appliance is refused rather than misread. Migrations only ever get appended.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.sqlitemigrate import apply_migrations

if TYPE_CHECKING:  # imported where a database is opened: the CLI starts faster without it
    from sqlite_utils import Database

MIGRATIONS: tuple[str, ...] = (
    # 1: exchanges and their feedback
    """
    CREATE TABLE exchanges (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        client TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        model_sha256 TEXT,
        quantization TEXT,
        adapters TEXT NOT NULL DEFAULT '[]',
        engine TEXT,
        backend TEXT,
        device TEXT,
        stream INTEGER NOT NULL,
        request TEXT NOT NULL,
        response TEXT,
        prompt_text TEXT,
        response_text TEXT,
        finish_reason TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        cached_tokens INTEGER,
        ttft_ms REAL,
        latency_ms REAL,
        tokens_per_s REAL,
        status TEXT NOT NULL CHECK (status IN ('ok', 'client_error', 'cancelled', 'server_error')),
        http_status INTEGER,
        error TEXT
    );
    CREATE INDEX exchanges_created_at ON exchanges (created_at);
    CREATE INDEX exchanges_model ON exchanges (model, created_at);
    CREATE TABLE feedback (
        exchange_id TEXT PRIMARY KEY REFERENCES exchanges (id) ON DELETE CASCADE,
        rating INTEGER CHECK (rating IN (-1, 1)),
        correction TEXT,
        tags TEXT NOT NULL DEFAULT '[]',
        note TEXT,
        updated_at REAL NOT NULL
    );
    """,
    # 2: what the writer could not store as sent (lone surrogates replaced, a body cut short...)
    """
    ALTER TABLE exchanges ADD COLUMN log_note TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_MS = 2000


class LogDatabaseError(Exception):
    """The log database cannot be used; the message says why."""


def _create_private(path: Path) -> None:
    """Create the file 0600 before SQLite does: requests may hold personal data.

    SQLite gives its -wal and -shm files the permissions of the database file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def connect(path: Path) -> Database:
    from sqlite_utils import Database

    """Open (creating if needed) the log database in WAL mode, migrated to the current schema."""
    if not path.exists():
        _create_private(path)
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # WAL is a property of the file: set it once; switching needs a lock the busy timeout
        # does not wait for, and a reader may open the file while the server's writer creates it
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        # NORMAL: a committed transaction survives the process being killed (not a power cut)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        raise LogDatabaseError(f"cannot open the request log {path}: {exc}") from exc
    return Database(conn)


@contextlib.contextmanager
def write(db: Database) -> Iterator[None]:
    """One write transaction, taking the write lock at once (waits up to the busy timeout)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this database lacks, each in its own transaction; return the version."""

    def too_new(version: int) -> LogDatabaseError:
        return LogDatabaseError(
            f"the request log has schema version {version}, newer than this appliance's {SCHEMA_VERSION}: "
            "upgrade the appliance or point it at another log file"
        )

    return apply_migrations(conn, MIGRATIONS, too_new)
