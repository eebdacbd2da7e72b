"""``/v1/responses`` against a real server process with the real default model, via the official client.

What is checked is the protocol (objects, events, stored conversations, errors), not the model's
wisdom: a conversation continued with ``previous_response_id`` is shown to reach the model by its
token count, which must equal that of the same conversation sent whole.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, LiveServer

QUESTION = "What is the capital of France? Answer in one word."
LONG = "Write a long story about a dragon."
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def create(client: openai.OpenAI, **fields: Any) -> Any:
    return client.responses.create(model=DEFAULT_MODEL, temperature=0, **fields)


def events_of(server: LiveServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The raw stream: (the ``event:`` line's name, the ``data:`` JSON) per event."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = None
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert line != "data: [DONE]"  # Responses streams end with their terminal event
                events.append((name or "", json.loads(line.removeprefix("data: "))))
                name = None
    return events


# -- text in, text out --------------------------------------------------------------------------------


def test_text_in_text_out(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=20, temperature=0, metadata={"run": "1"}
    )
    resp = raw.parse()
    assert resp.id.startswith("resp_") and raw.headers["x-request-id"] == resp.id
    assert resp.object == "response" and resp.status == "completed" and resp.model == DEFAULT_MODEL
    assert "Paris" in resp.output_text
    [message] = resp.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert resp.usage is not None
    assert resp.usage.input_tokens > 10 and 0 < resp.usage.output_tokens <= 20
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    assert resp.usage.input_tokens_details.cached_tokens >= 0
    assert (resp.temperature, resp.max_output_tokens, resp.metadata, resp.store) == (0, 20, {"run": "1"}, True)
    assert resp.tools == [] and resp.tool_choice == "auto" and resp.parallel_tool_calls is False
    assert resp.previous_response_id is None and resp.error is None and resp.incomplete_details is None
    assert resp.top_p is not None  # the model's default, echoed


def test_same_answer_as_chat(client: openai.OpenAI) -> None:
    resp = create(client, input=QUESTION, max_output_tokens=20)
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=20, temperature=0
    )
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage is not None and chat.usage is not None
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_instructions_are_a_system_message(client: openai.OpenAI) -> None:
    resp = create(client, input=QUESTION, instructions="You are a pirate.", max_output_tokens=8)
    assert resp.instructions == "You are a pirate."
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=0,
    )
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage is not None and chat.usage is not None and resp.usage.input_tokens == chat.usage.prompt_tokens


def test_input_items_with_parts_and_roles(client: openai.OpenAI) -> None:
    items = [
        {"role": "developer", "content": "Answer in one word."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Capital of Italy?"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Rome."}]},
        {"role": "user", "content": "And of France?"},
    ]
    resp = create(client, input=items, max_output_tokens=10)
    assert resp.status in ("completed", "incomplete") and resp.output_text


def test_max_output_tokens_gives_incomplete(client: openai.OpenAI) -> None:
    resp = create(client, input=LONG, max_output_tokens=5)
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete"
    assert resp.usage is not None and resp.usage.output_tokens == 5


# -- streaming ------------------------------------------------------------------------------------------


def test_stream_events_in_order(live_server: LiveServer) -> None:
    events = events_of(
        live_server, {"model": DEFAULT_MODEL, "input": QUESTION, "max_output_tokens": 20, "temperature": 0}
    )
    kinds = [data["type"] for _, data in events]
    assert all(name == data["type"] for name, data in events)  # the event: line names the data's type
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created, done = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert done["id"] == created["id"] and done["status"] == "completed"
    item_id = events[2][1]["item"]["id"]
    assert all(data.get("item_id", item_id) == item_id for _, data in events[2:-1])
    text = "".join(data["delta"] for _, data in events if data["type"] == "response.output_text.delta")
    assert events[-4][1]["text"] == text == done["output"][0]["content"][0]["text"]
    assert done["output"][0]["id"] == item_id


def test_stream_equals_the_plain_answer(client: openai.OpenAI) -> None:
    plain = create(client, input=QUESTION, max_output_tokens=20)
    stream = create(client, input=QUESTION, max_output_tokens=20, stream=True)
    events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == plain.output_text
    assert final.response.usage == plain.usage
    with client.responses.stream(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=20, temperature=0) as helper:
        for _ in helper:
            pass
        assert helper.get_final_response().output_text == plain.output_text


def test_stream_cut_by_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    events = list(create(client, input=LONG, max_output_tokens=5, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 5


def test_client_gone_mid_stream_frees_the_slot(live_server: LiveServer) -> None:
    body = {"model": DEFAULT_MODEL, "input": LONG, "max_output_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{live_server.base_url}/v1/responses", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if "output_text.delta" in line:
                break
    deadline = time.monotonic() + 10
    while live_server.model_stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_server.model_stats()["active"] == 0


# -- stored responses -------------------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = create(client, input="Name a colour.", instructions="Answer in one word.", max_output_tokens=10)
    second = create(client, input="Name another one.", previous_response_id=first.id, max_output_tokens=10)
    assert second.previous_response_id == first.id and second.instructions is None
    # the same conversation sent whole: the model saw exactly that (first's instructions not carried over)
    whole = create(
        client,
        input=[
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Name another one."},
        ],
        max_output_tokens=10,
        store=False,
    )
    assert first.usage is not None and second.usage is not None and whole.usage is not None
    assert second.usage.input_tokens == whole.usage.input_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 10
    assert second.output_text == whole.output_text
    listed = client.responses.input_items.list(second.id, order="asc")
    texts = [item.content[0].text for item in listed.data]
    assert texts == ["Name a colour.", first.output_text, "Name another one."]
    assert [item.role for item in listed.data] == ["user", "assistant", "user"]
    third = create(client, input="And a third?", previous_response_id=second.id, max_output_tokens=5)
    assert len(client.responses.input_items.list(third.id).data) == 5


def test_retrieve_delete_and_input_items(client: openai.OpenAI) -> None:
    resp = create(client, input=QUESTION, max_output_tokens=10)
    again = client.responses.retrieve(resp.id)
    assert again.model_dump() == resp.model_dump()
    items = client.responses.input_items.list(resp.id)
    assert len(items.data) == 1 and items.data[0].role == "user" and items.data[0].content[0].text == QUESTION
    assert items.first_id == items.last_id == items.data[0].id and items.has_more is False
    child = create(client, input="Thanks.", previous_response_id=resp.id, max_output_tokens=5)
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(resp.id)
    assert info.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(resp.id)
    # what was built on it keeps its own copy of the conversation
    grandchild = create(client, input="Bye.", previous_response_id=child.id, max_output_tokens=5)
    assert grandchild.status in ("completed", "incomplete")


def test_input_items_pages(client: openai.OpenAI) -> None:
    turns = [{"role": "user", "content": f"Say {i}."} for i in range(5)]
    resp = create(client, input=turns, max_output_tokens=3)
    page = client.responses.input_items.list(resp.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["Say 0.", "Say 1."] and page.has_more
    newest = client.responses.input_items.list(resp.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["Say 4.", "Say 3."]
    assert [i.content[0].text for i in client.responses.input_items.list(resp.id, order="asc")] == [
        f"Say {i}." for i in range(5)
    ]  # auto-paging follows ``after``


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    resp = create(client, input=QUESTION, max_output_tokens=5, store=False)
    assert resp.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError) as info:
        create(client, input="More?", previous_response_id=resp.id, max_output_tokens=5)
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert info.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


def test_a_streamed_response_is_stored_before_its_last_event(client: openai.OpenAI) -> None:
    events = list(create(client, input=QUESTION, max_output_tokens=10, stream=True))
    rid = events[-1].response.id
    follow = create(client, input="Why?", previous_response_id=rid, max_output_tokens=5)
    assert follow.previous_response_id == rid


def test_the_request_log_records_responses(live_server: LiveServer, client: openai.OpenAI) -> None:
    resp = create(client, input=QUESTION, max_output_tokens=8)
    deadline = time.monotonic() + 5
    while (r := httpx.get(f"{live_server.base_url}/v1/appliance/logs/{resp.id}")).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    row = r.json()
    assert row["endpoint"] == "responses" and row["status"] == "ok"
    assert row["response_text"] == resp.output_text and row["request"]["input"] == QUESTION


# -- refused ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unknown_parameter"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "unsupported_parameter"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort", "unsupported_parameter"),
        ({"background": True}, "background", "unsupported_parameter"),
        ({"include": ["message.output_text.logprobs"]}, "include", "unsupported_parameter"),
        ({"temperature": 3}, "temperature", None),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "input.0.content.0.type",
            "unsupported_parameter",
        ),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input.0.role", None),
        ({"input": "word " * 5000}, "input", "context_length_exceeded"),
    ],
)
def test_refused_with_the_field_named(
    client: openai.OpenAI, fields: dict[str, Any], param: str, code: str | None
) -> None:
    fields = {"input": QUESTION, "max_output_tokens": 5, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=DEFAULT_MODEL, **fields)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    if code is not None:
        assert body["code"] == code


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="gpt-17", input=QUESTION)
    assert info.value.code == "model_not_found"


# -- tools and structured output: through chat, once chat takes them -----------------------------------------


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    resp = create(
        client,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_output_tokens=60,
    )
    calls = [item for item in resp.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    assert resp.tools[0].name == "get_weather" and resp.tool_choice == "required"
    answer = create(
        client,
        previous_response_id=resp.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 C"}],
        tools=[WEATHER_TOOL],
        max_output_tokens=40,
    )
    assert answer.output_text
    listed = client.responses.input_items.list(answer.id, order="asc").data
    assert [item.type for item in listed][-2:] == ["function_call", "function_call_output"]


def test_function_call_streamed(client: openai.OpenAI) -> None:
    events = list(
        create(
            client,
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_output_tokens=60,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments)["city"]
    assert events[-1].type == "response.completed"


def test_json_schema_output(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    resp = create(
        client,
        input="Name a city in France.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
        max_output_tokens=60,
    )
    place = json.loads(resp.output_text)
    assert set(place) == {"city", "country"}
    assert resp.text.format.type == "json_schema"


def test_json_object_output(client: openai.OpenAI) -> None:
    resp = create(
        client,
        input="Give a JSON object with a key 'a'.",
        text={"format": {"type": "json_object"}},
        max_output_tokens=40,
    )
    if resp.status == "completed":  # an open object may run to the limit with the tiny model
        assert isinstance(json.loads(resp.output_text), dict)
    else:
        assert resp.incomplete_details is not None and resp.output_text.startswith("{")
