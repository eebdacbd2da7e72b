"""The desktop app's window and entry point: ``appliance gui [--connect URL] [--screenshot DIR]``.

One window, a list of screens on the left. By default the app starts its own server as a child
process (``gui.server_process``) and stops it on quit; with ``--connect`` it attaches to a running
server and never stops it. Closing the window keeps serving from the tray where a tray exists;
Quit stops everything. ``--screenshot DIR`` renders every screen at 1280x800 once its data has
loaded, writes ``DIR/<screen>.png`` and exits 0 (with ``QT_QPA_PLATFORM=offscreen`` it needs no
display).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEventLoop, QSettings, QTimer, SignalInstance
from PySide6.QtGui import QAction, QCloseEvent, QIcon, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMainWindow,
    QMenu,
    QStackedWidget,
    QStyle,
    QSystemTrayIcon,
    QWidget,
)

from gui.client import ApiClient
from gui.server_process import ManagedServer
from gui.viewmodels.base import ScreenViewModel

SIZE = (1280, 800)
LOAD_TIMEOUT_MS = 20_000
START_TIMEOUT_MS = 180_000


@dataclass(frozen=True)
class Screen:
    """One screen: its viewmodel and view classes, named as ``module:Class`` and imported when it is first
    shown, so that starting the app imports and builds one screen, not eight (first paint goal: 1.5 s)."""

    key: str  # the screenshot's file name
    title: str
    viewmodel: str
    view: str

    def make(self, client: ApiClient, managed: ManagedServer | None) -> tuple[ScreenViewModel, QWidget]:
        vm_class, view_class = _load(self.viewmodel), _load(self.view)
        vm = vm_class(client, managed) if self.key == "server" else vm_class(client)  # it may start or stop it
        view: QWidget = view_class(vm)
        return vm, view


def _load(name: str) -> Any:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


SCREENS: list[Screen] = [
    Screen(key, title, f"gui.viewmodels.{key}:{cls}ViewModel", f"gui.views.{key}:{cls}View")
    for key, title, cls in (
        ("server", "Server", "Server"),
        ("models", "Models", "Models"),
        ("playground", "Playground", "Playground"),
        ("requests", "Requests", "Requests"),
        ("logs", "Logs", "Logs"),
        ("lora", "LoRA", "Lora"),
        ("hardware", "Hardware", "Hardware"),
        ("settings", "Settings", "Settings"),
    )
]


class MainWindow(QMainWindow):
    def __init__(self, client: ApiClient, managed: ManagedServer | None = None, *, remember: bool = False) -> None:
        """``remember``: restore and save the window's size and last screen (the app does; tests do not)."""
        super().__init__()
        self.setWindowTitle("LLM appliance")
        self.remember = remember
        self.client = client
        self.managed = managed
        self.ready = managed is None
        self.quitting = False
        self.nav = QListWidget()
        self.nav.setAccessibleName("Screens")
        self.nav.setFixedWidth(170)
        self.stack = QStackedWidget()
        self.keys = [screen.key for screen in SCREENS]
        self.built: dict[int, ScreenViewModel] = {}  # screens are built when first shown
        self._loaded: set[int] = set()
        for screen in SCREENS:
            self.nav.addItem(screen.title)
            self.stack.addWidget(QWidget())  # a placeholder until the screen is built
        body = QWidget()
        layout = QHBoxLayout(body)
        layout.addWidget(self.nav)
        layout.addWidget(self.stack, 1)
        self.setCentralWidget(body)
        self.server_state = QLabel("starting the server…" if managed is not None else f"connected to {client.base_url}")
        self.server_state.setAccessibleName("Connection state")
        self.statusBar().addWidget(self.server_state)
        self.nav.currentRowChanged.connect(self._show)
        for i in range(min(9, len(SCREENS))):
            action = QAction(self)
            action.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            action.triggered.connect(lambda _=False, row=i: self.nav.setCurrentRow(row))
            self.addAction(action)
        if managed is not None:
            managed.ready.connect(self._server_ready)
            managed.failed.connect(lambda reason: self.server_state.setText(f"server: {reason}"))
        self.tray = self._make_tray()
        settings = QSettings("llm-appliance", "gui")
        geometry = settings.value("geometry") if remember else None
        if geometry is None or not self.restoreGeometry(geometry):
            self.resize(*SIZE)
        last = settings.value("screen", "server") if remember else "server"
        self.nav.setCurrentRow(self.keys.index(last) if last in self.keys else 0)

    def view_model(self, key: str) -> ScreenViewModel:
        """The screen's viewmodel, built now if it was not yet."""
        return self._build(self.keys.index(key))

    def _build(self, row: int) -> ScreenViewModel:
        if row not in self.built:
            vm, view = SCREENS[row].make(self.client, self.managed)
            placeholder = self.stack.widget(row)
            assert placeholder is not None
            self.stack.insertWidget(row, view)
            self.stack.removeWidget(placeholder)
            placeholder.deleteLater()
            self.built[row] = vm
            self._link(SCREENS[row].key, vm)
        return self.built[row]

    def _link(self, key: str, vm: ScreenViewModel) -> None:
        """ "Try in Playground" on the LoRA screen selects the adapter in the Playground and shows it."""
        if key != "lora":
            return

        def try_adapter(model: str) -> None:
            from gui.viewmodels.playground import PlaygroundViewModel

            playground = self.view_model("playground")
            assert isinstance(playground, PlaygroundViewModel)
            if model not in playground.models:
                playground.models.append(model)
            playground.set_model(0, model)
            self.nav.setCurrentRow(self.keys.index("playground"))

        vm.try_in_playground.connect(try_adapter)  # type: ignore[attr-defined]

    def _make_tray(self) -> QSystemTrayIcon | None:
        if not QSystemTrayIcon.isSystemTrayAvailable():
            return None
        tray = QSystemTrayIcon(self.style().standardIcon(QStyle.StandardPixmap.SP_ComputerIcon), self)
        menu = QMenu(self)
        menu.addAction("Show", self.showNormal)
        menu.addAction("Quit", self.quit)
        tray.setContextMenu(menu)
        tray.setToolTip("LLM appliance")
        tray.show()
        return tray

    def _server_ready(self, url: str) -> None:
        self.ready = True
        self.server_state.setText(f"serving on {url}")
        self._show(self.nav.currentRow())

    def _show(self, row: int) -> None:
        if row < 0:
            return
        vm = self._build(row)
        self.stack.setCurrentIndex(row)
        if self.ready and row not in self._loaded:
            self._loaded.add(row)
            vm.refresh()

    def current_vm(self) -> ScreenViewModel:
        return self._build(self.nav.currentRow())

    def quit(self) -> None:
        self.quitting = True
        self.close()
        QApplication.quit()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        if self.tray is not None and not self.quitting:
            self.hide()  # keeps serving from the tray
            event.ignore()
            return
        if self.remember:
            settings = QSettings("llm-appliance", "gui")
            settings.setValue("geometry", self.saveGeometry())
            settings.setValue("screen", self.keys[max(0, self.nav.currentRow())])
        self.stop_server()
        event.accept()

    def stop_server(self) -> None:
        """Stop the server this window started (never one it only attached to)."""
        server = self.built.get(self.keys.index("server"))
        managed = getattr(server, "managed", None)
        if isinstance(managed, ManagedServer):
            managed.stop()  # it may have restarted the server (LAN exposure)
        if self.managed is not None:
            self.managed.stop()


