"""Starting and stopping a real server process: exposure rules, API key, clean shutdown, bad models."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import DEFAULT_MODEL, LiveServer

StartServer = Callable[..., LiveServer]


def test_non_loopback_without_key_refuses_to_start(start_server: StartServer) -> None:
    server = start_server("--host", "0.0.0.0", expect_ready=False)
    assert server.process.wait(60) == 1
    output = "".join(server.output)
    assert "API key" in output and "0.0.0.0" in output
    assert "Traceback" not in output


def test_api_key_required_with_official_client(start_server: StartServer) -> None:
    server = start_server("--api-key", "test-key-0123", "--parallel", "1", "--ctx-size", "512")
    url = server.base_url + "/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url, api_key="test-key-0123", max_retries=0)
    resp = good.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert resp.choices[0].message.content is not None


def test_sigterm_lets_running_stream_finish_then_exits(start_server: StartServer) -> None:
    server = start_server("--parallel", "1", "--ctx-size", "512")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Write a short poem about autumn."}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    chunks = []
    sent = threading.Event()
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3 and not sent.is_set():
            server.process.send_signal(signal.SIGTERM)
            sent.set()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[0] in ("stop", "length"), "the running stream was cut"
    assert server.process.wait(30) == 0
    output = "".join(server.output)
    assert "stopped" in output and "Traceback" not in output


def test_sigint_with_idle_server_exits_quickly(start_server: StartServer) -> None:
    server = start_server("--parallel", "1", "--ctx-size", "512")
    assert server.stop(signal.SIGINT, timeout=20) == 0


def _write_user_models(home: Path, entry: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(entry, "utf-8")


def test_missing_model_file_is_a_clear_message(start_server: StartServer, tmp_path: Path) -> None:
    _write_user_models(tmp_path / "server-home", '[models.ghost]\npath = "/nowhere/ghost.gguf"\n')
    server = start_server("--model", "ghost", expect_ready=False)
    assert server.process.wait(60) == 1
    output = "".join(server.output)
    assert "/nowhere/ghost.gguf" in output and "does not exist" in output
    assert "Traceback" not in output


def test_corrupt_model_file_is_a_clear_message(start_server: StartServer, tmp_path: Path) -> None:
    home = tmp_path / "server-home"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 1000)
    _write_user_models(home, f'[models.broken]\npath = "{bad}"\n')
    server = start_server("--model", "broken", expect_ready=False)
    assert server.process.wait(60) == 1
    output = "".join(server.output)
    assert str(bad) in output and "Traceback" not in output


def test_sha256_mismatch_is_refused(start_server: StartServer, tmp_path: Path, default_model_path: Path) -> None:
    home = tmp_path / "server-home"
    _write_user_models(home, f'[models.tampered]\npath = "{default_model_path}"\nsha256 = "{"0" * 64}"\n')
    server = start_server("--model", "tampered", expect_ready=False)
    assert server.process.wait(60) == 1
    output = "".join(server.output)
    assert "corrupt or was replaced" in output and str(default_model_path) in output
