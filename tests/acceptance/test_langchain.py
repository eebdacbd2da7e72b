"""LangChain's ``ChatOpenAI`` against the live server: tools, structured output (all three methods), streaming."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_openai")

from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import Field

from tests.acceptance.conftest import (
    API_KEY,
    MAX_TOKENS,
    MODEL,
    PERSON_PROMPT,
    TEST_TIMEOUT,
    TIMEOUT,
    WEATHER_PROMPT,
    GetWeather,
    Person,
)

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)


@tool
def add(a: int = Field(ge=0, le=1000), b: int = Field(ge=0, le=1000)) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture
def chat(base_url: str) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=base_url,
        api_key=API_KEY,  # type: ignore[arg-type]
        model=MODEL,
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        timeout=TIMEOUT,
        max_retries=0,
        stream_usage=True,
    )


def check_call(message: AIMessage, name: str) -> dict[str, Any]:
    """One call of ``name`` with an OpenAI call id, as the answer's only content; its arguments."""
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.invalid_tool_calls == []
    assert [call["name"] for call in message.tool_calls] == [name]
    assert (message.tool_calls[0]["id"] or "").startswith("call_")
    return message.tool_calls[0]["args"]


def test_bind_tools_pydantic_named_choice(chat: ChatOpenAI) -> None:
    answer = chat.bind_tools([GetWeather], tool_choice="GetWeather").invoke(WEATHER_PROMPT)
    assert isinstance(answer, AIMessage)
    GetWeather.model_validate(check_call(answer, "GetWeather"))
    assert answer.usage_metadata and answer.usage_metadata["output_tokens"] > 0


def test_bind_tools_tool_function_round_trip(chat: ChatOpenAI) -> None:
    """A forced call of a ``@tool`` function, run, and its result sent back in the history."""
    question = HumanMessage("Add 2 and 3.")
    call = chat.bind_tools([add], tool_choice="required").invoke([question])
    assert isinstance(call, AIMessage)
    arguments = check_call(call, "add")
    assert set(arguments) == {"a", "b"} and all(0 <= v <= 1000 for v in arguments.values())
    result = add.invoke(call.tool_calls[0])  # LangChain's ToolMessage for the call
    assert isinstance(result, ToolMessage) and result.content == str(arguments["a"] + arguments["b"])
    # the history (assistant tool_calls, then a tool message) is accepted; "none" makes the tiny model answer
    final = chat.bind_tools([add], tool_choice="none").invoke([question, call, result])
    assert isinstance(final, AIMessage)
    assert final.tool_calls == [] and isinstance(final.content, str) and final.content
    assert final.response_metadata["finish_reason"] in ("stop", "length")
    # the call and its result reached the prompt: it is longer than the question alone
    alone = chat.bind_tools([add], tool_choice="none").invoke([question])
    assert final.usage_metadata and alone.usage_metadata
    assert final.usage_metadata["input_tokens"] > alone.usage_metadata["input_tokens"] + 15


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat: ChatOpenAI, method: str) -> None:
    structured = chat.with_structured_output(Person, method=method, include_raw=True)  # type: ignore[arg-type]
    result = structured.invoke(PERSON_PROMPT)
    assert isinstance(result, dict)
    assert result["parsing_error"] is None
    assert isinstance(result["parsed"], Person)
    raw = result["raw"]
    assert isinstance(raw, AIMessage)
    if method == "function_calling":  # LangChain forces the schema's tool
        check_call(raw, "Person")
    else:
        assert raw.response_metadata["finish_reason"] == "stop"


def test_with_structured_output_json_mode(chat: ChatOpenAI) -> None:
    """``json_mode`` sends only ``{"type": "json_object"}``: the prompt says which keys, LangChain validates."""
    structured = chat.with_structured_output(Person, method="json_mode")
    person = structured.invoke('Reply with a JSON object like {"name": "Bob", "age": 30} describing a person.')
    assert isinstance(person, Person)
    as_dict = chat.with_structured_output(method="json_mode").invoke(
        'Describe a person as a JSON object with the keys "name" and "age".'
    )
    assert isinstance(as_dict, dict)


def test_stream_text(chat: ChatOpenAI) -> None:
    chunks = list(chat.stream("Say hello."))
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole.content, str) and whole.content
    assert whole.response_metadata["finish_reason"] in ("stop", "length")
    assert whole.usage_metadata and 0 < whole.usage_metadata["output_tokens"] <= MAX_TOKENS
    # the same answer as the whole request
    assert whole.content == chat.invoke("Say hello.").content


def test_stream_tool_call(chat: ChatOpenAI) -> None:
    chunks = list(chat.bind_tools([GetWeather], tool_choice="GetWeather").stream(WEATHER_PROMPT))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole, AIMessageChunk)
    GetWeather.model_validate(check_call(whole, "GetWeather"))
