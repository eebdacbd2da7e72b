"""The official SDK's pydantic helpers: ``chat.completions.parse`` (response_format and strict tools),
``chat.completions.stream``, ``responses.parse``."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

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


@pytest.fixture
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


def test_chat_parse_response_format(client: OpenAI) -> None:
    answer = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": PERSON_PROMPT}],
        response_format=Person,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person) and message.refusal is None


def test_chat_parse_strict_tool(client: OpenAI) -> None:
    """``pydantic_function_tool`` sends a strict function; ``parse`` validates the call's arguments."""
    answer = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": WEATHER_PROMPT}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_chat_stream_helper(client: OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": PERSON_PROMPT}],
        response_format=Person,
        max_tokens=MAX_TOKENS,
        temperature=0,
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1
    assert isinstance(final.choices[0].message.parsed, Person)
    assert "".join(deltas) == final.choices[0].message.content


def test_responses_parse(client: OpenAI) -> None:
    if not hasattr(client.responses, "parse"):
        pytest.skip("this openai SDK has no responses.parse")
    response = client.responses.parse(
        model=MODEL, input=PERSON_PROMPT, text_format=Person, max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Person)


def test_responses_stream_helper(client: OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input=PERSON_PROMPT, text_format=Person, max_output_tokens=MAX_TOKENS, temperature=0
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    assert isinstance(final.output_parsed, Person)
