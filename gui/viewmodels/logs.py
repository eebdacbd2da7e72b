"""The Logs screen: browse the request log, rate and correct answers, export them as training data.

The log is where fine-tuning data comes from, so this screen is a curation tool: filter down to the
exchanges worth looking at, read one, mark it good or bad, write the answer it should have given,
and export the result in the format a trainer takes. Everything goes through the server's
``/v1/appliance/logs`` routes; the table pages through the log (``PAGE`` rows at a time) because a
log holds far more exchanges than anyone scrolls through.

Answers to requests can arrive out of order (the filters changed, another row was selected while a
record was on its way), so each carries what it was asked for, and a stale one is dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, Signal

from gui import tasks
from gui.client import ApiClient, ApiError
from gui.viewmodels.base import ScreenViewModel

log = logging.getLogger(__name__)

PAGE = 50
STATUSES = ("ok", "client_error", "cancelled", "server_error")
RATINGS = {1: "👍", -1: "👎"}  # how a rating is drawn; views may swap in marks their fonts have
RATING_WORDS = {1: "good", -1: "bad"}
# the time filter offers recent windows: what someone curating a log asks for ("what happened today")
TIME_RANGES: dict[str, float | None] = {
    "Any time": None,
    "Last hour": 3600.0,
    "Last 24 hours": 86400.0,
    "Last 7 days": 7 * 86400.0,
    "Last 30 days": 30 * 86400.0,
}
FORMATS = {  # what the export formats are called on screen
    "chat": "Chat messages",
    "dpo": "DPO preference pairs",
    "completions": "Prompt/completion",
}
PROGRESS_EVERY_S = 0.05  # at most ~20 progress updates a second reach the GUI thread

Index = QModelIndex | QPersistentModelIndex


@dataclass
class LogFilters:
    """What the table shows; empty fields do not filter."""

    model: str = ""
    adapter: str = ""
    status: str = ""
    rating: int | None = None
    within_s: float | None = None  # only the last so many seconds
    text: str = ""

    def params(self, now: float) -> dict[str, Any]:
        """The query parameters of ``/v1/appliance/logs`` (and its export) for these filters."""
        return {
            "model": self.model.strip() or None,
            "adapter": self.adapter.strip() or None,
            "status": self.status or None,
            "rating": self.rating,
            "since": f"{now - self.within_s:.3f}" if self.within_s is not None else None,
            "q": self.text.strip() or None,
        }


# -- how a record reads ---------------------------------------------------------------------------


def adapter_names(record: dict[str, Any]) -> str:
    return ", ".join(str(a.get("name", "?")) for a in record.get("adapters") or [] if isinstance(a, dict))


def when(record: dict[str, Any]) -> str:
    created = record.get("created_at")
    return datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S") if isinstance(created, int | float) else ""


def prompt_messages(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The request as (role, text) pairs: a chat's messages, or a completion's prompt."""
    request = record.get("request")
    if not isinstance(request, dict):
        return [("prompt", str(record.get("prompt_text") or ""))]
    if isinstance(request.get("messages"), list):
        return [(str(m.get("role", "?")), _text(m.get("content"))) for m in request["messages"] if isinstance(m, dict)]
    prompt = request.get("prompt")
    prompts = prompt if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) else [prompt]
    return [("prompt", p if isinstance(p, str) else str(p)) for p in prompts]


def answer_text(record: dict[str, Any]) -> str:
    """What the model answered (the first choice's text), or the logged response text."""
    response = record.get("response")
    for choice in (response.get("choices") if isinstance(response, dict) else None) or []:
        if isinstance(choice, dict) and isinstance(choice.get("text"), str):
            return str(choice["text"])
    return str(record.get("response_text") or "")


