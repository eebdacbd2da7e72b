"""What every screen's viewmodel has: the client, a busy flag, an error message, and ``loaded``.

``loaded`` fires once the screen's data has arrived (or failed): the screenshot mode waits for
it, and so do the tests (``qtbot.waitSignal``), instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Signal

from gui import tasks
from gui.client import ApiClient


class ScreenViewModel(QObject):
    changed = Signal()  # the state changed: views re-read it
    error = Signal(str)  # a message for the user; the screen stays usable
    loaded = Signal()  # the first data (or the first error) arrived

    title = "Screen"

    def __init__(self, client: ApiClient) -> None:
        super().__init__()
        self.client = client
        self.busy = False
        self.last_error: str | None = None

    def refresh(self) -> None:
        """Load the screen's data (off the GUI thread); ``loaded`` fires when it is in."""
        self.loaded.emit()

    def call(
        self,
        fn: Callable[..., Any],
        on_done: Callable[[Any], None],
        *,
        on_progress: Callable[[Any], None] | None = None,
        notify_loaded: bool = False,
    ) -> None:
        """Run a client call in a worker; errors go to ``error`` and ``last_error``."""
        self.busy = True
        self.changed.emit()

        def done(value: Any) -> None:
            self.busy, self.last_error = False, None
            on_done(value)
            self.changed.emit()
            if notify_loaded:
                self.loaded.emit()

        def failed(message: str) -> None:
            self.busy, self.last_error = False, message
            self.error.emit(message)
            self.changed.emit()
            if notify_loaded:
                self.loaded.emit()

        tasks.run(fn, done, failed, on_progress=on_progress)
