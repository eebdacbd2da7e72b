"""Reading and curating the log: filters, pages, one record, feedback, statistics, purging.

Shared by the HTTP API and the CLI; the CLI opens the database directly, next to a running
server (WAL lets readers and one writer work at once).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.requestlog.schema import connect, write

if TYPE_CHECKING:
    from sqlite_utils import Database

STATUSES = ("ok", "client_error", "cancelled", "server_error")
BASE_QUERY = "FROM exchanges e LEFT JOIN feedback f ON f.exchange_id = e.id"


class RecordNotFoundError(LookupError):
    def __init__(self, record_id: str) -> None:
        super().__init__(f"No logged exchange with id '{record_id}'.")
        self.record_id = record_id


@dataclass(frozen=True)
class LogFilter:
    """Which records: every field set narrows the selection."""

    model: str | None = None
    adapter: str | None = None
    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # unix seconds, exclusive
    status: str | None = None
    rating: int | None = None
    tag: str | None = None
    text: str | None = None  # substring of the prompt or the response, case-insensitive
    endpoint: str | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """The SQL condition over ``exchanges e`` and ``feedback f``, with its named parameters."""
        params = {k: v for k, v in vars(self).items() if v is not None and v != ""}
        if "text" in params:
            params["text"] = params["text"].lower()
        clauses = [CLAUSES[name] for name in params]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# the condition each LogFilter field adds, bound to the parameter of the same name
CLAUSES = {
    "model": "e.model = :model",
    "adapter": "EXISTS (SELECT 1 FROM json_each(e.adapters) a WHERE json_extract(a.value, '$.name') = :adapter)",
    "since": "e.created_at >= :since",
    "until": "e.created_at < :until",
    "status": "e.status = :status",
    "rating": "f.rating = :rating",
    "tag": "EXISTS (SELECT 1 FROM json_each(f.tags) t WHERE t.value = :tag)",
    "text": "(instr(lower(e.prompt_text), :text) OR instr(lower(e.response_text), :text))",
    "endpoint": "e.endpoint = :endpoint",
}


def parse_time(value: str) -> float:
    """Unix seconds or an ISO 8601 date/time; ValueError otherwise."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value).timestamp()


SUMMARY_COLUMNS = (
    "e.id, e.created_at, e.client, e.endpoint, e.model, e.adapters, e.stream, e.status, e.finish_reason, "
    "e.prompt_tokens, e.completion_tokens, e.cached_tokens, e.ttft_ms, e.latency_ms, e.error, "
    "substr(e.prompt_text, -200) AS prompt_preview, substr(e.response_text, 1, 200) AS response_preview, "
    "f.rating, f.tags"
)
FULL_COLUMNS = "e.*, f.rating, f.correction, f.tags, f.note"
JSON_COLUMNS = ("adapters", "request", "response", "tags")


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for key in JSON_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    if "tags" in row and row["tags"] is None:  # no feedback row yet
        row["tags"] = []
    if "stream" in row:
        row["stream"] = bool(row["stream"])
    return row


