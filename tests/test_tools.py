"""Tool calling through the official client, with the real default model (generic format).

The model is tiny: what is tested is the protocol (calls, ids, finish reasons, stream deltas,
history) and the constraint's guarantee (a forced call always parses and its arguments validate
against the function's schema), not that the model picks the wise function.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import llguidance
import pytest
from openai import OpenAI

from appliance.scheduler import Scheduler
from appliance.tools import GENERIC, HERMES, LLAMA3, ToolCallStream, ToolRequest, detect_format, grammar, split_answer
from engines.base import ChatMessage
from engines.chat_template import ChatTemplate
from tests.conftest import DEFAULT_MODEL, scheduler_and_client

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}
ADD = {
    "name": "add",
    "description": "Add two integers",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer", "maximum": 10**6}, "b": {"type": "integer", "maximum": 10**6}},
        "required": ["a", "b"],
    },
}
ORDER = {
    "name": "place_order",
    "description": "Order items",
    "parameters": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "string", "maxLength": 20},
                "minItems": 1,
                "maxItems": 3,
            },
            "express": {"type": "boolean"},
            "note": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
        },
        "required": ["items", "express", "note"],
    },
}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, ADD, ORDER)]
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, ADD, ORDER)}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Scheduler, OpenAI]]:
    with scheduler_and_client(tmp_path_factory.mktemp("home")) as pair:
        yield pair


@pytest.fixture(scope="module")
def client(served: tuple[Scheduler, OpenAI]) -> OpenAI:
    return served[1]


def call(client: OpenAI, **kw: Any) -> Any:
    params: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": QUESTION,
        "tools": TOOLS,
        "max_tokens": 120,
        "temperature": 0,
    }
    return client.chat.completions.create(**{**params, **kw})


def check_calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every call names a tool and its arguments validate; returns (name, arguments)."""
    out = []
    for tool_call in message.tool_calls or []:
        assert tool_call.id.startswith("call_") and tool_call.type == "function"
        arguments = json.loads(tool_call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[tool_call.function.name])
        assert set(arguments) <= set(SCHEMAS[tool_call.function.name]["properties"])  # only declared ones
        out.append((tool_call.function.name, arguments))
    return out


