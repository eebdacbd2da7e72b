"""Running client calls off the GUI thread, with their results delivered back to it by signals.

``run(fn, on_done, on_error)`` queues ``fn`` on Qt's global thread pool. The relay object lives on
the GUI thread and its slots call the callbacks, so Qt delivers every result through the GUI
thread's event queue (a queued connection): viewmodels never lock anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot

from gui.client import ApiError

Callback = Callable[[Any], None]


class _Relay(QObject):
    done = Signal(object)
    failed = Signal(str)
    progress = Signal(object)

    def __init__(self, on_done: Callback, on_error: Callable[[str], None], on_progress: Callback | None) -> None:
        super().__init__()
        self._on_done, self._on_error, self._on_progress = on_done, on_error, on_progress
        self.done.connect(self._done)
        self.failed.connect(self._failed)
        self.progress.connect(self._progress)

    @Slot(object)
    def _done(self, value: Any) -> None:
        _running.discard(self)
        self._on_done(value)

    @Slot(str)
    def _failed(self, message: str) -> None:
        _running.discard(self)
        self._on_error(message)

    @Slot(object)
    def _progress(self, value: Any) -> None:
        if self._on_progress is not None:
            self._on_progress(value)


class _Task(QRunnable):
    def __init__(self, fn: Callable[..., Any], relay: _Relay, with_progress: bool) -> None:
        super().__init__()
        self._fn, self._relay, self._with_progress = fn, relay, with_progress

    def run(self) -> None:
        try:
            result = self._fn(self._relay.progress.emit) if self._with_progress else self._fn()
        except ApiError as exc:
            self._relay.failed.emit(str(exc))
        except Exception as exc:  # a bug of ours must show in the window, not vanish in a worker
            self._relay.failed.emit(f"{type(exc).__name__}: {exc}")
        else:
            self._relay.done.emit(result)


_running: set[_Relay] = set()  # each relay stays alive until its task has reported


def run(
    fn: Callable[..., Any],
    on_done: Callback,
    on_error: Callable[[str], None],
    *,
    on_progress: Callback | None = None,
) -> None:
    """Run ``fn`` in a worker thread; ``fn`` gets an ``emit(value)`` argument when ``on_progress`` is given."""
    relay = _Relay(on_done, on_error, on_progress)
    _running.add(relay)
    QThreadPool.globalInstance().start(_Task(fn, relay, on_progress is not None))