def _wait(signal: SignalInstance, timeout_ms: int) -> bool:
    """Run the event loop until ``signal`` fires or the time is up; True if it fired."""
    loop = QEventLoop()
    fired: list[bool] = []

    def fire(*_: object) -> None:
        fired.append(True)
        loop.quit()

    signal.connect(fire)
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec()
    return bool(fired)


def take_screenshots(window: MainWindow, directory: Path) -> list[Path]:
    """Every screen at 1280x800, once its data has loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    window.resize(*SIZE)
    window.show()
    if not window.ready and window.managed is not None:
        _wait(window.managed.ready, START_TIMEOUT_MS)
    written = []
    for row, screen in enumerate(SCREENS):
        vm = window.view_model(screen.key)
        loaded = QEventLoop()
        vm.loaded.connect(loaded.quit)
        QTimer.singleShot(LOAD_TIMEOUT_MS, loaded.quit)
        window.nav.setCurrentRow(row)
        if row in window._loaded and not vm.busy:
            vm.refresh()
        loaded.exec()
        vm.loaded.disconnect(loaded.quit)
        for _ in range(5):
            QApplication.processEvents()
        path = directory / f"{screen.key}.png"
        window.grab().save(str(path))
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance gui", description="The LLM appliance's desktop app.")
    parser.add_argument("--connect", metavar="URL", help="attach to a running server instead of starting one")
    parser.add_argument("--api-key", help="the server's API key (with --connect)")
    parser.add_argument("--screenshot", type=Path, metavar="DIR", help="write DIR/<screen>.png for every screen, exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    app.setApplicationName("LLM appliance")
    app.setWindowIcon(QIcon(app.style().standardIcon(QStyle.StandardPixmap.SP_ComputerIcon)))
    if args.connect:
        client, managed = ApiClient(args.connect, args.api_key), None
    else:
        client, managed = ApiClient("http://127.0.0.1:1"), ManagedServer()
    window = MainWindow(client, managed, remember=args.screenshot is None)
    app.aboutToQuit.connect(window.stop_server)
    if managed is not None:
        managed.start()
    if args.screenshot is not None:
        paths = take_screenshots(window, args.screenshot)
        print("\n".join(str(p) for p in paths))
        window.quit()
        return _leave(0)
    window.show()
    return _leave(int(app.exec()))


def _leave(code: int) -> int:
    """Exit without tearing Qt's objects down one by one.

    The server is stopped and the window state saved by now. PySide6 with pyqtgraph can crash
    while the interpreter finalises their objects ("bool_dealloc", seen here about one exit in
    three), which would turn a clean quit into a crash report and a non-zero exit status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
