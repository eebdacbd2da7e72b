"""The Logs screen: browse, filter, page, rate, correct and export, against a fake client, then once for real.

The fake keeps its records in memory and filters them the way the server does, so the tests read
as a user's session: narrow the list, open an exchange, rate it, export what is left.
"""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWidget
from pytestqt.qtbot import QtBot

from gui.client import ApiClient, ApiError
from gui.viewmodels.logs import PAGE, LogsViewModel, answer_text, facts, prompt_messages
from gui.views.logs import LogsView

NOW = 1_717_000_000.0
MODELS = ("smollm2-135m-instruct", "qwen2.5-0.5b-instruct")
PROMPTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    (
        "Write a haiku about autumn leaves.",
        "Crimson leaves descend\nwhispering to the cold earth\nthe park holds its breath",
    ),
    ("Summarise: the quarterly review moves to Thursday.", "The review is now on Thursday."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("TCP or UDP for a video call?", "UDP: a late frame is worth less than a lost one."),
)
STATUSES = ("ok", "ok", "ok", "cancelled", "server_error", "ok", "client_error")


def record(i: int) -> dict[str, Any]:
    status = STATUSES[i % len(STATUSES)]
    prompt, answer = PROMPTS[i % len(PROMPTS)]
    ok = status == "ok"
    return {
        "id": f"chatcmpl-{i:04d}",
        "created_at": NOW - i * 97,
        "client": "127.0.0.1",
        "endpoint": "chat.completions",
        "model": MODELS[i % 2],
        "adapters": [{"name": "pirate", "scale": 1.0}] if i % 4 == 0 else [],
        "status": status,
        "http_status": {"ok": 200, "server_error": 500, "client_error": 400}.get(status),
        "finish_reason": "stop" if ok else None,
        "prompt_tokens": 20 + i % 13,
        "completion_tokens": 8 + i % 31 if ok else 0,
        "ttft_ms": 41.5 + i,
        "latency_ms": 310.0 + 7 * i,
        "tokens_per_s": 58.2,
        "error": {"server_error": "engine failed: out of memory", "client_error": "max_tokens is too large"}.get(
            status
        ),
        "prompt_preview": prompt,
        "response_preview": answer if ok else None,
        "rating": {0: 1, 3: -1}.get(i % 5),
        "tags": [],
        "request": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]},
        "response": {"choices": [{"index": 0, "text": answer}]} if ok else None,
        "correction": None,
    }


