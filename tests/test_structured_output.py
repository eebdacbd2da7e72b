"""Structured output: ``response_format`` json_object and json_schema, by constrained decoding.

The default model is tiny: what is tested is that every answer parses and validates against its
schema (the constraint's guarantee), that the official client's ``parse`` helper works, that
batched constrained answers equal solo ones, and that a schema the engine cannot take is a 400.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

from appliance.scheduler import Scheduler
from tests.conftest import DEFAULT_MODEL, scheduler_and_client

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "country": {"type": "string", "enum": ["France", "Spain", "Italy"]},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "country", "population", "capital"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 12},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 999},
                    },
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
                "maxItems": 3,
            },
            "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
        },
        "required": ["items", "note"],
    },
    {
        "type": "object",
        "properties": {
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "maxLength": 40},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "zip"],
            }
        },
        "required": ["address"],
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 5}},
        "required": ["tags"],
    },
]
PROMPTS = [
    "Describe a person as JSON.",
    "Give me a city as JSON.",
    'Write "quotes", back\\slashes and a newline in JSON.',
    "Answer in JSON: an order.",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Scheduler, OpenAI]]:
    with scheduler_and_client(tmp_path_factory.mktemp("home")) as pair:
        yield pair


@pytest.fixture(scope="module")
def client(served: tuple[Scheduler, OpenAI]) -> OpenAI:
    return served[1]


def ask(client: OpenAI, prompt: str, response_format: dict[str, Any], **kw: Any) -> str:
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": prompt}],
        response_format=response_format,  # type: ignore[arg-type]
        max_tokens=kw.pop("max_tokens", 200),
        **kw,
    )
    assert answer.choices[0].finish_reason == "stop", answer  # the grammar ended the answer, not the limit
    return answer.choices[0].message.content or ""


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"schema{i}" for i in range(len(SCHEMAS))])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_every_answer_parses_and_validates(client: OpenAI, schema: dict[str, Any], temperature: float) -> None:
    for i, prompt in enumerate(PROMPTS):
        text = ask(client, prompt, schema_format(schema), temperature=temperature, seed=i)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_is_any_object(client: OpenAI) -> None:
    """An open object lets the tiny model nest keys until ``max_tokens`` (then ``length``, as OpenAI
    says too); every answer that ended by itself is a JSON object."""
    finished = 0
    for prompt in PROMPTS:
        answer = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_object"},
            max_tokens=120,
            temperature=0,
        )
        choice = answer.choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(choice.message.content or ""), dict)
        else:
            assert choice.finish_reason == "length"
            assert (choice.message.content or "").startswith("{")
    assert finished


class City(BaseModel):
    # bounded: the tiny model otherwise writes digits or letters until max_tokens
    name: str = Field(max_length=30)
    country: Literal["France", "Spain"]
    population: int = Field(ge=0, le=10**8)


def test_the_official_parse_helper_returns_the_pydantic_model(client: OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Paris, as JSON."}],
        response_format=City,
        max_tokens=120,
        temperature=0,
    )
    city = completion.choices[0].message.parsed
    assert isinstance(city, City)


def test_streamed_constrained_answer_equals_the_whole_one(client: OpenAI) -> None:
    fmt = schema_format(SCHEMAS[1])
    whole = ask(client, PROMPTS[1], fmt, temperature=0)
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": PROMPTS[1]}],
        response_format=fmt,  # type: ignore[arg-type]
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_batched_constrained_answers_equal_solo_ones(client: OpenAI) -> None:
    jobs = [(p, schema_format(SCHEMAS[i % len(SCHEMAS)])) for i, p in enumerate(PROMPTS)]
    solo = [ask(client, p, f, temperature=0) for p, f in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(client, job[0], job[1], temperature=0), jobs))
    assert together == solo


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(client: OpenAI) -> None:
    def plain() -> str:
        answer = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0
        )
        return answer.choices[0].message.content or ""

    alone = plain()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        constrained = [pool.submit(ask, client, p, schema_format(SCHEMAS[0]), temperature=0) for p in PROMPTS[:2]]
        beside = pool.submit(plain)
        assert beside.result() == alone
        for future in constrained:
            json.loads(future.result())


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/nope"}}}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_a_format_that_cannot_be_honoured_is_400(client: OpenAI, response_format: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        ask(client, "x", response_format)
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == param, body
