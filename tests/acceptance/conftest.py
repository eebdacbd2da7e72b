"""The client acceptance tier: third-party OpenAI clients against a real server with the real default model.

Each module drives one client library (LangChain, instructor, ``llm``, litellm, pydantic-ai, the
official SDK's helpers) the way its users do, against the shared live server of ``tests/conftest.py``
(a subprocess with 4 slots). A module whose client is not installed is skipped
(``pytest.importorskip``).

The default model is tiny: what is tested is that the protocol is right (the client sends what the
server takes, and reads what it answers) and that the output is valid (it parses and validates
against the schema the client asked for), not that the answer is wise. So every schema bounds its
fields (``maxLength``, ``maximum``, ``maxItems``: the tiny model loops on an unbounded string until
the token limit), every request is at temperature 0 with a small token limit, and tool calls are
forced with ``tool_choice`` where the client allows it (in ``auto`` the tiny model answers in text).
"""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.conftest import DEFAULT_MODEL, LiveServer

MODEL = DEFAULT_MODEL
TIMEOUT = 300  # seconds for one HTTP request: a 2-core CI box runs other live tests beside these
MAX_TOKENS = 80
API_KEY = "unused-on-localhost"
# per test (pytest-timeout): a test makes a few requests, and a constrained one can take a minute on
# a loaded 2-core box
TEST_TIMEOUT = 600


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=30)
    unit: Literal["c", "f"]


PERSON_PROMPT = "Invent a person."
WEATHER_PROMPT = "What is the weather in Paris?"


@pytest.fixture
def base_url(live_server: LiveServer) -> str:
    """The OpenAI base URL of the shared live server."""
    return live_server.base_url + "/v1"
