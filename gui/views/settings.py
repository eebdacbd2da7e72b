"""The Settings screen's widgets: a form generated from the server's description of its settings.

One editor per setting type (a spin box within the setting's bounds, a check box, a list of
choices, a line or a list of lines), so a setting the server adds shows up without a change here.
A spin box of a setting that may be unset has one extra step below its minimum that reads "default".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QCoreApplication, QEvent, QObject, Qt
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from gui.viewmodels.settings import Setting, SettingsViewModel

INT_LIMIT = 2**31 - 1  # QSpinBox holds a C int
FLOAT_LIMIT = 1e9
FLOAT_STEP = 0.01
UNSET = "default"
COLUMNS = 2
COMPACT_WIDTH = 260


class _Editor:
    """One setting's widget, and how to read and write its value in the route's JSON terms."""

    def __init__(self, widget: QWidget, changed: Any, get: Callable[[], Any], put: Callable[[Any], None]) -> None:
        self.widget, self.changed, self.get, self._put = widget, changed, get, put  # changed: the user's edit signal

    def set(self, value: Any) -> None:
        self.widget.blockSignals(True)  # a value from the viewmodel is no edit
        try:
            self._put(value)
        finally:
            self.widget.blockSignals(False)


def _bounds(setting: Setting, step: float, limit: float) -> tuple[float, float]:
    low = setting["minimum"]
    if low is None:
        low = -limit if setting["exclusive_minimum"] is None else setting["exclusive_minimum"] + step
    high = setting["maximum"]
    if high is None:
        high = limit if setting["exclusive_maximum"] is None else setting["exclusive_maximum"] - step
    return max(low, -limit), min(high, limit)


def _int_editor(setting: Setting) -> _Editor:
    box = QSpinBox()
    low, high = _bounds(setting, 1, INT_LIMIT - 1)
    nullable = setting["nullable"]
    box.setRange(int(low) - (1 if nullable else 0), int(high))
    if nullable:
        box.setSpecialValueText(UNSET)

    def get() -> int | None:
        return None if nullable and box.value() == box.minimum() else box.value()

    return _Editor(box, box.valueChanged, get, lambda v: box.setValue(box.minimum() if v is None else int(v)))


def _float_editor(setting: Setting) -> _Editor:
    box = QDoubleSpinBox()
    box.setDecimals(2)
    low, high = _bounds(setting, FLOAT_STEP, FLOAT_LIMIT)
    nullable = setting["nullable"]
    box.setRange(low - (FLOAT_STEP if nullable else 0), high)
    if nullable:
        box.setSpecialValueText(UNSET)

    def get() -> float | None:
        return None if nullable and box.value() <= box.minimum() else box.value()

    return _Editor(box, box.valueChanged, get, lambda v: box.setValue(box.minimum() if v is None else float(v)))


def _choice_editor(setting: Setting) -> _Editor:
    box = QComboBox()
    if setting["nullable"]:
        box.addItem(f"({UNSET})", None)
    for choice in setting["choices"]:
        box.addItem(choice, choice)
    put = lambda v: box.setCurrentIndex(max(box.findData(v), 0))  # noqa: E731
    return _Editor(box, box.currentIndexChanged, box.currentData, put)


def _bool_editor(_: Setting) -> _Editor:
    box = QCheckBox("on")
    return _Editor(box, box.toggled, box.isChecked, lambda v: box.setChecked(bool(v)))


def _list_editor(setting: Setting) -> _Editor:
    box = QPlainTextEdit()
    box.setTabChangesFocus(True)  # Tab moves on, as in every other field
    box.setPlaceholderText("one per line" + (" (a file or folder path)" if setting["format"] == "path" else ""))
    box.setFixedHeight(box.fontMetrics().lineSpacing() * 3 + 12)

    def get() -> list[str]:
        return [line.strip() for line in box.toPlainText().splitlines() if line.strip()]

    put = lambda v: box.setPlainText("\n".join(str(item) for item in v or []))  # noqa: E731
    return _Editor(box, box.textChanged, get, put)


def _text_editor(setting: Setting) -> _Editor:
    line = QLineEdit()
    nullable = setting["nullable"]
    if setting["secret"]:
        line.setEchoMode(QLineEdit.EchoMode.Password)
    elif nullable:
        line.setPlaceholderText(UNSET)

    def get() -> str | None:
        return None if nullable and not setting["secret"] and not line.text().strip() else line.text()

    return _Editor(line, line.textChanged, get, lambda v: line.setText("" if v is None else str(v)))


def make_editor(setting: Setting) -> _Editor:
    """The editor that fits the setting's type and bounds."""
    if setting["choices"]:
        return _choice_editor(setting)
    kinds = {"boolean": _bool_editor, "integer": _int_editor, "number": _float_editor, "array": _list_editor}
    return kinds.get(setting["type"], _text_editor)(setting)


class _WheelScrollsPage(QObject):
    """A wheel over a spin box or list the user has not focused scrolls the page, not the value."""

    def __init__(self, scroll: QScrollArea) -> None:
        super().__init__(scroll)
        self._scroll = scroll

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Wheel and isinstance(watched, QWidget) and not watched.hasFocus():
            QCoreApplication.sendEvent(self._scroll.verticalScrollBar(), event)
            return True
        return False


