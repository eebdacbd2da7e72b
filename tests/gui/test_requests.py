"""The Requests screen against a fake client: polling while shown, one poll at a time, cancelling, the chart."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QItemSelectionModel, Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QAbstractButton, QAbstractItemView, QWidget
from pytestqt.qtbot import QtBot

from gui.client import ApiError
from gui.viewmodels.requests import HISTORY_S, RequestsViewModel, load_summary, parse_row
from gui.views.requests import RequestsView

MODEL = "smollm2-135m-instruct"
NOW = 1_780_000_000.0


def entry(request_id: str, state: str, **kw: Any) -> dict[str, Any]:
    """One ``RequestInfo`` as ``GET /v1/appliance/requests`` sends it."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "appliance.request",
        "model": MODEL,
        "adapters": [],
        "client": "local",
        "state": state,
        "status": "running",
        "finish_reason": None,
        "error": None,
        "prompt_tokens": 31,
        "prompt_tokens_done": 31,
        "cached_tokens": 0,
        "completion_tokens": 12,
        "max_tokens": 256,
        "enqueued_at": NOW - 3.0,
        "started_at": NOW - 2.9,
        "finished_at": None,
        "queue_ms": 100.0,
        "ttft_ms": 180.0,
        "tokens_per_second": 38.5,
    }
    body.update(kw)
    return body


def listing() -> dict[str, Any]:
    return {
        "object": "list",
        "created": NOW,
        "data": [
            entry("chatcmpl-aaa", "generating"),
            entry("cmpl-bbb", "prefilling", prompt_tokens=200, prompt_tokens_done=50, completion_tokens=0),
            entry(
                "chatcmpl-ccc",
                "queued",
                client="api-key",
                adapters=[{"name": "pirate", "scale": 0.5}],
                started_at=None,
                completion_tokens=0,
                ttft_ms=None,
                tokens_per_second=None,
            ),
        ],
        "finished": [
            entry(
                "chatcmpl-ddd",
                "finished",
                status="ok",
                finish_reason="length",
                finished_at=NOW - 1.0,
                completion_tokens=256,
            ),
            entry(
                "chatcmpl-eee",
                "finished",
                status="cancelled",
                finish_reason="cancelled",
                error="cancelled on the server (DELETE /v1/appliance/requests)",
                finished_at=NOW - 2.0,
            ),
        ],
        "models": [
            {"model": MODEL, "slots": 4, "active": 2, "queued": 1, "tokens_per_second": 61.0},
        ],
    }


class FakeClient:
    """The two routes of this screen, with canned answers; ``gate`` holds a poll in flight."""

    base_url = "http://127.0.0.1:9999"

    def __init__(self) -> None:
        self.answer = listing()
        self.polls = 0
        self.cancelled: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: ApiError | None = None
        self.cancel_fail: ApiError | None = None

    def requests(self, finished: int = 100) -> dict[str, Any]:
        self.polls += 1
        self.gate.wait(5)
        if self.fail is not None:
            raise self.fail
        return copy.deepcopy(self.answer)

    def cancel_request(self, request_id: str) -> dict[str, Any]:
        if self.cancel_fail is not None:
            raise self.cancel_fail
        self.cancelled.append(request_id)
        live = self.answer["data"]
        [gone] = [e for e in live if e["id"] == request_id]
        live.remove(gone)
        gone.update(state="finished", status="cancelled", finish_reason="cancelled", finished_at=NOW)
        self.answer["finished"].insert(0, gone)
        return {"id": request_id, "object": "appliance.request", "cancelled": True, "ended": True}


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def vm(client: FakeClient) -> RequestsViewModel:
    return RequestsViewModel(client)  # type: ignore[arg-type]


@pytest.fixture
def view(qtbot: QtBot, vm: RequestsViewModel) -> RequestsView:
    widget = RequestsView(vm)
    qtbot.addWidget(widget)
    return widget


