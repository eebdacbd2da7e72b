"""litellm's ``openai/`` provider against the live server: embeddings, chat with tools, streaming."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest

# litellm fetches its model price list from the network at import; CI has none (and needs none)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

from openai import OpenAI  # noqa: E402

from tests.acceptance.conftest import (  # noqa: E402
    API_KEY,
    MAX_TOKENS,
    MODEL,
    TEST_TIMEOUT,
    TIMEOUT,
    WEATHER_PROMPT,
    GetWeather,
)

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Quantum chromodynamics"]


@pytest.fixture
def embedding_model(base_url: str) -> str:
    """The model to embed with: the first embedding model of the registry (the built-in one on a fresh
    install), as ``/v1/appliance/models`` lists them; ``/v1/models`` lists the chat models."""
    registered = httpx.get(base_url + "/appliance/models", timeout=30).json()["data"]
    model = next((m["id"] for m in registered if m.get("kind") == "embedding"), MODEL)
    return model


def check_vectors(data: list[Any], count: int) -> list[list[float]]:
    vectors = [item["embedding"] if isinstance(item, dict) else item.embedding for item in data]
    indexes = [item["index"] if isinstance(item, dict) else item.index for item in data]
    assert indexes == list(range(count))
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 0
    assert all(isinstance(x, float) for v in vectors for x in v)
    assert vectors[0] != vectors[1]
    return vectors


def test_litellm_embedding(base_url: str, embedding_model: str) -> None:
    response = litellm.embedding(
        model=f"openai/{embedding_model}", api_base=base_url, api_key=API_KEY, input=TEXTS, timeout=TIMEOUT
    )
    check_vectors(response.data, len(TEXTS))
    assert response.usage.prompt_tokens > len(TEXTS)


def test_openai_sdk_embedding_base64(base_url: str, embedding_model: str) -> None:
    """The official SDK asks for ``encoding_format: "base64"`` unless told otherwise, and decodes it."""
    client = OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)
    default = client.embeddings.create(model=embedding_model, input=TEXTS)
    floats = client.embeddings.create(model=embedding_model, input=TEXTS, encoding_format="float")
    assert check_vectors(default.data, len(TEXTS)) == check_vectors(floats.data, len(TEXTS))


def test_completion_with_forced_tool(base_url: str) -> None:
    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key=API_KEY,
        messages=[{"role": "user", "content": WEATHER_PROMPT}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": GetWeather.__doc__,
                    "parameters": GetWeather.model_json_schema(),
                },
            }
        ],
        tool_choice="required",
        temperature=0,
        max_tokens=MAX_TOKENS,
        timeout=TIMEOUT,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    GetWeather.model_validate(json.loads(call.function.arguments))
    assert response.usage.completion_tokens > 0


def test_completion_stream(base_url: str) -> None:
    chunks = list(
        litellm.completion(
            model=f"openai/{MODEL}",
            api_base=base_url,
            api_key=API_KEY,
            messages=[{"role": "user", "content": "Say hello."}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            timeout=TIMEOUT,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes[-1] in ("stop", "length")
