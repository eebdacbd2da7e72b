"""GUI tests run offscreen (no display needed); any Qt warning fails them (``qt_log_level_fail``)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

_exit_status: list[int] = []


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


def pytest_unconfigure(config: object) -> None:
    """Leave as the app does (gui.app._leave): without finalising Qt's objects one by one.

    PySide6 with pyqtgraph can crash while the interpreter finalises them ("bool_dealloc",
    about one exit in three), which would turn a passing run into status 134. Everything is
    reported and written by now (this is pytest's last hook).
    """
    import sys

    if "PySide6" in sys.modules and _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
