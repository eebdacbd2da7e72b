"""The app's shell, Server and Playground screens: against a fake client, then end to end with a real server."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pytestqt.qtbot import QtBot

from gui.client import ApiClient, ApiError, StreamEvent
from gui.server_process import ManagedServer, pid_of
from gui.viewmodels.logs import LogsViewModel
from gui.viewmodels.playground import PlaygroundViewModel
from gui.viewmodels.requests import RequestsViewModel
from gui.viewmodels.server import ServerViewModel
from gui.views.playground import PlaygroundView
from gui.views.server import ServerView

MODEL = "smollm2-135m-instruct"


class FakeClient:
    base_url = "http://127.0.0.1:9999"

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.release.set()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": [{"model": MODEL, "active": 1, "slots": 8, "queued": 0}]}

    def models(self) -> list[dict[str, Any]]:
        return [{"id": MODEL}, {"id": f"{MODEL}:pirate"}]

    def reconnect(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url

    def settings(self) -> dict[str, Any]:
        values = {"host": "127.0.0.1", "port": 9999, "socket": "/run/appliance.sock"}
        rows = [{"name": k, "value": v, "is_set": True} for k, v in values.items()]
        return {"settings": [*rows, {"name": "api_key", "value": None, "is_set": False}]}

    def stream_chat(self, body: dict[str, Any], cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        self.bodies.append(body)
        for word in ("Hello", " there", "!"):
            self.release.wait(5)
            if cancel is not None and cancel.is_set():
                return
            yield StreamEvent(text=word)
        yield StreamEvent(finish_reason="stop")
        yield StreamEvent(usage={"prompt_tokens": 9, "completion_tokens": 3})


def test_playground_streams_and_measures(qtbot: QtBot) -> None:
    client = FakeClient()
    vm = PlaygroundViewModel(client)  # type: ignore[arg-type]
    view = PlaygroundView(vm)
    qtbot.addWidget(view)
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    assert view.model.currentText() == MODEL and view.send_button.isEnabled()
    vm.system_prompt = "Be brief."
    view.prompt.setPlainText("Hi")
    view.send_button.click()
    qtbot.waitUntil(lambda: not vm.streaming)
    turn = vm.lanes[0].turns[-1]
    assert turn.content == "Hello there!" and turn.tokens == 3 and turn.ttft_ms is not None
    assert client.bodies[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "Hello there!" in view.transcripts[0].toPlainText() and "3 tokens" in view.transcripts[0].toPlainText()
    assert view.prompt.toPlainText() == ""


def test_playground_stop_regenerate_and_compare(qtbot: QtBot) -> None:
    client = FakeClient()
    vm = PlaygroundViewModel(client)  # type: ignore[arg-type]
    view = PlaygroundView(vm)
    qtbot.addWidget(view)
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    client.release.clear()
    vm.send("Tell me a story")
    assert vm.streaming and view.stop_button.isEnabled()
    vm.stop()
    client.release.set()
    qtbot.waitUntil(lambda: not vm.streaming)
    vm.set_compare(f"{MODEL}:pirate")
    assert len(vm.lanes) == 2 and vm.lanes[1].turns[0].content == "Tell me a story"
    vm.regenerate()
    qtbot.waitUntil(lambda: not vm.streaming)
    assert [lane.turns[-1].content for lane in vm.lanes] == ["Hello there!", "Hello there!"]
    assert {b["model"] for b in client.bodies[-2:]} == {MODEL, f"{MODEL}:pirate"}
    assert view.transcripts[1].isVisibleTo(view)


def test_playground_shows_a_refusal(qtbot: QtBot) -> None:
    class Refusing(FakeClient):
        def stream_chat(self, body: dict[str, Any], cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
            raise ApiError("The model 'x' does not exist", status=404)
            yield StreamEvent()

    vm = PlaygroundViewModel(Refusing())  # type: ignore[arg-type]
    view = PlaygroundView(vm)
    qtbot.addWidget(view)
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    vm.send("Hi")
    qtbot.waitUntil(lambda: not vm.streaming)
    assert "does not exist" in view.transcripts[0].toPlainText()
    assert view.send_button.isEnabled()  # still usable


def test_server_screen_refuses_the_lan_without_a_key(qtbot: QtBot) -> None:
    vm = ServerViewModel(FakeClient())  # type: ignore[arg-type]
    view = ServerView(vm)
    qtbot.addWidget(view)
    with qtbot.waitSignal(vm.loaded):
        vm.refresh()
    assert "0/8" not in view.load.text() and "1/8 slots busy" in view.load.text()
    assert view.socket.text() == "/run/appliance.sock" and view.key_state.text().startswith("not required")
    assert "curl http://127.0.0.1:9999/v1/chat/completions" in view.snippet_boxes["curl"].toPlainText()
    assert 'base_url="http://127.0.0.1:9999/v1"' in view.snippet_boxes["python"].toPlainText()
    assert not vm.set_exposed(True)
    assert "API key" in view.message.text()
    assert not view.expose.isChecked() and vm.lan_url is None


def _port_free(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def test_end_to_end_start_chat_and_quit_leaves_nothing_behind(qtbot: QtBot, tmp_path: Path) -> None:
    """The window starts its own server, chats with streaming through it, sees the exchange in Requests and
    Logs, rates and exports it; quitting stops the server within 3 s and frees its port."""
    from gui.app import MainWindow

    managed = ManagedServer(home=tmp_path / "home", extra_args=["--parallel", "2", "--ctx-size", "1024"])
    client = ApiClient("http://127.0.0.1:1")
    window = MainWindow(client, managed)
    qtbot.addWidget(window)
    with qtbot.waitSignal(managed.ready, timeout=120_000):
        managed.start()
    url = managed.url
    assert url is not None and window.ready
    window.nav.setCurrentRow(window.keys.index("playground"))
    playground = window.current_vm()
    assert isinstance(playground, PlaygroundViewModel)
    qtbot.waitUntil(lambda: bool(playground.models), timeout=10_000)
    playground.sampling.max_tokens = 8
    playground.send("What is the capital of France?")
    qtbot.waitUntil(lambda: not playground.streaming, timeout=60_000)
    answer = playground.lanes[0].turns[-1]
    assert answer.error is None and answer.content and answer.tokens and answer.ttft_ms

    # the exchange appears on the Requests screen, finished ...
    window.nav.setCurrentRow(window.keys.index("requests"))
    requests = window.current_vm()
    assert isinstance(requests, RequestsViewModel)
    qtbot.waitUntil(lambda: any(r.state == "finished" and r.completion_tokens for r in requests.rows), timeout=10_000)
    # ... and in the Logs, where it is rated and exported
    window.nav.setCurrentRow(window.keys.index("logs"))
    logs = window.current_vm()
    assert isinstance(logs, LogsViewModel)
    qtbot.waitUntil(lambda: bool(logs.rows), timeout=10_000)
    record_id = logs.rows[0]["id"]
    assert "capital of France" in (logs.rows[0].get("prompt_preview") or json.dumps(logs.rows[0]))
    logs.select(record_id)
    qtbot.waitUntil(lambda: logs.detail is not None, timeout=10_000)
    logs.rate(1)
    qtbot.waitUntil(lambda: (logs.detail or {}).get("rating") == 1, timeout=10_000)
    out = tmp_path / "chat.jsonl"
    logs.start_export(out)
    qtbot.waitUntil(lambda: logs.exported is not None, timeout=20_000)
    example = json.loads(out.read_text().splitlines()[0])
    assert example["messages"][-1]["content"] == answer.content

    pid = pid_of(managed)
    assert pid is not None
    started = time.monotonic()
    window.quitting = True
    window.close()
    assert time.monotonic() - started < 3.5
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _port_free(url)


@pytest.mark.skipif(os.environ.get("DISPLAY") is not None, reason="checks the headless path")
def test_serve_never_imports_qt() -> None:
    import subprocess
    import sys

    code = "import sys, appliance.cli, appliance.bootstrap; print(any(m.startswith('PySide6') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_server_that_is_gone_is_said_in_the_window(qtbot: QtBot) -> None:
    """Attached to an address where nothing listens: every screen says so and stays usable."""
    from gui.app import MainWindow

    window = MainWindow(ApiClient("http://127.0.0.1:1"))
    qtbot.addWidget(window)
    server = window.current_vm()
    qtbot.waitUntil(lambda: server.last_error is not None, timeout=10_000)
    assert "cannot be reached" in str(server.last_error)
    view = window.stack.currentWidget()
    assert isinstance(view, ServerView) and "cannot be reached" in view.message.text()
    window.nav.setCurrentRow(window.keys.index("playground"))
    playground = window.current_vm()
    qtbot.waitUntil(lambda: playground.last_error is not None, timeout=10_000)
    assert window.nav.isEnabled()


def test_a_wrong_api_key_is_said_in_the_window(qtbot: QtBot, start_server: Any) -> None:
    """Attached with --connect and a wrong key: the screens say the key is wrong, and the window stays usable."""
    from gui.app import MainWindow

    server = start_server("--api-key", "right-key-1234", "--parallel", "1", "--ctx-size", "512")
    window = MainWindow(ApiClient(server.base_url, "wrong-key-1234"))
    qtbot.addWidget(window)
    window.nav.setCurrentRow(window.keys.index("playground"))
    playground = window.current_vm()
    qtbot.waitUntil(lambda: playground.last_error is not None, timeout=10_000)
    assert "Incorrect API key" in str(playground.last_error)
    view = window.stack.currentWidget()
    assert isinstance(view, PlaygroundView) and "Incorrect API key" in view.status.text()
    window.nav.setCurrentRow(window.keys.index("server"))
    health = window.current_vm()
    qtbot.waitUntil(lambda: isinstance(health, ServerViewModel) and health.health is not None, timeout=10_000)


def test_the_window_remembers_its_size_and_screen(qtbot: QtBot, tmp_path: Path) -> None:
    from PySide6.QtCore import QSettings

    from gui.app import MainWindow

    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, str(tmp_path))
    first = MainWindow(ApiClient("http://127.0.0.1:1"), remember=True)
    qtbot.addWidget(first)
    first.resize(700, 500)
    first.nav.setCurrentRow(first.keys.index("hardware"))
    first.quitting = True
    first.close()
    second = MainWindow(ApiClient("http://127.0.0.1:1"), remember=True)
    qtbot.addWidget(second)
    assert second.keys[second.nav.currentRow()] == "hardware"
    assert (second.width(), second.height()) == (700, 500)


def test_closing_keeps_serving_from_the_tray_and_quit_stops(qtbot: QtBot) -> None:
    """Where a tray exists, closing the window hides it (the server it started keeps running); Quit stops it."""
    from gui.app import MainWindow

    class Managed(ManagedServer):
        stops = 0

        def stop(self) -> None:
            Managed.stops += 1

    window = MainWindow(ApiClient("http://127.0.0.1:1"), Managed())
    qtbot.addWidget(window)
    window.tray = object()  # type: ignore[assignment]  # offscreen has no tray: stand in for one
    window.show()
    window.close()
    assert not window.isVisible() and Managed.stops == 0
    window.quit()
    assert Managed.stops >= 1
