"""Tool (function) calling for any model: the prompt, the output constraint, and parsing the calls.

A model whose chat template renders tools gets them its own way and answers in the format it was
trained on: Hermes/Qwen's ``<tool_call>{json}</tool_call>`` or Llama 3.x's bare JSON object. Any
other model (SmolLM2, Gemma, Mistral's token-based format...) gets the generic format: the tools
described in a system message and Hermes-style calls, which small models follow well.

Whatever the format, the answer is constrained (``appliance/constraints.py``): with
``tool_choice`` "required" or a named function the output can only be calls whose arguments match
the function's JSON schema, so a forced call always parses and validates; with "auto" it is either
plain text (or the ``response_format`` answer) or such calls, decided by the model's first token.
Nothing here knows HTTP or an engine: it works on messages, text and grammars.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.constraints import Grammar, closed, json_options
from engines.base import ChatMessage

MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls: each call is ``opener + {"name":..., args_key: {...}} + closer``."""

    name: str
    opener: str
    closer: str
    args_key: str = "arguments"
    native: bool = False  # the chat template renders the tools and the calls itself
    max_calls: int = MAX_PARALLEL_CALLS

    @property
    def first_char(self) -> str:
        return (self.opener or "{")[0]


HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", native=True)
LLAMA3 = ToolFormat("llama3", "", "", args_key="parameters", native=True, max_calls=1)
GENERIC = ToolFormat("generic", "<tool_call>\n", "\n</tool_call>")


