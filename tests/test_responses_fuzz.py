"""Fuzzing ``/v1/responses`` in-process with the real model, as ``test_fuzz`` does for chat.

Whatever is sent, the answer is never a 5xx; errors are OpenAI's shape; every stream ends with its
terminal event (``response.completed``, ``.incomplete`` or ``.failed``), numbered from 0; and the
request log still writes afterwards.
"""

from __future__ import annotations

import json
import os
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
from appliance.responses_store import ResponseStore
from tests.conftest import DEFAULT_MODEL
from tests.test_fuzz import JSON

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TERMINAL = ("response.completed", "response.incomplete", "response.failed")

PART = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["input_text", "output_text", "input_image", "refusal", "x"]),
        "text": st.text(max_size=20),
    }
)
ITEM = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]),
            "content": st.text(max_size=40) | st.lists(PART, max_size=3) | JSON,
        },
        optional={"type": st.sampled_from(["message", "item_reference", "reasoning"]), "id": st.text(max_size=8)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call"), "call_id": st.text(max_size=6), "name": st.text(max_size=6)},
        optional={"arguments": st.text(max_size=10)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": st.text(max_size=6), "output": st.text(max_size=10) | JSON}
    ),
    JSON,
)
LIKELY: dict[str, st.SearchStrategy[Any]] = {
    "max_output_tokens": st.integers(-1, 3),
    "temperature": st.floats(-1, 3),
    "stream": st.booleans(),
    "store": st.booleans(),
    "instructions": st.text(max_size=20),
    "previous_response_id": st.sampled_from(["resp_nope", ""]) | st.text(max_size=10),
    "tools": st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search"]), "name": st.text(max_size=8)}),
        max_size=2,
    ),
    "tool_choice": st.sampled_from(["auto", "none", "required", "x"]) | JSON,
    "text": st.fixed_dictionaries(
        {"format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])})}
    ),
    "reasoning": st.fixed_dictionaries({"effort": st.sampled_from(["none", "low", None])}),
    "include": st.lists(st.sampled_from(["reasoning.encrypted_content", "message.output_text.logprobs"]), max_size=2),
    "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=10), max_size=3),
    "truncation": st.sampled_from(["auto", "disabled", "x"]),
    "parallel_tool_calls": st.booleans(),
}
FIELDS = (*LIKELY, "top_p", "user", "background", "conversation", "unknown_field", "stream_options", "top_logprobs")


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "max_output_tokens": 2, "temperature": 0}
    body["input"] = draw(st.text(max_size=60) | st.lists(ITEM, min_size=1, max_size=3) | JSON)
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        body[key] = draw(LIKELY[key] | JSON if key in LIKELY else JSON)
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=1)):
        del body[key]
    return body


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, LogWriter]]:
    home = tmp_path_factory.mktemp("fuzz-responses-home")
    settings_ = Settings(ctx_size=256, parallel=4, threads=2, max_body_bytes=64 * 1024, max_queue=8)
    scheduler = build_scheduler(settings_, Paths(home))
    writer = LogWriter(home / "requests.sqlite", flush_interval=0.05)
    store = ResponseStore(Paths(home).responses_file)
    with TestClient(
        create_app(scheduler, settings_, writer, responses=store), base_url="http://localhost",
        raise_server_exceptions=False,
    ) as client:  # fmt: skip
        yield client, writer
    writer.close()
    store.close()
    scheduler.stop()


def check_answer(resp: Any) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "response.created" and events[-1]["type"] in TERMINAL, events[-1]
    else:
        assert resp.json()["object"] == "response" and resp.json()["output"], resp.text


@FUZZ
@given(body=bodies())
def test_fuzzed_bodies(app: tuple[TestClient, LogWriter], body: dict[str, Any]) -> None:
    client, _ = app
    check_answer(client.post("/v1/responses", content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(
    rid=st.text(min_size=1, max_size=30),
    query=st.dictionaries(st.sampled_from(["limit", "order", "after", "stream"]), st.text(max_size=5)),
)
def test_fuzzed_ids_and_queries(app: tuple[TestClient, LogWriter], rid: str, query: dict[str, str]) -> None:
    client, _ = app
    path = f"/v1/responses/{quote(rid, safe='')}"
    for resp in (client.get(path, params=query), client.get(path + "/input_items", params=query), client.delete(path)):
        assert resp.status_code < 500 and "error" in resp.json(), resp.text


def test_still_serving_and_logging(app: tuple[TestClient, LogWriter]) -> None:
    client, writer = app
    resp = client.post("/v1/responses", json={"model": DEFAULT_MODEL, "input": "Hi", "max_output_tokens": 3})
    assert resp.status_code == 200, resp.text
    listed = client.get(f"/v1/responses/{resp.json()['id']}/input_items", params={"limit": 1, "order": "asc"})
    assert listed.status_code == 200 and listed.json()["data"][0]["content"][0]["text"] == "Hi"
    assert writer.flush(10)
    status = writer.status()
    assert status["error"] is None and status["failed"] == 0 and status["dropped"] == 0, status
    assert client.get("/health").json()["status"] == "ok"


def test_the_home_holds_the_store(tmp_path: Path) -> None:
    assert Paths(tmp_path).responses_file == tmp_path / "responses.sqlite"
