"""instructor's ``response_model`` over the official client, in TOOLS and JSON_SCHEMA modes."""

from __future__ import annotations

import pytest

instructor = pytest.importorskip("instructor")

from openai import OpenAI  # noqa: E402

from tests.acceptance.conftest import API_KEY, MAX_TOKENS, MODEL, PERSON_PROMPT, TEST_TIMEOUT, TIMEOUT, Person  # noqa: E402

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_response_model(base_url: str, mode: str) -> None:
    client = instructor.from_openai(
        OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT), mode=instructor.Mode[mode]
    )
    person, completion = client.chat.completions.create_with_completion(
        model=MODEL,
        response_model=Person,
        messages=[{"role": "user", "content": PERSON_PROMPT}],
        max_retries=0,  # no second chance: an invalid answer fails the test
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert isinstance(person, Person)
    choice = completion.choices[0]
    if mode == "TOOLS":  # instructor forces its one tool
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls or []] == ["Person"]
    else:
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None
