"""pydantic-ai's typed agent output over its OpenAI chat model: tool output (the default) and native output."""

from __future__ import annotations

from typing import Any

import pytest

pydantic_ai = pytest.importorskip("pydantic_ai")
pytest.importorskip("pydantic_ai.models.openai")  # the `openai` extra

from pydantic_ai import Agent  # noqa: E402
from pydantic_ai.messages import ModelResponse, ToolCallPart  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402

from tests.acceptance.conftest import API_KEY, MAX_TOKENS, MODEL, PERSON_PROMPT, TEST_TIMEOUT, Person  # noqa: E402

try:
    from pydantic_ai.models.openai import OpenAIChatModel as ChatModel
except ImportError:  # pydantic-ai before 1.0
    from pydantic_ai.models.openai import OpenAIModel as ChatModel  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)


def agent(base_url: str, output_type: Any) -> Agent[None, Any]:
    model = ChatModel(MODEL, provider=OpenAIProvider(base_url=base_url, api_key=API_KEY))
    return Agent(
        model,
        output_type=output_type,
        retries=0,  # no second chance: an invalid answer fails the test
        model_settings={"temperature": 0, "max_tokens": MAX_TOKENS, "timeout": 300},
    )


def usage(result: Any) -> Any:
    """The run's usage: a property in pydantic-ai 2, a method before."""
    return result.usage if hasattr(result.usage, "requests") else result.usage()


def test_typed_output_by_tool_call(base_url: str) -> None:
    """The default: the output is a forced call of pydantic-ai's ``final_result`` tool."""
    result = agent(base_url, Person).run_sync(PERSON_PROMPT)
    assert isinstance(result.output, Person)
    responses = [m for m in result.all_messages() if isinstance(m, ModelResponse)]
    assert len(responses) == 1  # one request, no retry
    calls = [p for p in responses[0].parts if isinstance(p, ToolCallPart)]
    assert len(calls) == 1 and calls[0].tool_call_id.startswith("call_")
    assert usage(result).requests == 1 and usage(result).output_tokens > 0


def test_typed_output_native(base_url: str) -> None:
    """``NativeOutput``: ``response_format`` json_schema."""
    native_output = getattr(pydantic_ai, "NativeOutput", None)
    if native_output is None:
        pytest.skip("this pydantic-ai has no NativeOutput")
    result = agent(base_url, native_output(Person)).run_sync(PERSON_PROMPT)
    assert isinstance(result.output, Person)
    assert usage(result).requests == 1