class LogStore:
    """Queries over one log database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def open(cls, path: Path) -> LogStore:
        return cls(connect(path))

    def close(self) -> None:
        self.db.conn.close()

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        cursor = self.db.execute(sql, params or {})
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def count(self, filters: LogFilter) -> int:
        where, params = filters.where()
        return int(self.db.execute(f"SELECT count(*) {BASE_QUERY}{where}", params).fetchone()[0])

    def page(self, filters: LogFilter, *, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Newest first; each row is a summary with previews of the prompt's end and the answer."""
        where, params = filters.where()
        order = "ORDER BY e.created_at DESC, e.id LIMIT :limit OFFSET :offset"
        sql = f"SELECT {SUMMARY_COLUMNS} {BASE_QUERY}{where} {order}"
        return [_decode(r) for r in self._query(sql, {**params, "limit": limit, "offset": offset})]

    def iter_full(self, filters: LogFilter, *, batch: int = 500) -> Iterator[dict[str, Any]]:
        """Every matching record in full with its feedback, oldest first, without loading all at once."""
        where, params = filters.where()
        where += (" AND" if where else " WHERE") + " e.rowid > :after"
        sql = f"SELECT e.rowid AS _rowid, {FULL_COLUMNS} {BASE_QUERY}{where} ORDER BY e.rowid LIMIT :batch"
        after = 0
        while True:
            rows = self._query(sql, {**params, "after": after, "batch": batch})
            if not rows:
                return
            for row in rows:
                after = row.pop("_rowid")
                yield _decode(row)

    def get(self, record_id: str) -> dict[str, Any]:
        rows = self._query(
            f"SELECT {FULL_COLUMNS}, f.updated_at AS feedback_at {BASE_QUERY} WHERE e.id = :id",
            {"id": record_id},
        )
        if not rows:
            raise RecordNotFoundError(record_id)
        return _decode(rows[0])

    def exists(self, record_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM exchanges WHERE id = ?", [record_id]).fetchone() is not None

    def set_feedback(
        self,
        record_id: str,
        *,
        rating: int | None = None,
        correction: str | None = None,
        tags: list[str] | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Merge feedback into the record's: fields left None keep their earlier value."""
        if not self.exists(record_id):
            raise RecordNotFoundError(record_id)
        with write(self.db):
            current = self._query("SELECT * FROM feedback WHERE exchange_id = :id", {"id": record_id})
            row: dict[str, Any] = current[0] if current else {"exchange_id": record_id, "tags": "[]"}
            if rating is not None:
                row["rating"] = rating
            if correction is not None:
                row["correction"] = correction
            if tags is not None:
                row["tags"] = json.dumps(sorted(set(tags)))
            if note is not None:
                row["note"] = note
            row["updated_at"] = time.time()
            self.db["feedback"].upsert(row, pk="exchange_id")  # type: ignore[union-attr]
        return self.get(record_id)

    def stats(self, filters: LogFilter) -> list[dict[str, Any]]:
        """Per model and adapter set: requests, tokens, latency P50/P95, errors and cancellations."""
        where, params = filters.where()
        rows = self._query(
            f"SELECT e.model, e.adapters, e.status, e.prompt_tokens, e.completion_tokens, e.latency_ms, e.ttft_ms "
            f"{BASE_QUERY}{where}",
            params,
        )
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            names = ",".join(a["name"] for a in json.loads(row["adapters"] or "[]")) or "-"
            groups.setdefault((row["model"], names), []).append(row)
        out = []
        for (model, adapters), members in sorted(groups.items()):
            latencies = sorted(r["latency_ms"] for r in members if r["status"] == "ok" and r["latency_ms"] is not None)
            out.append(
                {
                    "model": model,
                    "adapters": adapters,
                    "requests": len(members),
                    "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in members),
                    "completion_tokens": sum(r["completion_tokens"] or 0 for r in members),
                    "latency_p50_ms": _percentile(latencies, 0.50),
                    "latency_p95_ms": _percentile(latencies, 0.95),
                    **{status: sum(r["status"] == status for r in members) for status in STATUSES},
                }
            )
        return out

    def purge(self, filters: LogFilter) -> int:
        """Delete matching records (and their feedback); return how many."""
        where, params = filters.where()
        with write(self.db):
            cursor = self.db.execute(f"DELETE FROM exchanges WHERE id IN (SELECT e.id {BASE_QUERY}{where})", params)
        return int(cursor.rowcount)

    def enforce_retention(self, *, max_age_days: float | None, max_rows: int | None, max_bytes: int | None) -> int:
        """Drop the oldest records beyond the limits; return how many went."""
        removed = 0
        if max_age_days is not None:
            removed += self.purge(LogFilter(until=time.time() - max_age_days * 86400))
        if max_rows is not None:
            n = int(self.db.execute("SELECT count(*) FROM exchanges").fetchone()[0])
            if n > max_rows:
                removed += self._drop_oldest(n - max_rows)
        if max_bytes is not None:
            while (size := self.data_bytes()) > max_bytes:
                n = int(self.db.execute("SELECT count(*) FROM exchanges").fetchone()[0])
                if n == 0:
                    break
                # records are of similar size: drop the share above the limit, at least one
                share = max(1, int(n * (size - max_bytes) / size) + 1)
                removed += self._drop_oldest(min(n, share))
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.db.execute("VACUUM")
        return removed

    def _drop_oldest(self, n: int) -> int:
        with write(self.db):
            cursor = self.db.execute(
                "DELETE FROM exchanges WHERE id IN (SELECT id FROM exchanges ORDER BY created_at LIMIT ?)", [n]
            )
        return int(cursor.rowcount)

    def data_bytes(self) -> int:
        """Bytes the database's pages hold (free pages excluded)."""
        page = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        count = int(self.db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        return page * (count - free)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]
