"""Every control of every screen has an accessible name, and every screen is reachable from the keyboard."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QPlainTextEdit,
    QTextEdit,
    QWidget,
)
from pytestqt.qtbot import QtBot

from gui.app import SCREENS, MainWindow
from gui.client import ApiClient

CONTROLS = (QAbstractButton, QAbstractItemView, QAbstractSpinBox, QComboBox, QLineEdit, QPlainTextEdit, QTextEdit)


def _inside_compound(widget: QWidget) -> bool:
    """Part of another control (a combo box's editor, a spin box's, a table's headers): named by its owner."""
    parent = widget.parentWidget()
    while parent is not None:
        if isinstance(parent, QComboBox | QAbstractSpinBox | QAbstractItemView | QLineEdit):
            return True
        parent = parent.parentWidget()
    return False


def unnamed(view: QWidget) -> list[str]:
    missing = []
    for widget in view.findChildren(QWidget):
        if isinstance(widget, CONTROLS) and not _inside_compound(widget) and not widget.accessibleName():
            text: Any = getattr(widget, "text", lambda: "")()
            owner = widget.parentWidget()
            missing.append(f"{type(widget).__name__} {text!r} {widget.objectName()!r} in {type(owner).__name__}")
    return missing


def test_every_control_has_an_accessible_name(qtbot: QtBot) -> None:
    window = MainWindow(ApiClient("http://127.0.0.1:1"))
    qtbot.addWidget(window)
    problems = {}
    for row, screen in enumerate(SCREENS):
        window.nav.setCurrentRow(row)
        missing = unnamed(window.stack.widget(row))
        if missing:
            problems[screen.key] = missing
    assert not problems, problems
    assert window.nav.accessibleName()


def test_screens_are_reachable_with_ctrl_and_a_digit(qtbot: QtBot) -> None:
    window = MainWindow(ApiClient("http://127.0.0.1:1"))
    qtbot.addWidget(window)
    shortcuts = sorted(a.shortcut().toString() for a in window.actions())
    assert shortcuts == [f"Ctrl+{i + 1}" for i in range(len(SCREENS))]
    window.actions()[3].trigger()
    assert window.nav.currentRow() == [a.shortcut().toString() for a in window.actions()].index("Ctrl+4")
