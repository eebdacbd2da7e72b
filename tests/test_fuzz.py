"""Fuzzing tier: hypothesis-made bodies, headers and query strings against the app with the real model.

Bounded (``FUZZ_EXAMPLES``, default 200 per test; under a minute in all on 2 cores), so CI runs it
every time. Whatever is sent, the server must answer without a 5xx, every error in OpenAI's shape,
every stream well-formed to its end; afterwards it must still serve and its request log must still
write (issue 13: one request stopped the log for good; others gave 500s).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.api.app import create_app
from appliance.bootstrap import build_scheduler
from appliance.config import Paths, Settings
from appliance.requestlog.writer import LogWriter
from tests.conftest import DEFAULT_MODEL

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, not flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
SAMPLING_FIELDS = (
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "stop", "seed", "n", "user", "stream", "stream_options", "logprobs", "logit_bias", "lora",
    "max_completion_tokens", "tools", "response_format", "echo", "suffix", "best_of", "unknown_field",
)  # fmt: skip


def small_or_any(key: str) -> st.SearchStrategy[Any]:
    """Mostly valid-looking values (so generation paths run), sometimes anything at all."""
    likely = {
        "model": st.sampled_from([DEFAULT_MODEL, "smollm2", f"{DEFAULT_MODEL}:nope", "", "gpt-4"]),
        "max_tokens": st.integers(-2, 4),
        "max_completion_tokens": st.integers(-2, 4),
        "temperature": st.floats(-1, 3),
        "stop": st.lists(st.text(max_size=5), max_size=5) | st.text(max_size=5),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.integers(0, 3),
        "seed": st.integers(-(2**70), 2**70),
        "lora": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8), "scale": st.floats(-20, 20)}), max_size=2),
    }
    return likely.get(key, JSON) | JSON if key in likely else JSON


CONTENT = st.text(max_size=60) | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": st.text(max_size=20)}),
    max_size=3,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]), "content": CONTENT | JSON}
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    chat = draw(st.booleans())
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "max_tokens": 2, "temperature": 0}
    if chat:
        body["messages"] = draw(st.lists(MESSAGE, min_size=1, max_size=3) | JSON)
    else:
        body["prompt"] = draw(st.text(max_size=80) | st.lists(st.integers(-5, 60000), max_size=8) | JSON)
    for key in draw(st.lists(st.sampled_from(SAMPLING_FIELDS), max_size=4, unique=True)):
        body[key] = draw(small_or_any(key))
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=1)):
        del body[key]
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def raw_variants(text: str) -> st.SearchStrategy[bytes]:
    """The body as bytes, or spoiled: cut short, a lone surrogate escape, invalid UTF-8, deep nesting."""
    data = text.encode()
    return st.sampled_from(
        [
            data,
            data[: len(data) // 2],
            data.replace(b'"Hi', b'"\\udfffHi').replace(b'"max_tokens"', b'"\\ud800"'),
            data + b"\xff",
            b"[" * 200 + data + b"]" * 200,
            b'{"model": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}",
            data.replace(b'"temperature": 0', b'"temperature": NaN, "top_p": Infinity, "seed": -Infinity'),
        ]
    )


@pytest.fixture(scope="module")
def app_and_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, LogWriter, Path]]:
    home = tmp_path_factory.mktemp("fuzz-home")
    settings_ = Settings(ctx_size=256, parallel=4, threads=2, max_body_bytes=64 * 1024, max_queue=8)
    scheduler = build_scheduler(settings_, Paths(home))
    log_path = home / "requests.sqlite"
    writer = LogWriter(log_path, flush_interval=0.05)
    app = create_app(scheduler, settings_, writer)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client, writer, log_path
    writer.close()
    scheduler.stop()


def check_answer(resp: Any, stream: bool) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events, resp.text
        for event in events[:-1]:
            json.loads(event)
        last = events[-1]
        assert last == "[DONE]" or "error" in json.loads(last), last
    else:
        assert resp.json()["choices"], resp.text


@FUZZ
@given(case=bodies())
def test_fuzzed_json_bodies(app_and_log: tuple[TestClient, LogWriter, Path], case: tuple[str, dict[str, Any]]) -> None:
    client, _, _ = app_and_log
    path, body = case
    resp = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    check_answer(resp, bool(body.get("stream")))


@FUZZ
@given(data=st.data())
def test_fuzzed_raw_bytes_headers_and_queries(app_and_log: tuple[TestClient, LogWriter, Path], data: Any) -> None:
    client, _, _ = app_and_log
    path, body = data.draw(bodies())
    raw = data.draw(raw_variants(json.dumps(body)))
    headers = {
        "content-type": data.draw(
            st.sampled_from(["application/json", "application/json; charset=latin-1", "a/b+json"])
        ),
        "x-appliance-log": data.draw(st.sampled_from(["on", "off", " OFF ", "0"])),
    }
    check_answer(client.post(path, content=raw, headers=headers), stream=False)
    query = data.draw(
        st.dictionaries(st.sampled_from(["limit", "offset", "since", "status", "rating", "q"]), st.text())
    )
    resp = client.get("/v1/appliance/logs", params=query)
    assert resp.status_code < 500, resp.text
    record = quote(data.draw(st.text(min_size=1, max_size=30)), safe="")
    feedback = data.draw(JSON)
    resp = client.post(f"/v1/appliance/logs/{record}/feedback", json=feedback)
    assert resp.status_code < 500 and "error" in resp.json(), resp.text
    assert client.get(f"/v1/models/{record}").status_code < 500


def test_still_serving_and_logging_after_the_fuzz(app_and_log: tuple[TestClient, LogWriter, Path]) -> None:
    client, writer, log_path = app_and_log
    resp = client.post(
        "/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    )
    assert resp.status_code == 200, resp.text
    assert writer.flush(10)
    status = writer.status()
    assert status["error"] is None and status["failed"] == 0 and status["dropped"] == 0, status
    conn = sqlite3.connect(log_path)
    try:
        assert conn.execute("SELECT status FROM exchanges WHERE id = ?", (resp.json()["id"],)).fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM exchanges").fetchone()[0] > 1
    finally:
        conn.close()
    assert client.get("/health").json()["status"] == "ok"
