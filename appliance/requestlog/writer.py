"""The log writer: records go from the API into a bounded buffer, a thread commits them in batches.

Serving never waits for the disk. A record is committed within ``flush_interval`` (plus the
commit itself) of being handed over, in WAL mode, so a ``kill -9`` loses at most the last
fraction of a second. When the database cannot be written (disk full, locked, gone) records stay
in the buffer and the writer retries with back-off; the problem shows in ``status()`` (and so in
``/health``) and in the log. Only when the buffer is full are new records dropped, and counted.

No record can stop the writer: what the client sent is made storable (``ExchangeRecord.to_row``),
a record the database still refuses is written in a minimal form, and one that cannot be written
even so is counted as ``failed``, so the records behind it are never held up. Refusals (requests
answered 4xx/5xx before anything was generated) are stored in short form and at most
``REFUSALS_PER_MINUTE`` a minute: a flood of 503s must not bury the exchanges worth keeping.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appliance.requestlog.record import ExchangeRecord
from appliance.requestlog.redact import Redactor
from appliance.requestlog.schema import LogDatabaseError, connect, write
from appliance.requestlog.store import LogStore

log = logging.getLogger(__name__)

BATCH_MAX = 256
RETRY_MAX_S = 5.0
REFUSALS_PER_MINUTE = 60
# the database or the disk is the problem (retry the batch later), not one record
ENVIRONMENT_ERRORS = (sqlite3.OperationalError, LogDatabaseError, OSError)


class RefusalLimiter:
    """A token bucket: ``per_minute`` refusals a minute, in bursts of as many."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._clock = clock
        self._last = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class Retention:
    max_age_days: float | None = None
    max_rows: int | None = None
    max_bytes: int | None = None
    every_s: float = 60.0

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_age_days, self.max_rows, self.max_bytes))


