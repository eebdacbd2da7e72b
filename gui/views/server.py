"""The Server screen's widgets: state and address, snippets to copy, start/stop, LAN exposure."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.server import ServerViewModel


class ServerView(QWidget):
    def __init__(self, vm: ServerViewModel) -> None:
        super().__init__()
        self.vm = vm
        mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)

        self.state = QLabel()
        self.state.setAccessibleName("Server state")
        self.url = QLabel()
        self.url.setAccessibleName("Server address")
        self.url.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.lan = QLabel()
        self.lan.setAccessibleName("Address on the network")
        self.load = QLabel()
        self.load.setAccessibleName("Server load")
        self.start_button = QPushButton("Start")
        self.start_button.setAccessibleName("Start the server")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setAccessibleName("Stop the server")
        controls = QHBoxLayout()
        controls.addWidget(self.start_button)
        controls.addWidget(self.stop_button)
        controls.addStretch()
        status = QGroupBox("Status")
        form = QFormLayout(status)
        form.addRow("State", self.state)
        form.addRow("Address", self.url)
        form.addRow("On the network", self.lan)
        self.socket = QLabel()
        self.socket.setAccessibleName("Unix socket")
        form.addRow("Unix socket", self.socket)
        self.key_state = QLabel()
        self.key_state.setAccessibleName("API key state")
        form.addRow("API key", self.key_state)
        form.addRow("Load", self.load)
        form.addRow(controls)

        self.api_key = QLineEdit()
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.api_key.setPlaceholderText("at least 8 characters")
        self.api_key.setAccessibleName("API key")
        self.expose = QCheckBox("Expose to the LAN (others on the network can use it with the key)")
        self.expose.setAccessibleName("Expose the server to the local network")
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020")
        self.message.setAccessibleName("Server message")
        access = QGroupBox("Access")
        access_form = QFormLayout(access)
        access_form.addRow("API key", self.api_key)
        access_form.addRow(self.expose)
        access_form.addRow(self.message)

        snippets = QGroupBox("Call it from your code")
        snippet_layout = QVBoxLayout(snippets)
        self.snippet_boxes: dict[str, QPlainTextEdit] = {}
        for name, label in (("curl", "curl"), ("python", "Python (openai)")):
            box = QPlainTextEdit()
            box.setReadOnly(True)
            box.setFont(mono)
            box.setAccessibleName(f"{label} example")
            box.setMaximumHeight(120)
            copy = QPushButton(f"Copy {label}")
            copy.setAccessibleName(f"Copy the {label} example")
            copy.clicked.connect(lambda _=False, b=box: QGuiApplication.clipboard().setText(b.toPlainText()))
            row = QHBoxLayout()
            row.addWidget(box, 1)
            row.addWidget(copy)
            snippet_layout.addLayout(row)
            self.snippet_boxes[name] = box

        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        self.output.setFont(mono)
        self.output.setAccessibleName("Server output")
        self.output.setMaximumBlockCount(500)
        output_box = QGroupBox("Server output")
        QVBoxLayout(output_box).addWidget(self.output)

        top = QHBoxLayout()
        top.addWidget(status, 1)
        top.addWidget(access, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(snippets)
        layout.addWidget(output_box, 1)

        self.start_button.clicked.connect(vm.start)
        self.stop_button.clicked.connect(vm.stop)
        self.api_key.textChanged.connect(lambda text: setattr(vm, "api_key", text))
        self.expose.clicked.connect(self._expose)
        vm.changed.connect(self._sync)
        vm.error.connect(self.message.setText)
        if vm.managed is not None:
            for line in vm.managed.lines:
                self.output.appendPlainText(line)
            vm.managed.output.connect(self.output.appendPlainText)
        self._sync()

    def _expose(self, checked: bool) -> None:
        if not self.vm.set_exposed(checked):
            self.expose.setChecked(not checked)
        elif self.vm.managed is not None:
            self.vm.managed.output.connect(self.output.appendPlainText)

    def showEvent(self, event: object) -> None:  # noqa: N802 (Qt's name)
        self.vm.activate(True)
        super().showEvent(event)  # type: ignore[arg-type]

    def hideEvent(self, event: object) -> None:  # noqa: N802 (Qt's name)
        self.vm.activate(False)
        super().hideEvent(event)  # type: ignore[arg-type]

    def _sync(self) -> None:
        vm = self.vm
        self.state.setText(vm.state)
        self.url.setText(vm.url)
        self.lan.setText(vm.lan_url or "not exposed (loopback only)")
        listening = vm.listening
        self.socket.setText(str(listening.get("socket") or "none (set one in Settings: socket)"))
        self.key_state.setText(
            "required" if listening.get("api_key") else "not required (loopback only)" if listening else "-"
        )
        models = (vm.health or {}).get("models", [])
        self.load.setText(
            "; ".join(f"{m['model']}: {m['active']}/{m['slots']} slots busy, {m['queued']} waiting" for m in models)
            or "-"
        )
        managed = vm.managed is not None
        running = vm.state == "running"
        self.start_button.setEnabled(managed and not running and vm.state != "starting")
        self.stop_button.setEnabled(managed and running)
        self.expose.setEnabled(managed)
        for name, text in vm.snippets().items():
            self.snippet_boxes[name].setPlainText(text)
        if vm.last_error is None:
            self.message.setText("")