def detect_format(template: str) -> ToolFormat:
    """The tool format a chat template was written for; the generic one if it knows none."""
    if "tools" not in template or "tool_calls" not in template:
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return GENERIC  # e.g. Mistral's [TOOL_CALLS] token format: not yet spoken natively


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools: OpenAI function definitions, the choice, and whether calls may be several."""

    functions: tuple[dict[str, Any], ...]  # {"name", "description"?, "parameters"?, "strict"?}
    choice: str = "auto"  # "auto", "required", "none", or a function's name
    parallel: bool = True

    def definitions(self) -> list[dict[str, Any]]:
        """As chat templates (and OpenAI) list them."""
        return [{"type": "function", "function": f} for f in self.functions]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _system_prompt(request: ToolRequest, fmt: ToolFormat) -> str:
    lines = [
        "You can call functions to help answer. The functions, one JSON object per line:",
        *(json.dumps(f, ensure_ascii=False) for f in request.functions),
        "To call a function, answer with:",
        f'{fmt.opener}{{"name": <function name>, "{fmt.args_key}": <arguments as a JSON object>}}{fmt.closer}',
    ]
    if request.choice == "required":
        lines.append("You must call at least one function now.")
    elif request.choice not in ("auto", "none"):
        lines.append(f"You must call the function {request.choice} now.")
    else:
        lines.append("Call a function only when it helps; otherwise answer normally.")
    return "\n".join(lines)


def call_text(fmt: ToolFormat, name: str, arguments: Any) -> str:
    """One call as the model writes it (for conversation history in the generic format)."""
    return f"{fmt.opener}{json.dumps({'name': name, fmt.args_key: arguments}, ensure_ascii=False)}{fmt.closer}"


def prompt_messages(
    messages: Sequence[ChatMessage], request: ToolRequest | None, fmt: ToolFormat
) -> tuple[list[ChatMessage], list[dict[str, Any]]]:
    """The conversation and the tool list to render: native templates get both as they are; the
    generic format gets the tools in a system message and the calls and results as text."""
    offered = request is not None and request.choice != "none"
    if fmt.native:
        return list(messages), request.definitions() if offered and request is not None else []
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = [call_text(fmt, c["function"]["name"], c["function"]["arguments"]) for c in m.tool_calls]
            text = "\n".join([m.content, *calls] if m.content else calls)
            out.append(ChatMessage("assistant", text))
        elif m.role == "tool":
            out.append(ChatMessage("user", f"<tool_response>\n{m.content}\n</tool_response>"))
        else:
            out.append(replace(m, tool_calls=(), tool_call_id=None, name=None))
    if offered and request is not None:
        prompt = _system_prompt(request, fmt)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{prompt}")
        else:
            out.insert(0, ChatMessage("system", prompt))
    return out, []


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def _literal(text: str, specials: Mapping[str, int]) -> str:
    """``text`` in Lark; a marker that is one special token of the model (Qwen's ``<tool_call>``) is
    that token (``<[id]>``): spelled with ordinary tokens it is text the model never writes."""
    marker = text.strip()
    if marker and marker in specials:
        before, _, after = text.partition(marker)
        parts = [_lark_string(before)] if before else []
        parts.append(f"<[{specials[marker]}]>")
        if after:
            parts.append(_lark_string(after))
        return " ".join(parts)
    return _lark_string(text)


def markers(fmt: ToolFormat) -> tuple[str, ...]:
    """The call markers that may be special tokens of a model (``special_tokens`` looks them up)."""
    return tuple(m for m in (fmt.opener.strip(), fmt.closer.strip()) if m)


def grammar(
    request: ToolRequest, fmt: ToolFormat, answer: Grammar | None = None, specials: Mapping[str, int] | None = None
) -> Grammar | None:
    """The constraint of a request with tools: calls only (required, named), or text/answer or
    calls (auto); None for "none" (unconstrained, or just ``answer``). ``specials``: the format's
    markers that are single special tokens of the model, with their ids."""
    specials = specials or {}
    if request.choice == "none":
        return answer
    chosen = [f for f in request.functions if request.choice in ("auto", "required") or f["name"] == request.choice]
    variants = [
        {
            "type": "object",
            # closed: a function gets only the parameters it declares (strict or not)
            "properties": {"name": {"const": f["name"]}, fmt.args_key: closed(_parameters(f))},
            "required": ["name", fmt.args_key],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    body: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    strict = all(f.get("strict", False) for f in chosen)
    body["x-guidance"] = json_options(strict)
    n = fmt.max_calls if request.parallel and request.choice in ("auto", "required") else 1
    calls = "call"
    for _ in range(n - 1):  # call ("\n" call ("\n" call)?)? ...: at most n calls
        calls = f'call ("\\n" {calls})?'
    rules = [
        f"calls: {calls}",
        f"call: {_literal(fmt.opener, specials)} body {_literal(fmt.closer, specials)}"
        if fmt.opener or fmt.closer
        else "call: body",
        f"body: %json {json.dumps(body, ensure_ascii=False)}",
    ]
    if request.choice == "auto":
        if answer is not None and answer.kind == "json_schema":
            schema = dict(json.loads(answer.source), **{"x-guidance": json_options(answer.strict)})
            rules.insert(0, f"answer: %json {json.dumps(schema, ensure_ascii=False)}")
            start = "start: answer | calls"
        else:
            # plain text: anything that does not start like a call (the first character decides)
            first = re.escape(fmt.first_char)
            rules.insert(0, f"TEXT: /[^{first}\\s][\\s\\S]*/")
            start = "start: TEXT | calls"
    else:
        start = "start: calls"
    return Grammar("lark", "\n".join([start, *rules]), strict=strict, param="tools")


@dataclass
class ToolCallStream:
    """Splits a generated answer into content and tool calls as its text arrives.

    The constraint makes the first non-space character decide: a call opener means calls, anything
    else plain content, passed on at once. Calls are handed over whole, each as soon as it closes.
    """

    fmt: ToolFormat
    _buffer: str = ""
    _mode: str = "undecided"  # "content", "calls"
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content to pass on now, and calls completed by this piece."""
        self._buffer += text
        if self._mode == "undecided":
            stripped = self._buffer.lstrip()
            if not stripped:
                return "", []
            self._mode = "calls" if stripped.startswith(self.fmt.first_char) else "content"
        if self._mode == "content":
            out, self._buffer = self._buffer, ""
            return out, []
        return "", self._complete_calls(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left at the end: content not yet passed on, or the last calls."""
        if self._mode == "calls":
            calls = self._complete_calls(final=True)
            rest, self._buffer = self._buffer.strip(), ""
            return rest, calls  # rest: a call cut short (max_tokens), shown as content
        out, self._buffer = self._buffer, ""
        return out, []

    def _complete_calls(self, *, final: bool) -> list[ToolCall]:
        found: list[ToolCall] = []
        while True:
            text = self._buffer.lstrip()
            if self.fmt.closer:
                end = text.find(self.fmt.closer.strip())
                if end < 0:
                    break
                piece, rest = text[:end], text[end + len(self.fmt.closer.strip()) :]
            elif final and text:
                piece, rest = text, ""
            else:
                break
            call = _parse_call(piece.strip().removeprefix(self.fmt.opener.strip()).strip(), self.fmt)
            if call is None:
                break
            found.append(call)
            self._buffer = rest
        self.calls.extend(found)
        return found


def _parse_call(text: str, fmt: ToolFormat) -> ToolCall | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(fmt.args_key, value.get("arguments", {}))
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def split_answer(text: str, fmt: ToolFormat) -> tuple[str | None, list[ToolCall]]:
    """A whole answer as (content, calls); content is None when the answer is only calls."""
    stream = ToolCallStream(fmt)
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    content += rest
    calls += more
    return (content or None) if calls else content, calls
