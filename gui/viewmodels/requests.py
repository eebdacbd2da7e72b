"""The Requests screen's state: what the server is doing now, its load over the last minutes, and cancelling.

It polls ``GET /v1/appliance/requests`` once a second, but only while the screen is shown (a
hidden screen costs nothing), and with one poll in flight at most, so a slow server gets fewer
polls instead of a pile of them. Each answer becomes plain rows (``RequestRow``) that the view's
table shows as they are, and one load sample (throughput, queue depth, busy slots) for the chart.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QTimer

from gui import tasks
from gui.client import ApiClient
from gui.viewmodels.base import ScreenViewModel

POLL_MS = 1000
IDLE_POLL_MS = 3000  # nothing queued or running: a slower pace keeps an idle window near 0 % CPU
HISTORY_S = 120.0  # how far back the chart reaches
RUNNING_STATES = frozenset({"queued", "prefilling", "generating"})


@dataclass(frozen=True)
class RequestRow:
    """One line of the table: a queued, running or finished request, in words and numbers."""

    id: str
    client: str
    model: str  # with its adapters: "smollm2 + pirate"
    state: str  # queued, prefilling, generating, finished
    status: str  # what the table shows: "generating", "ok (length)", "cancelled"...
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    tokens_per_second: float | None
    enqueued_at: float  # unix time
    duration_s: float | None  # queued to finished, or to now while it runs
    error: str | None

    @property
    def running(self) -> bool:
        """Queued or running: it can still be cancelled."""
        return self.state in RUNNING_STATES


@dataclass(frozen=True)
class LoadSample:
    """The whole server's load at one poll (all models added up)."""

    time: float  # the GUI's monotonic clock
    tokens_per_second: float
    queued: int
    active: int
    slots: int


def _model_label(entry: dict[str, Any]) -> str:
    adapters = entry.get("adapters") or []
    names = [a["name"] if a.get("scale", 1.0) == 1.0 else f"{a['name']} ×{a['scale']:g}" for a in adapters]
    return " + ".join([str(entry.get("model", "?")), *names])


def _status(entry: dict[str, Any]) -> str:
    state = str(entry.get("state", "?"))
    if state == "prefilling" and entry.get("prompt_tokens"):
        return f"prefilling {100 * entry.get('prompt_tokens_done', 0) // entry['prompt_tokens']} %"
    if state != "finished":
        return state
    status, reason = str(entry.get("status", "?")), entry.get("finish_reason")
    return f"{status} ({reason})" if status == "ok" and reason else status


def parse_row(entry: dict[str, Any], now: float) -> RequestRow:
    """A row from one ``RequestInfo`` of the route; ``now`` (unix time) dates the running ones."""
    enqueued = float(entry.get("enqueued_at") or 0.0)
    end = entry.get("finished_at")
    return RequestRow(
        id=str(entry.get("id", "")),
        client=entry.get("client") or "–",
        model=_model_label(entry),
        state=str(entry.get("state", "?")),
        status=_status(entry),
        prompt_tokens=int(entry.get("prompt_tokens") or 0),
        completion_tokens=int(entry.get("completion_tokens") or 0),
        ttft_ms=entry.get("ttft_ms"),
        tokens_per_second=entry.get("tokens_per_second"),
        enqueued_at=enqueued,
        duration_s=max(0.0, (float(end) if end is not None else now) - enqueued) if enqueued else None,
        error=entry.get("error"),
    )


def load_summary(models: list[dict[str, Any]]) -> str:
    """One line per model: its busy slots, queue and speed."""
    lines = [
        f"{m.get('model', '?')}: {m.get('active', 0)} of {m.get('slots', 0)} slots busy, "
        f"{m.get('queued', 0)} queued, {float(m.get('tokens_per_second', 0.0)):.1f} tokens/s"
        for m in models
    ]
    return "\n".join(lines) or "No model is loaded."