class LogWriter:
    """Owns the only write connection of the server to the log database."""

    path: Path | None

    def __init__(
        self,
        path: Path,
        redactor: Redactor | None = None,
        *,
        max_pending: int = 10_000,
        flush_interval: float = 0.2,
        retention: Retention | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._file = path  # never None, unlike the protocol's ``path``
        self._redactor = redactor or Redactor()
        self._max_pending = max_pending
        self._flush_interval = flush_interval
        self._retention = retention or Retention()
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: deque[ExchangeRecord] = deque()
        self._in_flight = 0
        self._submitted = 0
        self._committed = 0  # of the submitted, how many are settled (written or given up)
        self._written = 0
        self._dropped = 0
        self._failed_records = 0  # could not be written in any form
        self._refusals_skipped = 0  # refusals beyond REFUSALS_PER_MINUTE, counted only
        self._refusals = RefusalLimiter(REFUSALS_PER_MINUTE, clock)
        self._last_error: str | None = None
        self._stopping = False
        self._store: LogStore | None = None
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    # -- the API side: never blocks ------------------------------------------------------

    def submit(self, record: ExchangeRecord) -> bool:
        """Queue a record; False (and counted as dropped) when the buffer is full.

        A refusal is cut to its short form here, so a large refused body is not held in memory,
        or only counted when refusals come faster than the log keeps them.
        """
        if record.is_refusal:
            with self._cond:
                if not self._refusals.allow():
                    self._refusals_skipped += 1
                    if self._refusals_skipped == 1 or self._refusals_skipped % 1000 == 0:
                        log.warning(
                            "more than %d refused requests a minute: only counted, not logged (%d so far)",
                            REFUSALS_PER_MINUTE,
                            self._refusals_skipped,
                        )
                    return False
            record.compact()
        with self._cond:
            if self._stopping or len(self._pending) + self._in_flight >= self._max_pending:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.error("request log buffer full (%d): %d records dropped", self._max_pending, self._dropped)
                return False
            self._pending.append(record)
            self._submitted += 1
            self._cond.notify()
            return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record submitted so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._cond.notify()
            while self._committed < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def status(self) -> dict[str, Any]:
        with self._cond:
            error = self._last_error
            if error is None and not self._thread.is_alive() and not self._stopping:
                error = "the request log writer has stopped"  # cannot happen by design; never hide it
            return {
                "enabled": True,
                "path": str(self.path),
                "written": self._written,
                "pending": len(self._pending) + self._in_flight,
                "dropped": self._dropped,
                "failed": self._failed_records,
                "refusals_not_logged": self._refusals_skipped,
                "error": error,
            }

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is buffered (waiting up to ``timeout``), then stop."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._store is not None:
            with contextlib.suppress(sqlite3.Error):
                self._store.close()
        with self._cond:
            left = len(self._pending) + self._in_flight
        if left:
            log.error("request log: %d records could not be written before shutdown", left)

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        delay = self._flush_interval
        next_retention = 0.0
        while True:
            with self._cond:
                if not self._pending and not self._stopping:
                    self._cond.wait(self._flush_interval)
                if self._stopping and (not self._pending or self._last_error):
                    return
                batch = [self._pending.popleft() for _ in range(min(BATCH_MAX, len(self._pending)))]
                self._in_flight = len(batch)
            try:
                store = self._open()
                failed = self._write(store, batch) if batch else 0
                if self._retention.active and self._clock() >= next_retention:
                    next_retention = self._clock() + self._retention.every_s
                    self._enforce_retention(store)
            except ENVIRONMENT_ERRORS as exc:
                self._failed(batch, exc)
                time.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            except Exception:  # a bug of ours: give the batch up rather than the whole log
                log.exception("request log: %d records could not be written", len(batch))
                failed = len(batch)
            delay = self._flush_interval
            with self._cond:
                self._in_flight = 0
                self._written += len(batch) - failed
                self._failed_records += failed
                self._committed += len(batch)
                if self._last_error is not None:
                    log.warning("request log writable again: %s", self.path)
                self._last_error = None
                self._cond.notify_all()

    def _open(self) -> LogStore:
        if self._store is None:
            self._store = LogStore(connect(self._file))
        return self._store

    def _write(self, store: LogStore, batch: list[ExchangeRecord]) -> int:
        """Commit the batch; return how many records could not be written in any form.

        The whole batch goes in one transaction. If the database refuses it for something other
        than its own state (``ENVIRONMENT_ERRORS``, raised for a retry), it is one record's fault:
        the records are then written one by one, and a refused one in its minimal form.
        """
        rows = [self._row(record) for record in batch]
        try:
            self._insert(store, rows)
            return 0
        except ENVIRONMENT_ERRORS:
            raise
        except Exception as exc:
            log.warning(
                "request log: a batch was refused (%s: %s); writing its records one by one", type(exc).__name__, exc
            )
        failed = 0
        for row in rows:
            try:
                self._insert(store, [row])
                continue
            except ENVIRONMENT_ERRORS:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            try:
                self._insert(store, [_minimal(row, reason)])
                log.error("request log: record %s stored without its content (%s)", row.get("id"), reason)
            except ENVIRONMENT_ERRORS:
                raise
            except Exception:
                log.exception("request log: record %s could not be written", row.get("id"))
                failed += 1
        return failed

    @staticmethod
    def _insert(store: LogStore, rows: list[dict[str, Any]]) -> None:
        with write(store.db):
            store.db["exchanges"].insert_all(rows, replace=True)  # type: ignore[union-attr]

    def _row(self, record: ExchangeRecord) -> dict[str, Any]:
        r = self._redactor
        try:
            record.request = r.value(record.request)
            record.choices = r.value(record.choices)
            record.prompt_text = r.text(record.prompt_text) if record.prompt_text else record.prompt_text
            record.error = r.text(record.error) if record.error else record.error
        except Exception as exc:  # never store what could not be redacted
            log.exception("request log: redaction failed for %s", record.id)
            record.request, record.choices, record.prompt_text = {}, [], None
            record.error = None
            record.notes.append(f"redaction failed ({type(exc).__name__}): content not stored")
        return record.to_row()

    def _enforce_retention(self, store: LogStore) -> None:
        policy = self._retention
        removed = store.enforce_retention(
            max_age_days=policy.max_age_days, max_rows=policy.max_rows, max_bytes=policy.max_bytes
        )
        if removed:
            log.info("request log retention removed %d records", removed)

    def _failed(self, batch: list[ExchangeRecord], exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._pending.extendleft(reversed(batch))  # keep the order, retry them first
            self._in_flight = 0
            if message != self._last_error:
                waiting = len(self._pending)
                log.error("request log %s cannot be written (%s); %d records wait", self.path, message, waiting)
            self._last_error = message
        if self._store is not None and isinstance(exc, LogDatabaseError | sqlite3.DatabaseError):
            with contextlib.suppress(sqlite3.Error):
                self._store.close()
            self._store = None


def _minimal(row: dict[str, Any], reason: str) -> dict[str, Any]:
    """What is always storable of a row: its plain facts, without the client's content.

    A value SQLite cannot hold (an integer past 64 bits, a stray type) is left out too.
    """
    content = ("request", "response", "prompt_text", "response_text", "error", "adapters")
    slim = {k: v for k, v in row.items() if k not in content and _storable(v)}
    slim.update(request="{}", adapters="[]", log_note=f"content not stored: {reason}"[:1000])
    return slim


def _storable(value: Any) -> bool:
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return value is None or isinstance(value, str | float)


class RequestLog(Protocol):
    """What the API needs of the log: the writer, or ``DisabledLog``."""

    path: Path | None

    def submit(self, record: ExchangeRecord) -> bool: ...
    def flush(self, timeout: float = 5.0) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    def close(self, timeout: float = 10.0) -> None: ...


class DisabledLog:
    """Stands in for the writer with ``--no-log``: nothing is recorded, and ``/health`` says so."""

    path: Path | None = None

    def submit(self, record: ExchangeRecord) -> bool:
        return False

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"enabled": False}

    def close(self, timeout: float = 10.0) -> None:
        return None