def test_required_gives_a_call_that_validates(client: OpenAI) -> None:
    answer = call(client, tool_choice="required", parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(check_calls(choice.message)) == 1


def test_parallel_calls_only_when_asked(client: OpenAI) -> None:
    one = call(client, tool_choice="required").choices[0]
    assert one.finish_reason == "tool_calls" and len(check_calls(one.message)) == 1
    several = call(client, tool_choice="required", parallel_tool_calls=True, max_tokens=200).choices[0]
    calls = check_calls(several.message)
    assert 1 <= len(calls) <= 8 and len({c.id for c in several.message.tool_calls or []}) == len(calls)


def test_a_named_function_is_the_one_called(client: OpenAI) -> None:
    answer = call(client, tool_choice={"type": "function", "function": {"name": "add"}})
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = check_calls(choice.message)
    assert [name for name, _ in calls] == ["add"]


def test_auto_answers_text_or_valid_calls(client: OpenAI) -> None:
    for prompt in ("What is the weather in Paris?", "Add 2 and 3.", "Hello, who are you?"):
        choice = call(client, messages=[{"role": "user", "content": prompt}], tool_choice="auto").choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            check_calls(choice.message)
        else:
            assert choice.message.content and not choice.message.content.lstrip().startswith("<tool_call>")


def test_none_never_calls(client: OpenAI) -> None:
    choice = call(client, tool_choice="none", max_tokens=30).choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("temperature", [0.7, 1.2])
def test_sampled_forced_calls_always_validate(client: OpenAI, temperature: float) -> None:
    prompts = ["Weather in Rome in f?", "Add 40 and 2", "Order two apples, fast", "Do something useful."]
    for seed, prompt in enumerate(prompts * 2):
        choice = call(
            client,
            messages=[{"role": "user", "content": prompt}],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=temperature,
            seed=seed,
        ).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(check_calls(choice.message)) == 1


def test_streamed_calls_equal_the_whole_answer(client: OpenAI) -> None:
    whole = call(client, tool_choice="required", parallel_tool_calls=False).choices[0].message.tool_calls
    stream = call(client, tool_choice="required", parallel_tool_calls=False, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": ""})
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function and delta.function.name) or ""
            entry["arguments"] += (delta.function and delta.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole or []
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_the_history_may_carry_calls_and_results(client: OpenAI) -> None:
    messages = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    answer = call(client, messages=messages, tool_choice="none", max_tokens=40)
    assert answer.choices[0].message.content
    # the call and its result are in the prompt: it is longer than the question alone
    alone = call(client, tool_choice="none", max_tokens=1)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 15


def test_batched_tool_answers_equal_solo_ones(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without flash attention: with it, a prompt over 256 tokens (the tools make this one 366) served from the
    prefix cache while other requests run can end differently at a near tie (docs/batching.md, Determinism)."""
    prompts = ["Weather in Oslo?", "Add 1 and 2.", "Order a pen.", "Weather in Lima, in c."]
    with scheduler_and_client(tmp_path_factory.mktemp("home"), flash_attn=False) as (_, client):
        answers_equal_solo(client, prompts)


def answers_equal_solo(client: OpenAI, prompts: list[str]) -> None:

    def ask(prompt: str) -> list[tuple[str, str]]:
        message = (
            call(
                client,
                messages=[{"role": "user", "content": prompt}],
                tool_choice="required",
                parallel_tool_calls=False,
            )
            .choices[0]
            .message
        )
        return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]

    solo = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == solo


# -- formats, fast (no model) ------------------------------------------------------------------

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "\nReturn calls in <tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
LLAMA3_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}"
LLAMA3_TEMPLATE += "{% if m.tool_calls %}<|python_tag|>{% endif %}{% endfor %}"


def test_formats_are_detected_from_the_template() -> None:
    assert detect_format(HERMES_TEMPLATE) is HERMES
    assert detect_format(LLAMA3_TEMPLATE + "ipython") is LLAMA3
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}") is GENERIC


def test_a_native_template_renders_the_tools_and_calls_itself() -> None:
    history = (
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", "", ({"type": "function", "function": {"name": "get_weather", "arguments": {}}},)),
    )
    text = ChatTemplate(HERMES_TEMPLATE).render(history, tools=[{"type": "function", "function": WEATHER}])
    assert '"name": "get_weather"' in text and "<tools>" in text and "<tool_call>" in text


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, GENERIC])
@pytest.mark.parametrize("choice", ["auto", "required", "add"])
def test_every_format_and_choice_gives_a_valid_grammar(fmt: Any, choice: str) -> None:
    request = ToolRequest((WEATHER, ADD), choice)
    built = grammar(request, fmt)
    assert built is not None
    text = llguidance.LLMatcher.grammar_from_lark(built.source)
    assert llguidance.LLMatcher.validate_grammar(text) == ""


def test_markers_that_are_special_tokens_are_written_as_tokens() -> None:
    """Qwen's <tool_call> is one added token: the grammar must let the model emit that token."""
    built = grammar(ToolRequest((ADD,), "required"), HERMES, None, {"<tool_call>": 151657, "</tool_call>": 151658})
    assert built is not None
    assert 'call: <[151657]> "\\n" body "\\n" <[151658]>' in built.source
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(built.source)) == ""


def test_the_call_stream_splits_content_from_calls() -> None:
    stream = ToolCallStream(GENERIC)
    pieces = [
        '<tool_call>\n{"name":"add","argu',
        'ments":{"a":1,"b":2}}\n</tool_call>',
        '\n<tool_call>\n{"name":"add",',
    ]
    found = [stream.feed(p) for p in pieces]
    assert (
        found[0] == ("", [])
        and found[1][1][0].name == "add"
        and json.loads(found[1][1][0].arguments) == {"a": 1, "b": 2}
    )
    rest, calls = stream.finish()
    assert calls == [] and rest.startswith("<tool_call>")  # a call cut short is shown as content
    assert split_answer("Hello <tool_call> there", GENERIC) == ("Hello <tool_call> there", [])
    content, calls = split_answer('{"name": "add", "parameters": {"a": 1}}', LLAMA3)
    assert content is None and calls[0].name == "add" and json.loads(calls[0].arguments) == {"a": 1}