class FakeClient:
    """The log routes of ``ApiClient`` over records in memory, filtered as the server filters."""

    base_url = "http://127.0.0.1:9999"

    def __init__(self, n: int = 120) -> None:
        self.records = [record(i) for i in range(n)]
        self.queries: list[dict[str, Any]] = []
        self.feedback: list[tuple[str, dict[str, Any]]] = []
        self.exports: list[dict[str, Any]] = []
        self.gate = threading.Event()  # the export waits here after its first piece
        self.gate.set()
        self.fail_export_midway = False
        self.held: dict[str, threading.Event] = {}  # pages of these statuses wait for their event

    def models(self) -> list[dict[str, Any]]:
        return [{"id": MODELS[0]}, {"id": MODELS[1]}, {"id": f"{MODELS[0]}:pirate", "parent": MODELS[0]}]

    def _select(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        def keep(r: dict[str, Any]) -> bool:
            text = (filters.get("q") or "").lower()
            return (
                filters.get("model") in (None, r["model"])
                and filters.get("adapter") in (None, *(a["name"] for a in r["adapters"]))
                and filters.get("status") in (None, r["status"])
                and filters.get("rating") in (None, r["rating"])
                and (filters.get("since") is None or r["created_at"] >= float(filters["since"]))
                and (not text or text in r["prompt_preview"].lower() or text in (r["response_preview"] or "").lower())
            )

        return [r for r in self.records if keep(r)]

    def logs(self, *, limit: int = 50, offset: int = 0, **filters: Any) -> dict[str, Any]:
        self.queries.append({"limit": limit, "offset": offset, **filters})
        if filters.get("status") in self.held:
            self.held[filters["status"]].wait(5)
        rows = self._select(filters)
        page = [dict(r) for r in rows[offset : offset + limit]]
        return {
            "data": page,
            "total": len(rows),
            "limit": limit,
            "offset": offset,
            "has_more": offset + limit < len(rows),
        }

    def log(self, record_id: str) -> dict[str, Any]:
        for r in self.records:
            if r["id"] == record_id:
                return dict(r)
        raise ApiError(f"No logged exchange with id '{record_id}'.", status=404, code="log_not_found")

    def log_feedback(self, record_id: str, **feedback: Any) -> dict[str, Any]:
        self.feedback.append((record_id, feedback))
        for r in self.records:
            if r["id"] == record_id:
                r.update(feedback)
        return self.log(record_id)

    def export_logs(
        self, fmt: str, *, dedupe: bool = False, cancel: threading.Event | None = None, **filters: Any
    ) -> Iterator[tuple[bytes, int]]:
        self.exports.append({"format": fmt, "dedupe": dedupe, **filters})
        rows = self._select({"status": "ok", **{k: v for k, v in filters.items() if v is not None}})
        lines = [json.dumps({"messages": [{"role": "assistant", "content": r["id"]}]}).encode() + b"\n" for r in rows]
        for i, line in enumerate(lines):
            if i == 1:
                self.gate.wait(5)
            if cancel is not None and cancel.is_set():
                return
            if self.fail_export_midway and i == 2:
                raise ApiError("The export from the server broke off (RemoteProtocolError).")
            yield line, len(rows)


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def vm(qtbot: QtBot, client: FakeClient) -> LogsViewModel:
    model = LogsViewModel(client, clock=lambda: NOW)  # type: ignore[arg-type]
    with qtbot.waitSignal(model.loaded):
        model.refresh()
    qtbot.waitUntil(lambda: not model.busy)
    return model


@pytest.fixture
def view(qtbot: QtBot, vm: LogsViewModel) -> LogsView:
    widget = LogsView(vm)
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    widget.show()
    return widget


# -- the viewmodel ------------------------------------------------------------------------------


def test_first_page_models_and_adapters(vm: LogsViewModel, client: FakeClient) -> None:
    assert len(vm.rows) == PAGE and vm.total == 120 and vm.has_more
    assert vm.rows[0]["id"] == "chatcmpl-0000"  # newest first, as the server sends them
    assert vm.models == sorted(MODELS) and vm.adapters == ["pirate"]
    assert client.queries[-1] == {"limit": PAGE, "offset": 0, **dict.fromkeys(("model", "adapter", "status"))} | {
        "rating": None,
        "since": None,
        "q": None,
    }


def test_pages_until_the_end(qtbot: QtBot, vm: LogsViewModel) -> None:
    vm.load_more()
    vm.load_more()  # a second click while the page is on its way asks nothing more
    qtbot.waitUntil(lambda: len(vm.rows) == 2 * PAGE)
    vm.load_more()
    qtbot.waitUntil(lambda: len(vm.rows) == 120)
    assert not vm.has_more
    assert len({r["id"] for r in vm.rows}) == 120
    vm.load_more()  # nothing left: nothing asked
    assert len(vm.rows) == 120


def test_filters_reach_the_query(qtbot: QtBot, vm: LogsViewModel, client: FakeClient) -> None:
    vm.set_filters(model=MODELS[1], status="ok", rating=None, within_s=3600.0, text="  france ")
    qtbot.waitUntil(lambda: client.queries[-1]["model"] == MODELS[1] and not vm.busy)
    query = client.queries[-1]
    assert query["status"] == "ok" and query["q"] == "france" and float(query["since"]) == NOW - 3600
    assert all(r["model"] == MODELS[1] and r["status"] == "ok" for r in vm.rows)
    assert all("france" in r["prompt_preview"].lower() and r["created_at"] >= NOW - 3600 for r in vm.rows)
    vm.set_filters(model="", status="", text="", within_s=None, adapter="pirate")
    qtbot.waitUntil(lambda: client.queries[-1]["adapter"] == "pirate" and not vm.busy)
    assert vm.total == 30 and all(r["adapters"] for r in vm.rows)
    with pytest.raises(AttributeError):
        vm.set_filters(colour="red")


def test_a_stale_page_is_dropped(qtbot: QtBot, vm: LogsViewModel, client: FakeClient) -> None:
    client.held["cancelled"] = threading.Event()
    vm.set_filters(status="cancelled")
    vm.set_filters(status="server_error")
    qtbot.waitUntil(lambda: bool(vm.rows) and vm.rows[0]["status"] == "server_error")
    with qtbot.waitSignal(vm.changed):  # the page of the older query arrives last: it must not win
        client.held["cancelled"].set()
    assert all(r["status"] == "server_error" for r in vm.rows) and vm.total == 17


def test_select_rate_and_correct(qtbot: QtBot, vm: LogsViewModel, client: FakeClient) -> None:
    target = vm.rows[1]["id"]
    with qtbot.waitSignal(vm.detail_changed, check_params_cb=lambda *_: vm.detail is not None):
        vm.select(target)
    assert vm.detail is not None and vm.detail["id"] == target
    vm.rate(-1)
    qtbot.waitUntil(lambda: vm.detail is not None and vm.detail["rating"] == -1)
    assert vm.rows[1]["rating"] == -1 and vm.notice == "Rated bad."
    vm.save_correction("Paris.")
    qtbot.waitUntil(lambda: vm.detail is not None and vm.detail["correction"] == "Paris.")
    assert client.feedback == [(target, {"rating": -1}), (target, {"correction": "Paris."})]
    with qtbot.waitSignal(vm.error) as blocker:
        vm.save_correction("   ")
    assert "corrected answer" in blocker.args[0]
    assert len(client.feedback) == 2
    with pytest.raises(ValueError):
        vm.rate(0)


def test_an_error_is_shown_and_the_screen_stays_usable(qtbot: QtBot, vm: LogsViewModel) -> None:
    with qtbot.waitSignal(vm.error) as blocker:
        vm.select("chatcmpl-gone")
    assert "No logged exchange" in blocker.args[0]
    with qtbot.waitSignal(vm.detail_changed, check_params_cb=lambda *_: vm.detail is not None):
        vm.select(vm.rows[0]["id"])


def test_export_writes_the_file_with_progress(
    qtbot: QtBot, vm: LogsViewModel, client: FakeClient, tmp_path: Path
) -> None:
    vm.set_filters(model=MODELS[0])
    qtbot.waitUntil(lambda: not vm.busy)
    vm.export_format, vm.export_dedupe = "dpo", True
    progress: list[tuple[int, int]] = []
    vm.export_progress.connect(lambda done, total: progress.append((done, total)))
    out = tmp_path / "data.jsonl"
    with qtbot.waitSignal(vm.export_state, check_params_cb=lambda *_: not vm.exporting, timeout=5000):
        vm.start_export(out)
    expected = [r["id"] for r in client.records if r["model"] == MODELS[0] and r["status"] == "ok"]
    written = [json.loads(line)["messages"][0]["content"] for line in out.read_text().splitlines()]
    assert written == expected
    assert client.exports[-1]["format"] == "dpo" and client.exports[-1]["dedupe"] is True
    assert client.exports[-1]["model"] == MODELS[0]
    assert progress[-1] == (len(expected), len(expected))
    assert (
        vm.exported == (len(expected), len(expected))
        and vm.notice == f"Exported {len(expected)} examples to data.jsonl."
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # prompts may hold personal data
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_a_cancelled_or_failed_export_leaves_no_file(
    qtbot: QtBot, vm: LogsViewModel, client: FakeClient, tmp_path: Path
) -> None:
    out = tmp_path / "data.jsonl"
    client.gate.clear()
    vm.start_export(out)
    # the staged file exists and the export has begun (the file is created just before the call)
    qtbot.waitUntil(lambda: any(tmp_path.iterdir()) and bool(client.exports))
    assert vm.exporting
    vm.start_export(out)  # one at a time
    assert len(client.exports) == 1
    vm.cancel_export()
    client.gate.set()
    qtbot.waitUntil(lambda: not vm.exporting)
    assert vm.notice == "Export cancelled." and not any(tmp_path.iterdir())

    client.fail_export_midway = True
    with qtbot.waitSignal(vm.error) as blocker:
        vm.start_export(out)
    assert "broke off" in blocker.args[0]
    qtbot.waitUntil(lambda: not vm.exporting)
    assert not any(tmp_path.iterdir())

    client.fail_export_midway = False
    with qtbot.waitSignal(vm.error) as blocker:
        vm.start_export(tmp_path / "no-such-folder" / "data.jsonl")
    assert blocker.args[0].startswith("Cannot write")
    vm.export_path = None
    with qtbot.waitSignal(vm.error) as blocker:
        vm.start_export()
    assert "Choose a file" in blocker.args[0]


def test_how_a_record_reads() -> None:
    r = record(4)  # a server error: no answer, an error message
    assert prompt_messages(r) == [("system", "Be brief."), ("user", PROMPTS[4][0])]
    assert answer_text(r) == ""
    shown = dict(facts(r))
    assert shown["Status"] == "server_error (HTTP 500)" and shown["Error"] == "engine failed: out of memory"
    assert shown["Tokens"] == "24 prompt + 0 completion" and shown["Latency"] == "338 ms"
    completion = {"request": {"prompt": ["a", "b"]}, "response": {"choices": [{"index": 0, "text": "c"}]}}
    assert prompt_messages(completion) == [("prompt", "a"), ("prompt", "b")] and answer_text(completion) == "c"
    parts = {"request": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}}
    assert prompt_messages(parts) == [("user", "hi")]


# -- the view -----------------------------------------------------------------------------------


def test_view_shows_the_table_and_pages(qtbot: QtBot, view: LogsView, vm: LogsViewModel) -> None:
    assert view.table.model().rowCount() == PAGE
    assert view.count_label.text() == f"{PAGE} of 120 exchanges shown"
    assert view.model_box.findText(MODELS[0]) >= 0 and view.adapter_box.findText("pirate") >= 0
    view.more_button.click()
    qtbot.waitUntil(lambda: view.table.model().rowCount() == 2 * PAGE)
    assert view.count_label.text() == f"{2 * PAGE} of 120 exchanges shown"


def test_view_filters(qtbot: QtBot, view: LogsView, vm: LogsViewModel, client: FakeClient) -> None:
    view.status_box.setCurrentIndex(view.status_box.findData("ok"))
    qtbot.waitUntil(lambda: client.queries[-1]["status"] == "ok" and not vm.busy)
    view.rating_box.setCurrentIndex(view.rating_box.findData(1))
    qtbot.waitUntil(lambda: client.queries[-1]["rating"] == 1 and not vm.busy)
    qtbot.keyClicks(view.search, "haiku")  # type: ignore[no-untyped-call]
    qtbot.waitUntil(lambda: client.queries[-1]["q"] == "haiku" and not vm.busy)  # once typing pauses
    assert all(r["rating"] == 1 and r["status"] == "ok" and "haiku" in r["prompt_preview"] for r in vm.rows)
    view.model_box.setEditText(MODELS[1])
    qtbot.waitUntil(lambda: client.queries[-1]["model"] == MODELS[1] and not vm.busy)
    assert view.count_label.text() == "No exchanges match the filters."


def test_view_selects_rates_and_corrects(qtbot: QtBot, view: LogsView, vm: LogsViewModel, client: FakeClient) -> None:
    assert not view.good_button.isEnabled() and "Select an exchange" in view.exchange.toPlainText()
    view.table.setFocus()
    view.table.selectRow(2)
    qtbot.waitUntil(lambda: vm.detail is not None and vm.detail["id"] == vm.rows[2]["id"])
    assert PROMPTS[2][0] in view.exchange.toPlainText() and PROMPTS[2][1] in view.exchange.toPlainText()
    assert "Latency" in view.facts.text() and view.good_button.isEnabled()
    view.correction.setPlainText("The review moved to Thursday.")  # a draft, not saved yet
    view.good_button.click()
    qtbot.waitUntil(lambda: view.good_button.isChecked() and vm.rows[2]["rating"] == 1)
    assert not view.bad_button.isChecked()
    assert view.table.model().index(2, 4).data() == view.marks[1] in ("👍", "✓")
    assert view.correction.toPlainText() == "The review moved to Thursday."  # rating kept the draft
    view.save_button.click()
    qtbot.waitUntil(lambda: "corrected answer" in view.exchange.toPlainText())
    assert client.feedback[-1] == (vm.rows[2]["id"], {"correction": "The review moved to Thursday."})
    assert view.notice.text() == "Correction saved."
    # the selection survives a reload that still holds the row
    view.refresh_button.click()
    qtbot.waitUntil(lambda: not vm.busy)
    assert view.table.currentIndex().row() == 2 and vm.detail is not None


def test_view_exports_with_a_progress_bar(qtbot: QtBot, view: LogsView, vm: LogsViewModel, tmp_path: Path) -> None:
    out = tmp_path / "chat.jsonl"
    view.ask_path = lambda: out
    view.format_box.setCurrentIndex(view.format_box.findData("completions"))
    view.dedupe_box.setChecked(True)
    assert vm.export_format == "completions" and vm.export_dedupe
    assert not view.progress.isVisible()
    view.export_button.click()
    assert view.progress.isVisible() and "Cancel" in view.export_button.text()
    qtbot.waitUntil(lambda: not vm.exporting)
    assert view.progress.value() == view.progress.maximum() == vm.exported[1]  # type: ignore[index]
    assert view.export_label.text().startswith("Exported") and out.exists()
    assert view.export_button.text() == "&Export…"


def test_every_control_is_named_and_reachable_by_keyboard(view: LogsView) -> None:
    from PySide6.QtWidgets import QAbstractButton, QComboBox, QPlainTextEdit, QTableView, QTextBrowser

    controls = [
        w
        for w in view.findChildren(QWidget)
        if isinstance(w, QAbstractButton | QComboBox | QTableView | QPlainTextEdit | QTextBrowser)
        # Qt's own parts: a line edit's clear button, the table's corner button
        and type(w).__name__ != "QToolButton"
        and not w.objectName().startswith("qt_")
    ] + [view.search]
    assert len(controls) >= 17
    for control in controls:
        assert control.accessibleName(), control
        assert control.focusPolicy() & Qt.FocusPolicy.TabFocus, control


def test_keyboard_shortcuts(qtbot: QtBot, view: LogsView, vm: LogsViewModel, client: FakeClient) -> None:
    view.activateWindow()
    qtbot.waitUntil(view.isActiveWindow)
    view.table.setFocus()
    qtbot.keyClick(view.table, Qt.Key.Key_Down)  # type: ignore[no-untyped-call]
    qtbot.waitUntil(lambda: vm.detail is not None)
    qtbot.keyClick(view.table, Qt.Key.Key_Down, Qt.KeyboardModifier.ControlModifier)  # type: ignore[no-untyped-call]
    qtbot.waitUntil(lambda: view.bad_button.isChecked())
    assert client.feedback[-1] == (vm.selected_id, {"rating": -1})
    qtbot.keyClick(view.table, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)  # type: ignore[no-untyped-call]
    assert view.search.hasFocus()


def test_render(qtbot: QtBot, view: LogsView, vm: LogsViewModel, tmp_path: Path) -> None:
    view.table.selectRow(1)
    qtbot.waitUntil(lambda: vm.detail is not None)
    assert not view.grab().isNull()


# -- end to end -----------------------------------------------------------------------------------


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[str]:
    """The real app on a loopback socket (uvicorn in a thread), around a log with three exchanges; no model."""
    from appliance.api.app import create_app
    from appliance.config import Settings
    from appliance.requestlog.store import LogStore
    from appliance.requestlog.writer import LogWriter
    from appliance.scheduler import Scheduler
    from tests.test_log_export import add, user

    log_path = tmp_path / "log.sqlite"
    store = LogStore.open(log_path)
    for i in range(3):
        add(store, f"chatcmpl-{i}", messages=user(f"question {i}"), answers=[f"answer {i}"])
    store.close()
    writer = LogWriter(log_path, flush_interval=0.05)
    server = uvicorn.Server(
        uvicorn.Config(create_app(Scheduler(), Settings(), request_log=writer), log_level="warning")
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # uvicorn has no event for "listening"; this is not the GUI waiting
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()
    writer.close()


def test_against_a_real_server(qtbot: QtBot, real_server: str, tmp_path: Path) -> None:
    """The real client over a socket and the real routes: list, open, rate, correct, export (streamed)."""
    api = ApiClient(real_server)
    vm = LogsViewModel(api)
    with qtbot.waitSignal(vm.loaded, timeout=10_000):
        vm.refresh()
    qtbot.waitUntil(lambda: vm.total == 3, timeout=10_000)
    vm.select("chatcmpl-1")
    qtbot.waitUntil(lambda: vm.detail is not None, timeout=10_000)
    assert answer_text(vm.detail or {}) == "answer 1"
    vm.rate(-1)
    qtbot.waitUntil(lambda: (vm.detail or {}).get("rating") == -1, timeout=10_000)
    assert vm.rows[1]["rating"] == -1
    vm.save_correction("a better answer")
    qtbot.waitUntil(lambda: (vm.detail or {}).get("correction") == "a better answer", timeout=10_000)
    vm.export_format = "dpo"
    vm.start_export(tmp_path / "dpo.jsonl")
    qtbot.waitUntil(lambda: not vm.exporting, timeout=10_000)
    assert vm.last_error is None
    pairs = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("a better answer", "answer 1")
    ]
    assert vm.exported == (1, 3)  # one pair, from the three records read
    with pytest.raises(ApiError, match="'status' must be one of"):
        list(api.export_logs("chat", status="fine"))
    api.close()