class SettingsView(QWidget):
    def __init__(self, vm: SettingsViewModel) -> None:
        super().__init__()
        self.vm = vm
        self.editors: dict[str, _Editor] = {}
        self.labels: dict[str, QLabel] = {}
        self.notes: dict[str, QLabel] = {}

        self.where = QLabel("Loading the settings…")
        self.where.setWordWrap(True)
        self.where.setStyleSheet("color: gray")
        self.where.setAccessibleName("Settings file")
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("background: #e6f4ea; color: #1e4620; padding: 6px; border-radius: 4px")
        self.banner.setAccessibleName("Saved")
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setStyleSheet("background: #fdecea; color: #b00020; padding: 6px; border-radius: 4px")
        self.message.setAccessibleName("Settings error")
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.scroll_area = QScrollArea()
        self.scroll_area.setWidgetResizable(True)
        self.scroll_area.setAccessibleName("Settings form")
        self._wheel = _WheelScrollsPage(self.scroll_area)

        self.save_button = QPushButton("Save")
        self.save_button.setAccessibleName("Save the settings to config.toml")
        self.save_button.setShortcut(QKeySequence(QKeySequence.StandardKey.Save))
        self.save_button.setToolTip("Write the changed settings to config.toml (Ctrl+S)")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setAccessibleName("Revert the unsaved changes")
        self.state = QLabel()
        self.state.setAccessibleName("Unsaved changes")
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.state)
        buttons.addStretch()

        layout = QVBoxLayout(self)
        layout.addWidget(self.where)
        layout.addWidget(self.banner)
        layout.addWidget(self.message)
        layout.addWidget(self.scroll_area, 1)
        layout.addLayout(buttons)

        self.save_button.clicked.connect(vm.save)
        self.revert_button.clicked.connect(vm.revert)
        vm.reset.connect(self._reset)
        vm.changed.connect(self._update)
        self._update()

    # -- building the form -----------------------------------------------------------------------

    def _reset(self) -> None:
        if set(self.editors) != set(self.vm.settings):
            self._build()
        for name, editor in self.editors.items():
            editor.set(None if self.vm.settings[name]["secret"] else self.vm.value(name))
        self._update()

    def _build(self) -> None:
        """A fresh form: the groups in order down the first column, then the next, so Tab follows reading order."""
        self.editors.clear()
        self.labels.clear()
        self.notes.clear()
        form = QWidget()
        row = QHBoxLayout(form)
        columns = [QVBoxLayout() for _ in range(COLUMNS)]
        groups = self.vm.groups()
        total, before = sum(len(settings) for _, settings in groups), 0
        for title, settings in groups:
            columns[min(COLUMNS - 1, before * COLUMNS // total)].addWidget(self._group(title, settings))
            before += len(settings)
        for column_layout in columns:
            column_layout.addStretch(1)
            row.addLayout(column_layout, 1)
        self.scroll_area.setWidget(form)  # the previous form, if any, is deleted with its editors

    def _group(self, title: str, settings: list[Setting]) -> QGroupBox:
        box = QGroupBox(title)
        box.setAccessibleName(f"{title} settings")
        form = QFormLayout(box)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
        for setting in settings:
            form.addRow(*self._row(setting))
        return box

    def _row(self, setting: Setting) -> tuple[QLabel, QWidget]:
        name, description = setting["name"], setting["description"]
        editor = make_editor(setting)
        widget = editor.widget
        widget.setAccessibleName(name.replace("_", " "))
        widget.setAccessibleDescription(description)
        widget.setToolTip(description)
        if isinstance(widget, QLineEdit) and setting["secret"]:
            widget.setPlaceholderText(self.vm.secret_hint(name))
        if isinstance(widget, QAbstractSpinBox | QComboBox):
            widget.setMaximumWidth(COMPACT_WIDTH)  # a number or a choice needs no full row
        if isinstance(widget, QAbstractSpinBox | QComboBox | QPlainTextEdit):
            widget.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
            widget.installEventFilter(self._wheel)
        editor.changed.connect(lambda *_: self.vm.set_value(name, editor.get()))
        label = QLabel(name)
        label.setBuddy(widget)
        label.setToolTip(description)
        help_text = QLabel(description)
        help_text.setWordWrap(True)
        help_text.setStyleSheet("color: gray; font-size: 11px")
        note = QLabel()
        note.setWordWrap(True)
        note.setStyleSheet("color: #8a5300; font-size: 11px")
        field = QWidget()
        column = QVBoxLayout(field)
        column.setContentsMargins(0, 0, 0, 4)
        column.setSpacing(1)
        for part in (widget, help_text, note):
            column.addWidget(part)
        self.editors[name], self.labels[name], self.notes[name] = editor, label, note
        return label, field

    # -- binding ---------------------------------------------------------------------------------

    def _update(self) -> None:
        vm = self.vm
        if vm.file:
            self.where.setText(
                f"Saved in {vm.file}, which the server reads when it starts (with or without this window). "
                "Environment variables and command-line flags win over it."
            )
        problem = vm.last_error or (f"config.toml cannot be read: {vm.file_error}" if vm.file_error else None)
        self.message.setText(problem or "")
        self.message.setVisible(problem is not None)
        self.banner.setText(vm.banner or "")
        self.banner.setVisible(vm.banner is not None)
        for name, label in self.labels.items():
            font = label.font()
            font.setBold(name in vm.edits)
            label.setFont(font)
            note = vm.note(name)
            self.notes[name].setText(note)
            self.notes[name].setVisible(bool(note))
        self.save_button.setEnabled(vm.dirty and not vm.busy)
        self.revert_button.setEnabled(vm.dirty and not vm.busy)
        count = len(vm.edits)
        self.state.setText("Saving…" if vm.busy and count else f"{count} unsaved change{'s' * (count != 1)}")
        self.state.setVisible(vm.busy or count > 0)
