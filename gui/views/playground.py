"""The Playground's widgets: one or two transcript columns, the prompt box, and the settings panel."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.playground import Lane, PlaygroundViewModel, Turn

NO_COMPARE = "(no comparison)"


def turn_html(turn: Turn) -> str:
    who = {"user": "You", "assistant": "Model", "system": "System"}.get(turn.role, turn.role)
    body = html.escape(turn.content).replace("\n", "<br>") or ("…" if not turn.done else "")
    stats = []
    if turn.role == "assistant":
        if turn.ttft_ms is not None:
            stats.append(f"first token {turn.ttft_ms:.0f} ms")
        if turn.tokens is not None:
            stats.append(f"{turn.tokens} tokens")
        if turn.tokens_per_s is not None:
            stats.append(f"{turn.tokens_per_s:.1f} tok/s")
        if turn.error:
            stats.append(f"<span style='color:#b00020'>{html.escape(turn.error)}</span>")
    line = f"<div style='color:#666;font-size:small'>{' · '.join(stats)}</div>" if stats else ""
    return f"<p><b>{who}</b><br>{body}</p>{line}"


class PlaygroundView(QWidget):
    def __init__(self, vm: PlaygroundViewModel) -> None:
        super().__init__()
        self.vm = vm
        self.columns = QSplitter(Qt.Orientation.Horizontal)
        self.transcripts: list[QTextBrowser] = []

        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Ask something… (Ctrl+Enter sends)")
        self.prompt.setAccessibleName("Message to the model")
        self.prompt.setMaximumHeight(110)
        self.send_button = QPushButton("Send")
        self.send_button.setAccessibleName("Send the message")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setAccessibleName("Stop generating")
        self.regen_button = QPushButton("Regenerate")
        self.regen_button.setAccessibleName("Regenerate the last answer")
        self.clear_button = QPushButton("Clear")
        self.clear_button.setAccessibleName("Clear the conversation")
        buttons = QVBoxLayout()
        for b in (self.send_button, self.stop_button, self.regen_button, self.clear_button):
            buttons.addWidget(b)
        buttons.addStretch()
        entry = QHBoxLayout()
        entry.addWidget(self.prompt, 1)
        entry.addLayout(buttons)

        left = QVBoxLayout()
        left.addWidget(self.columns, 1)
        left.addLayout(entry)

        self.model = QComboBox()
        self.model.setAccessibleName("Model")
        self.compare = QComboBox()
        self.compare.setAccessibleName("Compare with model")
        self.system = QPlainTextEdit()
        self.system.setAccessibleName("System prompt")
        self.system.setPlaceholderText("Optional system prompt")
        self.system.setMaximumHeight(120)
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setAccessibleName("Temperature")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.0, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setAccessibleName("Top p")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 32768)
        self.max_tokens.setAccessibleName("Maximum tokens")
        panel = QGroupBox("Settings")
        form = QFormLayout(panel)
        form.addRow("Model", self.model)
        form.addRow("Compare with", self.compare)
        form.addRow("System prompt", self.system)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top p", self.top_p)
        form.addRow("Max tokens", self.max_tokens)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setAccessibleName("Playground status")
        form.addRow(self.status)
        panel.setFixedWidth(330)

        layout = QHBoxLayout(self)
        layout.addLayout(left, 1)
        layout.addWidget(panel)

        self.send_button.clicked.connect(self._send)
        QShortcut(QKeySequence("Ctrl+Return"), self.prompt, self._send)
        self.stop_button.clicked.connect(vm.stop)
        self.regen_button.clicked.connect(vm.regenerate)
        self.clear_button.clicked.connect(vm.clear)
        self.model.activated.connect(lambda _: vm.set_model(0, self.model.currentText()))
        self.compare.activated.connect(self._compare)
        self.system.textChanged.connect(lambda: setattr(vm, "system_prompt", self.system.toPlainText()))
        self.temperature.valueChanged.connect(lambda v: setattr(vm.sampling, "temperature", v))
        self.top_p.valueChanged.connect(lambda v: setattr(vm.sampling, "top_p", v))
        self.max_tokens.valueChanged.connect(lambda v: setattr(vm.sampling, "max_tokens", v))
        vm.changed.connect(self._sync)
        vm.lane_changed.connect(self._render_lane)
        vm.error.connect(self.status.setText)
        self.temperature.setValue(vm.sampling.temperature)
        self.top_p.setValue(vm.sampling.top_p)
        self.max_tokens.setValue(vm.sampling.max_tokens)
        self._sync()

    def _send(self) -> None:
        self.vm.send(self.prompt.toPlainText())
        if self.vm.streaming:
            self.prompt.clear()

    def _compare(self, _: int) -> None:
        text = self.compare.currentText()
        self.vm.set_compare(None if text == NO_COMPARE else text)

    def _sync(self) -> None:
        vm = self.vm
        for combo, current, extra in (
            (self.model, vm.lanes[0].model, []),
            (self.compare, vm.lanes[1].model if len(vm.lanes) > 1 else NO_COMPARE, [NO_COMPARE]),
        ):
            items = extra + vm.models
            if [combo.itemText(i) for i in range(combo.count())] != items:
                combo.clear()
                combo.addItems(items)
            combo.setCurrentText(current)
        while len(self.transcripts) < len(vm.lanes):
            browser = QTextBrowser()
            browser.setAccessibleName(f"Conversation {len(self.transcripts) + 1}")
            self.transcripts.append(browser)
            self.columns.addWidget(browser)
        for i, browser in enumerate(self.transcripts):
            browser.setVisible(i < len(vm.lanes))
        for i in range(len(vm.lanes)):
            self._render_lane(i)
        self.send_button.setEnabled(not vm.streaming and bool(vm.models))
        self.stop_button.setEnabled(vm.streaming)
        self.regen_button.setEnabled(not vm.streaming and any(lane.turns for lane in vm.lanes))
        if not vm.models and not vm.busy and vm.last_error is None:
            self.status.setText("No model is loaded on the server.")
        elif vm.last_error is None:
            self.status.setText("")

    def _render_lane(self, index: int) -> None:
        if index >= len(self.vm.lanes) or index >= len(self.transcripts):
            return
        lane: Lane = self.vm.lanes[index]
        header = f"<h3>{html.escape(lane.model)}</h3>" if len(self.vm.lanes) > 1 else ""
        body = "".join(turn_html(t) for t in lane.turns) or "<p style='color:#888'>Say hello to the model.</p>"
        browser = self.transcripts[index]
        browser.setHtml(header + body)
        browser.verticalScrollBar().setValue(browser.verticalScrollBar().maximum())
