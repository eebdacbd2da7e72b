"""The default model converted to ONNX with `appliance models convert`, served by a live server
through the ONNX engine: the API behaves as it does on GGUF (chat, streams, stop strings,
concurrency with batched answers equal to solo ones, cancellation, usage, the request log).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL, LiveServer, _start

ONNX_ID = f"{DEFAULT_MODEL}-onnx-int4"
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colours.",
    "Say hello.",
    "Count to 5.",
]


def appliance(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"APPLIANCE_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("onnx-home")
    done = appliance(home, "models", "convert", DEFAULT_MODEL)
    assert done.returncode == 0, done.stderr
    assert f"converted {DEFAULT_MODEL} to {ONNX_ID}" in done.stdout and "sha256" in done.stdout
    return home


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[LiveServer]:
    server = _start(home, ["--model", ONNX_ID, "--parallel", "4", "--ctx-size", "1024"])
    yield server
    server.stop()


@pytest.fixture
def client(server: LiveServer) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: Any, question: str, **kw: Any) -> Any:
    kw = {"max_tokens": 24, "temperature": 0, **kw}
    return client.chat.completions.create(model=ONNX_ID, messages=[{"role": "user", "content": question}], **kw)


def test_the_converted_model_is_registered_and_listed(home: Path) -> None:
    listed = json.loads(appliance(home, "models", "list", "--json").stdout)
    row = next(r for r in listed if r["id"] == ONNX_ID)
    assert row["engine"] == "onnx" and row["quantization"] == "onnx-int4"
    assert Path(row["file"], "model.onnx").is_file()
    again = appliance(home, "models", "convert", DEFAULT_MODEL)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_chat_answers_with_usage(client: Any, server: LiveServer) -> None:
    answer = ask(client, QUESTIONS[0])
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 10 and answer.usage.completion_tokens > 3
    assert server.model_stats()["slots"] == 4


def test_stream_and_stop_string(client: Any) -> None:
    whole = ask(client, QUESTIONS[3], max_tokens=40).choices[0].message.content
    assert "3" in whole
    chunks = list(ask(client, QUESTIONS[3], max_tokens=40, stream=True, stop=["3"]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole[: whole.index("3")]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_answers_equal_solo_ones(client: Any) -> None:
    solo = [ask(client, q).choices[0].message.content for q in QUESTIONS]
    together: list[str | None] = [None] * len(QUESTIONS)

    def run(i: int) -> None:
        together[i] = ask(client, QUESTIONS[i]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == solo


def test_cancelled_stream_frees_its_slot_and_is_logged(client: Any, server: LiveServer) -> None:
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={
            "model": ONNX_ID,
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400,
            "stream": True,
        },
        timeout=60,
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # the client goes away mid-answer
    deadline = time.monotonic() + 20
    while server.model_stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    answer = ask(client, QUESTIONS[2])
    assert answer.choices[0].message.content
    rows = httpx.get(server.base_url + "/v1/appliance/logs", params={"limit": 50}, timeout=10).json()["data"]
    assert any(row["status"] == "cancelled" for row in rows)
    row = httpx.get(f"{server.base_url}/v1/appliance/logs/{answer.id}", timeout=10).json()
    assert (row["model"], row["engine"], row["quantization"]) == (ONNX_ID, "onnx", "int4")


def test_structured_output_and_seeds(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer", "minimum": 0}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    for seed in (1, 2, 3):
        answer = ask(
            client, "Describe a large city as JSON.", temperature=1.0, seed=seed, max_tokens=60, response_format=fmt
        )
        data = json.loads(answer.choices[0].message.content)
        assert set(data) == {"city", "population"} and isinstance(data["population"], int)
    first = ask(client, QUESTIONS[1], temperature=1.0, seed=42).choices[0].message.content
    assert ask(client, QUESTIONS[1], temperature=1.0, seed=42).choices[0].message.content == first