def loaded(qtbot: QtBot, vm: RequestsViewModel) -> None:
    with qtbot.waitSignal(vm.loaded, timeout=5000):
        vm.refresh()
    qtbot.waitUntil(lambda: not vm.polling)


def select(view: RequestsView, request_id: str) -> None:
    row = [r.id for r in view.model.rows].index(request_id)
    flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
    view.table.selectionModel().setCurrentIndex(view.model.index(row, 0), flags)


def test_rows_in_words() -> None:
    rows = [parse_row(e, NOW) for e in listing()["data"] + listing()["finished"]]
    assert [r.status for r in rows] == ["generating", "prefilling 25 %", "queued", "ok (length)", "cancelled"]
    assert [r.running for r in rows] == [True, True, True, False, False]
    assert rows[2].model == f"{MODEL} + pirate ×0.5" and rows[2].client == "api-key"
    assert rows[0].duration_s == pytest.approx(3.0) and rows[3].duration_s == pytest.approx(2.0)
    assert load_summary(listing()["models"]) == f"{MODEL}: 2 of 4 slots busy, 1 queued, 61.0 tokens/s"
    assert load_summary([]) == "No model is loaded."


def test_the_table_shows_the_requests(qtbot: QtBot, vm: RequestsViewModel, view: RequestsView) -> None:
    loaded(qtbot, vm)
    model = view.model
    assert model.rowCount() == 5
    cells = [model.index(0, c).data() for c in range(model.columnCount())]
    assert cells[1:] == ["chatcmpl-aaa", "local", MODEL, "generating", "31", "12", "180 ms", "38.5", "3.0 s"]
    assert model.index(2, 7).data() == "–"  # no first token yet
    assert "DELETE" in model.index(4, 0).data(Qt.ItemDataRole.ToolTipRole)
    assert view.counts.text() == "3 queued or running, 2 finished"
    assert "2 of 4 slots busy" in view.summary.text()


def test_polls_only_while_shown(qtbot: QtBot, client: FakeClient, vm: RequestsViewModel, view: RequestsView) -> None:
    vm.timer.setInterval(20)
    assert not vm.timer.isActive() and client.polls == 0
    view.show()
    qtbot.waitUntil(lambda: client.polls >= 3)
    view.hide()
    assert not vm.timer.isActive()
    qtbot.waitUntil(lambda: not vm.polling)
    polls = client.polls
    qtbot.wait(100)  # five intervals: a running timer would have polled again
    assert client.polls == polls


def test_never_two_polls_in_flight(qtbot: QtBot, client: FakeClient, vm: RequestsViewModel) -> None:
    client.gate.clear()
    for _ in range(5):
        vm.poll()
    qtbot.waitUntil(lambda: client.polls == 1)
    assert vm.polling
    with qtbot.waitSignal(vm.loaded):
        client.gate.set()
    qtbot.waitUntil(lambda: not vm.polling)
    assert client.polls == 1
    vm.poll()
    qtbot.waitUntil(lambda: client.polls == 2)


def test_cancel_the_selected_running_request(
    qtbot: QtBot, client: FakeClient, vm: RequestsViewModel, view: RequestsView
) -> None:
    loaded(qtbot, vm)
    assert not view.cancel_button.isEnabled()  # nothing selected
    select(view, "chatcmpl-ddd")
    assert vm.selected_id == "chatcmpl-ddd" and not view.cancel_button.isEnabled()  # finished
    select(view, "chatcmpl-aaa")
    assert view.cancel_button.isEnabled()
    QTest.mouseClick(view.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: vm.selected is not None and not vm.selected.running)
    assert client.cancelled == ["chatcmpl-aaa"]
    assert vm.selected is not None and vm.selected.status == "cancelled"
    # its row moved to the finished part; the selection followed it
    selected = [i.row() for i in view.table.selectionModel().selectedRows()]
    assert selected == [[r.id for r in view.model.rows].index("chatcmpl-aaa")]
    assert not view.cancel_button.isEnabled()
    assert view.status.text() == "Cancelled chatcmpl-aaa."


