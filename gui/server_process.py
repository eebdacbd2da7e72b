"""The server the GUI starts for itself: ``appliance serve`` as a child process on a free loopback port.

The child reads the same home and ``config.toml`` as ``--serve`` would; only the address is the
GUI's (127.0.0.1, a free port), so a port taken by another program can never stop the app. Its
output is read line by line: the ``serving ... on URL`` line says it is ready, an
``appliance: error: ...`` line says why it could not start. Quitting stops it (SIGTERM, then a kill
after 3 s): no orphan process, no port left behind.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Signal

SERVING = re.compile(r"serving .* on (http://[^\s]+)")
ERROR = re.compile(r"appliance: error: (.*)")
STOP_TIMEOUT_MS = 3000


def server_command(extra: list[str]) -> tuple[str, list[str]]:
    """The program and arguments that run ``appliance serve`` (the frozen executable runs itself)."""
    base = ["serve", "--host", "127.0.0.1", "--port", "0", *extra]
    if getattr(sys, "frozen", False):
        return sys.executable, base
    return sys.executable, ["-m", "appliance", *base]


class ManagedServer(QObject):
    ready = Signal(str)  # the base URL
    failed = Signal(str)  # why it could not start, or that it stopped
    output = Signal(str)  # each line it prints, for the Server screen's log

    def __init__(self, home: Path | None = None, extra_args: list[str] | None = None) -> None:
        super().__init__()
        self._home = home
        self._extra = extra_args or []
        self._process: QProcess | None = None
        self._buffer = ""
        self.url: str | None = None
        self.lines: deque[str] = deque(maxlen=500)
        self._error: str | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.state() != QProcess.ProcessState.NotRunning

    def start(self) -> None:
        if self.running:
            return
        self.url, self._error, self._buffer, self._stopping = None, None, "", False
        process = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        if self._home is not None:
            env.insert("APPLIANCE_HOME", str(self._home))
        process.setProcessEnvironment(env)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._read)
        process.finished.connect(self._finished)
        program, args = server_command(self._extra)
        self._process = process
        process.start(program, args)

    def stop(self) -> None:
        """Stop the child within ``STOP_TIMEOUT_MS`` (it drains first), then kill it."""
        process = self._process
        if process is None or process.state() == QProcess.ProcessState.NotRunning:
            return
        self._stopping = True
        process.terminate()
        if not process.waitForFinished(STOP_TIMEOUT_MS):
            process.kill()
            process.waitForFinished(STOP_TIMEOUT_MS)

    def _read(self) -> None:
        assert self._process is not None
        self._buffer += bytes(self._process.readAllStandardOutput().data()).decode("utf-8", "replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self.lines.append(line)
            self.output.emit(line)
            if self.url is None and (match := SERVING.search(line)):
                self.url = match.group(1)
                self.ready.emit(self.url)
            elif match := ERROR.search(line):
                self._error = match.group(1)

    def _finished(self, code: int, _status: QProcess.ExitStatus) -> None:
        if self._stopping:
            return
        if self.url is None:
            self.failed.emit(self._error or f"the server exited with code {code} before it was ready")
        else:
            self.failed.emit(f"the server stopped (exit code {code})")


def pid_of(server: ManagedServer) -> int | None:
    """The child's process id (tests check it is gone after quitting)."""
    process = server._process
    return int(process.processId()) if process is not None and process.processId() else None