def facts(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The numbers and states worth a glance, in reading order; absent ones are left out."""

    def ms(value: Any) -> str | None:
        return f"{value:.0f} ms" if isinstance(value, int | float) else None

    status = str(record.get("status") or "")
    if record.get("http_status"):
        status += f" (HTTP {record['http_status']})"
    tokens = None
    if record.get("prompt_tokens") is not None or record.get("completion_tokens") is not None:
        tokens = f"{record.get('prompt_tokens') or 0} prompt + {record.get('completion_tokens') or 0} completion"
    speed = record.get("tokens_per_s")
    rows = [
        ("When", when(record)),
        ("Model", str(record.get("model") or "")),
        ("Adapters", adapter_names(record)),
        ("Client", str(record.get("client") or "")),
        ("Status", status),
        ("Finish", str(record.get("finish_reason") or "")),
        ("Tokens", tokens),
        ("First token", ms(record.get("ttft_ms"))),
        ("Latency", ms(record.get("latency_ms"))),
        ("Speed", f"{speed:.1f} tokens/s" if isinstance(speed, int | float) else None),
        ("Error", str(record.get("error") or "")),
        ("Tags", ", ".join(str(t) for t in record.get("tags") or [])),
    ]
    return [(name, value) for name, value in rows if value]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


# -- the table ------------------------------------------------------------------------------------


def _tokens(row: dict[str, Any]) -> str:
    if row.get("prompt_tokens") is None and row.get("completion_tokens") is None:
        return ""
    return f"{row.get('prompt_tokens') or 0} + {row.get('completion_tokens') or 0}"


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())


COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("Time", when),
    ("Model", lambda r: str(r.get("model") or "")),
    ("Adapter", adapter_names),
    ("Status", lambda r: str(r.get("status") or "")),
    ("Rating", lambda r: ""),  # drawn with the table's marks
    ("Tokens", _tokens),
    ("Latency", lambda r: f"{r['latency_ms']:.0f} ms" if isinstance(r.get("latency_ms"), int | float) else ""),
    ("Prompt", lambda r: _one_line(r.get("prompt_preview"))),
    ("Answer", lambda r: _one_line(r.get("response_preview") or r.get("error"))),
)
NUMERIC = frozenset({"Tokens", "Latency"})
CENTERED = frozenset({"Rating"})


class LogTableModel(QAbstractTableModel):
    """The rows loaded so far, for a QTableView; pages are appended, so the selection stays put."""

    def __init__(self, parent: ScreenViewModel | None = None) -> None:
        super().__init__(parent)
        self.rows: list[dict[str, Any]] = []
        self.marks = dict(RATINGS)

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802, B008 (Qt's name and signature)
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802, B008 (Qt's name and signature)
        return 0 if parent.isValid() else len(COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row, (name, show) = self.rows[index.row()], COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return self.marks.get(row.get("rating") or 0, "") if name == "Rating" else show(row)
        if role == Qt.ItemDataRole.ToolTipRole and name in ("Prompt", "Answer", "Adapter"):
            return show(row) or None
        if role == Qt.ItemDataRole.TextAlignmentRole:
            if name in NUMERIC:
                return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            if name in CENTERED:
                return int(Qt.AlignmentFlag.AlignCenter)
        return None

    def headerData(  # noqa: N802 (Qt's name)
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section][0]
        return None

    def replace(self, rows: list[dict[str, Any]]) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.endResetModel()

    def append(self, rows: list[dict[str, Any]]) -> None:
        known = {r.get("id") for r in self.rows}
        fresh = [r for r in rows if r.get("id") not in known]  # rows logged meanwhile shift the pages
        if not fresh:
            return
        self.beginInsertRows(QModelIndex(), len(self.rows), len(self.rows) + len(fresh) - 1)
        self.rows.extend(fresh)
        self.endInsertRows()

    def update(self, record: dict[str, Any]) -> None:
        """Take the feedback of a record just rated or corrected into its row."""
        for i, row in enumerate(self.rows):
            if row.get("id") == record.get("id"):
                row.update({k: record[k] for k in ("rating", "tags") if k in record})
                self.dataChanged.emit(self.index(i, 0), self.index(i, len(COLUMNS) - 1))
                return

    def record_id(self, row: int) -> str | None:
        return str(self.rows[row]["id"]) if 0 <= row < len(self.rows) else None


# -- the screen -----------------------------------------------------------------------------------


class LogsViewModel(ScreenViewModel):
    title = "Logs"
    detail_changed = Signal()  # the selected exchange (or its feedback) changed
    export_progress = Signal(int, int)  # lines written, records the export reads
    export_state = Signal()  # an export started or ended

    def __init__(self, client: ApiClient, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(client)
        self.clock = clock
        self.filters = LogFilters()
        self.table = LogTableModel(self)
        self.total = 0
        self.has_more = False
        self.models: list[str] = []
        self.adapters: list[str] = []
        self.detail: dict[str, Any] | None = None
        self.selected_id: str | None = None
        self.notice = ""  # what the last action did, in words
        self.export_format = "chat"
        self.export_dedupe = False
        self.export_path: Path | None = None
        self.exporting = False
        self.exported: tuple[int, int] | None = None  # lines, records of the last export that finished
        self._query = 0  # bumped when the filters change: pages of an older query are dropped
        self._params: dict[str, Any] = {}  # the query of the first page, so later pages use the same "since"
        self._loading_more = False
        self._cancel: threading.Event | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.table.rows

    # -- browsing ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """The first page, and the model and adapter names for the filters."""
        self._load_first_page(notify_loaded=True, with_names=True)

    def set_filters(self, **changes: Any) -> None:
        """Change some filters (``LogFilters`` field names) and load the first page they select."""
        for name, value in changes.items():
            if not hasattr(self.filters, name):
                raise AttributeError(f"no log filter {name!r}")
            setattr(self.filters, name, value)
        self._load_first_page()

    def load_more(self) -> None:
        """The next page, appended to the table."""
        if not self.has_more or self._loading_more:
            return
        self._loading_more = True
        query, params, offset = self._query, self._params, len(self.rows)

        def done(page: dict[str, Any]) -> None:
            self._loading_more = False
            if query == self._query:
                self.table.append(page["data"])
                self.total, self.has_more = page["total"], bool(page["has_more"])
            self.changed.emit()

        def failed(message: str) -> None:  # "more" stays available: the user may try again
            self._loading_more, self.last_error = False, message
            self.error.emit(message)
            self.changed.emit()

        tasks.run(lambda: self.client.logs(limit=PAGE, offset=offset, **params), done, failed)

    def _load_first_page(self, *, notify_loaded: bool = False, with_names: bool = False) -> None:
        self._query += 1
        query = self._query
        params = self._params = self.filters.params(self.clock())

        def fetch() -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
            page = self.client.logs(limit=PAGE, offset=0, **params)
            return page, self._model_cards() if with_names else None

        def done(result: tuple[dict[str, Any], list[dict[str, Any]] | None]) -> None:
            page, cards = result
            if cards is not None:
                self._names_in(cards)
            if query != self._query:
                return
            self._loading_more = False
            self.table.replace(page["data"])
            self.total, self.has_more = page["total"], bool(page["has_more"])
            if self.selected_id is not None and self.selected_id not in {r.get("id") for r in self.rows}:
                self.select(None)

        # one call, so ``loaded`` means the table and the filters' names are both in
        self.call(fetch, done, notify_loaded=notify_loaded)

    def _model_cards(self) -> list[dict[str, Any]] | None:
        """In the worker: the served models; without them the filters still take typed names."""
        try:
            return self.client.models()
        except ApiError as exc:
            log.warning("no model names for the log filters: %s", exc)
            return None

    def _names_in(self, cards: list[dict[str, Any]]) -> None:
        # an adapter is listed as "<model>:<adapter>" with the model as its parent
        self.models = sorted({str(c["id"]) for c in cards if not c.get("parent")})
        self.adapters = sorted({str(c["id"]).split(":", 1)[1] for c in cards if c.get("parent") and ":" in c["id"]})

    # -- one exchange --------------------------------------------------------------------------

    def select(self, record_id: str | None) -> None:
        """Show one exchange in full (``None``: none)."""
        if record_id == self.selected_id and (record_id is None or self.detail is not None):
            return
        self.selected_id, self.detail, self.notice = record_id, None, ""
        self.detail_changed.emit()
        if record_id is None:
            return

        def done(record: dict[str, Any]) -> None:
            if record_id == self.selected_id:
                self.detail = record
                self.detail_changed.emit()

        self.call(lambda: self.client.log(record_id), done)

    def rate(self, rating: int) -> None:
        """+1 a good answer, -1 a bad one."""
        if rating not in RATINGS:
            raise ValueError(f"a rating is +1 or -1, not {rating}")
        self._feedback(f"Rated {RATING_WORDS[rating]}.", rating=rating)

    def save_correction(self, text: str) -> None:
        """Keep ``text`` as the answer the model should have given: exports train on it instead."""
        if not text.strip():
            self.last_error = "Write the corrected answer first."
            self.error.emit(self.last_error)
            return
        self._feedback("Correction saved.", correction=text)

    def _feedback(self, notice: str, **feedback: Any) -> None:
        record_id = self.selected_id
        if record_id is None:
            return

        def done(record: dict[str, Any]) -> None:
            self.table.update(record)
            if record_id == self.selected_id:
                self.detail, self.notice = record, notice
                self.detail_changed.emit()

        self.call(lambda: self.client.log_feedback(record_id, **feedback), done)

    # -- export --------------------------------------------------------------------------------

    def start_export(self, path: Path | None = None) -> None:
        """Export what the filters select to ``path`` (or ``export_path``), in ``export_format``.

        The file is written next to its target under a temporary name and renamed once complete,
        so a failed or cancelled export leaves no half file; it is readable by the owner only, as
        the log is, since prompts may hold personal data.
        """
        if self.exporting:
            return
        self.export_path = Path(path) if path is not None else self.export_path
        if self.export_path is None:
            self.last_error = "Choose a file to export to."
            self.error.emit(self.last_error)
            return
        target, fmt, dedupe = self.export_path, self.export_format, self.export_dedupe
        params = self.filters.params(self.clock())
        cancel = self._cancel = threading.Event()
        self.exporting, self.exported, self.notice = True, None, ""
        self.export_state.emit()

        def work(emit: Callable[[Any], None]) -> tuple[int, int] | None:
            return _write_export(self.client, target, fmt, dedupe, params, cancel, emit)

        def done(result: tuple[int, int] | None) -> None:
            self.exporting, self._cancel = False, None
            if result is None:
                self.notice = "Export cancelled."
            else:
                self.exported = result
                self.export_progress.emit(result[1], result[1])
                self.notice = f"Exported {result[0]} examples to {target.name}."
            self.export_state.emit()

        def failed(message: str) -> None:
            self.exporting, self._cancel, self.last_error = False, None, message
            self.error.emit(message)
            self.export_state.emit()

        def progress(value: Any) -> None:
            self.export_progress.emit(*value)

        tasks.run(work, done, failed, on_progress=progress)

    def cancel_export(self) -> None:
        if self._cancel is not None:
            self._cancel.set()


def _write_export(
    client: ApiClient,
    target: Path,
    fmt: str,
    dedupe: bool,
    params: dict[str, Any],
    cancel: threading.Event,
    emit: Callable[[Any], None],
) -> tuple[int, int] | None:
    """In a worker: stream the export into a staged file; (lines, records), or None when cancelled."""
    staged = target.with_name(f".{target.name}.part")
    lines = total = 0
    last = 0.0
    try:
        fd = os.open(staged, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with open(fd, "wb") as fh:
            for chunk, total in client.export_logs(fmt, dedupe=dedupe, cancel=cancel, **params):
                fh.write(chunk)
                lines += chunk.count(b"\n")
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    emit((min(lines, total), total))
        if cancel.is_set():
            staged.unlink(missing_ok=True)
            return None
        os.replace(staged, target)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise ApiError(f"Cannot write {exc.filename or target}: {exc.strerror or exc}.") from exc
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return lines, total