def test_delete_key_cancels(qtbot: QtBot, client: FakeClient, vm: RequestsViewModel, view: RequestsView) -> None:
    view.show()
    qtbot.waitUntil(lambda: len(view.model.rows) == 5)
    select(view, "chatcmpl-ccc")
    view.table.setFocus()
    qtbot.waitUntil(view.table.hasFocus)
    QTest.keyClick(view.table, Qt.Key.Key_Delete)
    qtbot.waitUntil(lambda: client.cancelled == ["chatcmpl-ccc"])


def test_a_failed_cancel_says_why(qtbot: QtBot, client: FakeClient, vm: RequestsViewModel, view: RequestsView) -> None:
    loaded(qtbot, vm)
    select(view, "chatcmpl-aaa")
    client.cancel_fail = ApiError("The request 'chatcmpl-aaa' has already finished.", status=409)
    with qtbot.waitSignal(vm.error) as signal:
        vm.cancel_selected()
    assert "already finished" in signal.args[0]
    qtbot.waitUntil(lambda: not vm.polling)
    assert "Could not cancel chatcmpl-aaa" in view.status.text()
    assert view.cancel_button.isEnabled()  # still running: it may be tried again


def test_server_gone_shows_once_and_recovers(
    qtbot: QtBot, client: FakeClient, vm: RequestsViewModel, view: RequestsView
) -> None:
    client.fail = ApiError("The server at http://127.0.0.1:9999 cannot be reached (ConnectError).")
    errors: list[str] = []
    vm.error.connect(errors.append)
    with qtbot.waitSignal(vm.loaded):
        vm.poll()
    for _ in range(2):
        qtbot.waitUntil(lambda: not vm.polling)
        vm.poll()
    qtbot.waitUntil(lambda: client.polls == 3 and not vm.polling)
    assert len(errors) == 1 and "cannot be reached" in view.status.text()
    client.fail = None
    vm.poll()
    qtbot.waitUntil(lambda: view.model.rowCount() == 5)
    assert view.status.text() == ""


def test_chart_keeps_its_curves_and_two_minutes(qtbot: QtBot, client: FakeClient, view: RequestsView) -> None:
    clock = [1000.0]
    vm = RequestsViewModel(client, clock=lambda: clock[0])  # type: ignore[arg-type]
    view = RequestsView(vm)
    qtbot.addWidget(view)
    curve = view.charts.tps_curve
    for _ in range(130):
        vm.poll()
        qtbot.waitUntil(lambda: not vm.polling)
        clock[0] += 1.0
    assert view.charts.tps_curve is curve
    assert len(view.charts.throughput.listDataItems()) == 1 and len(view.charts.load.listDataItems()) == 3
    xs, ys = curve.getData()
    assert len(xs) == HISTORY_S + 1 and (xs[0], xs[-1]) == (-HISTORY_S, 0.0) and ys[-1] == 61.0
    _, queued = view.charts.queued_curve.getData()
    _, slots = view.charts.slots_curve.getData()
    assert queued[-1] == 1 and slots[-1] == 4


def test_every_control_has_an_accessible_name(view: RequestsView) -> None:
    for widget in view.findChildren(QWidget):
        if isinstance(widget, QAbstractButton | QAbstractItemView) and widget.isVisibleTo(view):
            assert widget.accessibleName(), widget
    assert view.charts.throughput.accessibleName() and view.charts.load.accessibleName()
    assert view.cancel_button.text() == "&Cancel request"  # Alt+C


def test_renders_at_window_size(qtbot: QtBot, vm: RequestsViewModel, view: RequestsView, tmp_path: Path) -> None:
    loaded(qtbot, vm)
    view.resize(1280, 800)
    image = view.grab()
    assert (image.width(), image.height()) == (1280, 800)
    assert image.save(str(tmp_path / "requests.png"))