class RequestsViewModel(ScreenViewModel):
    title = "Requests"

    def __init__(self, client: ApiClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(client)
        self._clock = clock
        self.rows: list[RequestRow] = []
        self.models: list[dict[str, Any]] = []
        self.history: deque[LoadSample] = deque()
        self.selected_id: str | None = None
        self.cancelling: set[str] = set()
        self.notice: str | None = None  # the outcome of the last cancel
        self.notice_failed = False
        self._in_flight = False
        self._has_loaded = False
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    # -- polling ------------------------------------------------------------------------------

    def refresh(self) -> None:
        self.poll()

    def set_visible(self, visible: bool) -> None:
        """Poll while the screen is shown (at once when it appears; every second while requests run, every 3 s
        otherwise); not at all while hidden."""
        if visible:
            self.poll()
            self.timer.start()
        else:
            self.timer.stop()

    @property
    def polling(self) -> bool:
        """Whether a poll is in flight (then ``poll`` does nothing)."""
        return self._in_flight

    def poll(self) -> None:
        """Ask for the requests and the load once, unless a poll is still on its way."""
        if self._in_flight:
            return
        self._in_flight = True
        tasks.run(self.client.requests, self._got, self._failed)

    def _got(self, data: dict[str, Any]) -> None:
        self._in_flight = False
        now = float(data.get("created") or time.time())
        entries = [*data.get("data", []), *data.get("finished", [])]
        self.rows = [parse_row(e, now) for e in entries]
        self.models = list(data.get("models", []))
        self.cancelling &= {r.id for r in self.rows if r.running}
        self._sample()
        self.last_error = None
        busy = any(r.running for r in self.rows) or any(m.get("active") or m.get("queued") for m in self.models)
        self.timer.setInterval(POLL_MS if busy else IDLE_POLL_MS)
        self._settled()

    def _failed(self, message: str) -> None:
        # a poll a second would repeat the same message: only a new one is announced
        self._in_flight = False
        if message != self.last_error:
            self.last_error = message
            self.error.emit(message)
        self._settled()

    def _settled(self) -> None:
        self.changed.emit()
        if not self._has_loaded:
            self._has_loaded = True
            self.loaded.emit()

    def _sample(self) -> None:
        t = self._clock()
        self.history.append(
            LoadSample(
                time=t,
                tokens_per_second=sum(float(m.get("tokens_per_second", 0.0)) for m in self.models),
                queued=sum(int(m.get("queued", 0)) for m in self.models),
                active=sum(int(m.get("active", 0)) for m in self.models),
                slots=sum(int(m.get("slots", 0)) for m in self.models),
            )
        )
        while self.history and t - self.history[0].time > HISTORY_S:
            self.history.popleft()

    def series(self) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
        """The chart's data: seconds ago (negative), throughput, queue depth, busy slots, slots."""
        now = self._clock()
        h = self.history
        return (
            [s.time - now for s in h],
            [s.tokens_per_second for s in h],
            [float(s.queued) for s in h],
            [float(s.active) for s in h],
            [float(s.slots) for s in h],
        )

    @property
    def summary(self) -> str:
        return load_summary(self.models)

    # -- selection and cancelling -------------------------------------------------------------

    def select(self, request_id: str | None) -> None:
        if request_id != self.selected_id:
            self.selected_id = request_id
            self.changed.emit()

    @property
    def selected(self) -> RequestRow | None:
        return next((r for r in self.rows if r.id == self.selected_id), None)

    @property
    def can_cancel(self) -> bool:
        row = self.selected
        return row is not None and row.running and row.id not in self.cancelling

    def cancel_selected(self) -> None:
        """Cancel the selected request if it still runs; the table shows it finished at the next poll."""
        row = self.selected
        if row is None or not self.can_cancel:
            return
        request_id = row.id
        self.cancelling.add(request_id)
        self.notice, self.notice_failed = f"Cancelling {request_id}…", False
        self.changed.emit()
        tasks.run(
            lambda: self.client.cancel_request(request_id),
            lambda _: self._cancelled(request_id),
            lambda message: self._cancel_failed(request_id, message),
        )

    def _cancelled(self, request_id: str) -> None:
        self.notice = f"Cancelled {request_id}."
        self.changed.emit()
        self.poll()

    def _cancel_failed(self, request_id: str, message: str) -> None:
        # kept until the next cancel, unlike a poll's error, which the next answer clears
        self.cancelling.discard(request_id)
        self.notice, self.notice_failed = f"Could not cancel {request_id}: {message}", True
        self.error.emit(self.notice)
        self.changed.emit()
        self.poll()
