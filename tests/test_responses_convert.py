"""The Responses -> chat translation and the output items, as pure functions (no model, no server)."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.api import convert
from appliance.api.errors import APIError
from appliance.api.responses_convert import (
    ToolCall,
    input_items,
    outcome,
    remap_param,
    response_object,
    translate,
    usage,
)
from appliance.api.responses_protocol import ResponseCreateRequest, ResponseFunctionToolCall, ResponseOutputMessage
from appliance.generation import FinishEvent

MODEL = "m"


def request(**fields: Any) -> ResponseCreateRequest:
    return ResponseCreateRequest.model_validate({"model": MODEL, "input": "Hi", **fields})


def refused(param: str, code: str | None = None, **fields: Any) -> APIError:
    with pytest.raises(APIError) as info:
        translate(request(**fields))
    assert info.value.status == 400
    assert info.value.detail.param == param, info.value.detail
    if code is not None:
        assert info.value.detail.code == code
    return info.value


def chat_messages(**fields: Any) -> list[dict[str, Any]]:
    chat = translate(request(**fields)).chat
    return [m.model_dump(exclude_none=True) for m in chat.messages]


def test_string_input_is_one_user_message() -> None:
    t = translate(request(input="Hello there"))
    assert [m.model_dump(exclude_none=True) for m in t.chat.messages] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}
    ]
    [item] = t.items
    assert item["id"].startswith("msg_")
    assert item | {"id": None} == {
        "id": None,
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_text", "text": "Hello there"}],
    }


def test_instructions_come_first_as_system() -> None:
    messages = chat_messages(instructions="Be terse.", input=[{"role": "developer", "content": "Use French."}])
    assert (messages[0]["role"], messages[0]["content"]) == ("system", "Be terse.")
    assert messages[1]["role"] == "developer"  # chat maps developer to system itself


def test_sampling_and_limits_map_to_chat_fields() -> None:
    chat = translate(request(max_output_tokens=7, temperature=0.2, top_p=0.5, user="u1")).chat
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p, chat.user) == (7, 0.2, 0.5, "u1")
    internal = convert.chat_request(chat)
    assert internal.max_tokens == 7
    assert internal.sampling == {"temperature": 0.2, "top_p": 0.5}


def test_message_parts_and_roles() -> None:
    messages = chat_messages(
        input=[
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "c", "annotations": []}]},
            {"role": "system", "content": "d"},
        ]
    )
    assert [(m["role"], [p["text"] for p in m["content"]]) for m in messages] == [
        ("user", ["a", "b"]),
        ("assistant", ["c"]),
        ("system", ["d"]),
    ]
    assert (
        convert.chat_request(
            translate(
                request(
                    input=[
                        {
                            "role": "user",
                            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
                        }
                    ]
                )
            ).chat
        )
        .messages[0]
        .content
        == "a\nb"
    )


def test_function_calls_become_assistant_tool_calls_and_tool_messages() -> None:
    messages = chat_messages(
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        ]
    )
    assert messages[1] == {
        "role": "assistant",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
        ],
    }
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert messages[3] == {"role": "tool", "content": "rain", "tool_call_id": "c2"}


def test_a_function_call_after_assistant_text_joins_that_message() -> None:
    messages = chat_messages(
        input=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "Let me look."},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        ]
    )
    assert len(messages) == 2
    assert messages[1]["content"] == [{"type": "text", "text": "Let me look."}]
    assert messages[1]["tool_calls"][0]["id"] == "c1"


def test_history_comes_before_the_input_and_its_instructions_are_not_carried() -> None:
    history = [
        *input_items(request(input="first")),
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "answer", "annotations": [], "logprobs": []}],
        },
    ]
    t = translate(request(input="second", previous_response_id="resp_1", instructions="new"), history)
    texts = [(m.role, m.content[0].text if isinstance(m.content, list) else m.content) for m in t.chat.messages]
    assert texts == [("system", "new"), ("user", "first"), ("assistant", "answer"), ("user", "second")]
    assert len(t.items) == 1  # only its own input is its input


def test_tools_are_nested_for_chat_and_echoed_flat() -> None:
    tool = {"type": "function", "name": "weather", "description": "Weather now", "parameters": {"type": "object"}}
    t = translate(request(tools=[tool], tool_choice={"type": "function", "name": "weather"}, parallel_tool_calls=False))
    assert t.chat.tools == [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather now", "parameters": {"type": "object"}},
        }
    ]
    assert t.chat.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert t.chat.parallel_tool_calls is False
    assert t.tools == [tool | {"strict": None}]
    assert t.tool_choice == {"type": "function", "name": "weather"}
    assert translate(request(tools=[tool], tool_choice="required")).chat.tool_choice == "required"


def test_no_tools_means_no_tool_fields_for_chat() -> None:
    t = translate(request(tool_choice="auto", parallel_tool_calls=True))
    assert t.chat.tools is None and t.chat.tool_choice is None and t.chat.parallel_tool_calls is None
    convert.chat_request(t.chat)  # chat refuses parallel_tool_calls without tools: not sent


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "name": "city", "schema": {"type": "object"}, "strict": True},
            {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True}},
        ),
    ],
)
def test_text_format_becomes_response_format(fmt: dict[str, Any], expected: dict[str, Any] | None) -> None:
    t = translate(request(text={"format": fmt}))
    assert t.chat.response_format == expected
    assert t.text == {"format": fmt, "verbosity": "medium"}


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
        ({"background": True}, "background", "unsupported_parameter"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort", "unsupported_parameter"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary", "unsupported_parameter"),
        ({"include": ["message.output_text.logprobs"]}, "include", "unsupported_parameter"),
        ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
        ({"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
        ({"max_tool_calls": 3}, "max_tool_calls", "unsupported_parameter"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options", None),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", None),
        ({"input": None}, "input", None),
        ({"input": []}, "input", None),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input.0.role", None),
        ({"input": [{"role": "user"}]}, "input.0.content", None),
        ({"input": [{"role": "user", "content": 5}]}, "input.0.content", None),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input.0.content.0.text", None),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 7}]}, "input.0.output", None),
        ({"input": [{"role": "user", "content": "x", "weight": 2}]}, "input.0.weight", "unknown_parameter"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
            "input.0.content.0.type",
            "unsupported_parameter",
        ),
        ({"input": ["x", {"type": "item_reference", "id": "msg_1"}]}, "input.0", None),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "unsupported_parameter"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id", None),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "unsupported_parameter"),
        ({"tools": [{"type": "function"}]}, "tools.0.name", None),
        ({"tools": [{"type": "function", "name": "f", "function": {}}]}, "tools.0.function", "unknown_parameter"),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice", "unsupported_parameter"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice.name",
            None,
        ),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type", None),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", None),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "unsupported_parameter"),
    ],
)
def test_refused_by_name(fields: dict[str, Any], param: str, code: str | None) -> None:
    refused(param, code, **fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"reasoning": {"effort": "none"}},
        {"reasoning": {"effort": None, "summary": None}},
        {"include": ["reasoning.encrypted_content"]},
        {"truncation": "disabled", "background": False, "top_logprobs": 0},
        {"service_tier": "auto", "safety_identifier": "u", "prompt_cache_key": "k", "prompt_cache_retention": "24h"},
        {"stream": True, "stream_options": {"include_obfuscation": False}},
        {"conversation": None},
        {"metadata": {"team": "a"}, "store": False},
    ],
)
def test_fields_that_change_nothing_are_accepted(fields: dict[str, Any]) -> None:
    convert.chat_request(translate(request(**fields)).chat)


def test_chat_errors_are_renamed_to_the_responses_field() -> None:
    t = translate(
        request(
            instructions="x",
            input=[
                {"role": "user", "content": "a"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "r"},
            ],
            tools=[{"type": "function", "name": "f"}],
        )
    )
    table = t.params
    assert remap_param("messages.0.content", table) == "instructions"
    assert remap_param("messages.1.content.0.type", table) == "input.0.content.0.type"
    assert remap_param("messages.2.tool_calls", table) == "input.1"
    assert remap_param("messages.2.tool_calls.0.function.arguments", table) == "input.1.arguments"
    assert remap_param("messages.3.tool_call_id", table) == "input.2.call_id"
    assert remap_param("messages.3.role", table) == "input.2.type"
    assert remap_param("messages", table) == "input"
    assert remap_param("tools.0.function.parameters", table) == "tools.0.parameters"
    assert remap_param("response_format.json_schema.schema", table) == "text.format.schema"
    assert remap_param("max_completion_tokens", table) == "max_output_tokens"
    assert remap_param("temperature", table) == "temperature"
    assert remap_param(None, table) is None
    error = t.remap(APIError(400, "no", param="messages.3.role", code="unsupported_parameter"))
    assert (error.detail.param, error.detail.code, error.status) == ("input.2.type", "unsupported_parameter", 400)


def test_outcome_of_text() -> None:
    done = outcome("Paris.", "stop", message_id="msg_x")
    assert done.status == "completed" and done.incomplete_details is None
    [message] = done.output
    assert isinstance(message, ResponseOutputMessage)
    assert message.model_dump() == {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Paris.", "annotations": [], "logprobs": []}],
    }
    cut = outcome("Once upon", "length")
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"


def test_outcome_of_tool_calls() -> None:
    calls = [ToolCall("call_1", "weather", '{"city":"Paris"}'), ToolCall("call_2", "time", "{}")]
    only_calls = outcome("", "stop", calls)
    assert [type(i) for i in only_calls.output] == [ResponseFunctionToolCall, ResponseFunctionToolCall]
    first = only_calls.output[0]
    assert isinstance(first, ResponseFunctionToolCall)
    assert (first.call_id, first.name, first.arguments, first.status) == (
        "call_1",
        "weather",
        '{"city":"Paris"}',
        "completed",
    )
    assert first.id.startswith("fc_")
    with_text = outcome("Let me check.", "stop", calls[:1])
    assert [i.type for i in with_text.output] == ["message", "function_call"]


def test_response_object_echoes_the_request() -> None:
    body = request(
        instructions="Be brief.",
        max_output_tokens=9,
        metadata={"k": "v"},
        store=False,
        temperature=0.1,
        tools=[{"type": "function", "name": "f"}],
        parallel_tool_calls=False,
    )
    t = translate(body)
    finish = FinishEvent("stop", prompt_tokens=10, completion_tokens=3, cached_tokens=4)
    done = outcome("ok", "stop")
    resp = response_object(
        body,
        t,
        response_id="resp_1",
        created_at=5,
        model=MODEL,
        defaults=(0.7, 0.9),
        status=done.status,
        output=done.output,
        usage=usage(finish),
    )
    data = resp.model_dump(mode="json")
    assert data["object"] == "response" and data["status"] == "completed"
    assert (data["instructions"], data["max_output_tokens"], data["metadata"], data["store"]) == (
        "Be brief.",
        9,
        {"k": "v"},
        False,
    )
    assert (data["temperature"], data["top_p"], data["parallel_tool_calls"]) == (0.1, 0.9, False)
    assert data["tools"] == [{"type": "function", "name": "f", "description": None, "parameters": None, "strict": None}]
    assert data["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 13,
    }


def test_the_official_client_parses_the_response_object() -> None:
    openai_types = pytest.importorskip("openai.types.responses")
    body = request(input="Hi")
    done = outcome("Hello!", "stop")
    resp = response_object(
        body,
        translate(body),
        response_id="resp_1",
        created_at=5,
        model=MODEL,
        defaults=(0.7, 0.9),
        status=done.status,
        output=done.output,
        usage=usage(FinishEvent("stop", 3, 2)),
    )
    parsed = openai_types.Response.model_validate(resp.model_dump(mode="json"))
    assert parsed.output_text == "Hello!"
    assert parsed.usage is not None and parsed.usage.total_tokens == 5
