"""Tool (function) calling for any model: the prompt, the output constraint, and parsing the calls.

A model whose chat template renders tools gets them its own way and answers in the format it was
trained on: Hermes/Qwen's ``<tool_call>{json}</tool_call>``, Llama 3.x's bare JSON object, Mistral's
``[TOOL_CALLS][{json}, ...]`` (v3 tokenizer: Mistral 7B v0.3, Nemo) or ``[TOOL_CALLS]name[ARGS]{json}``
(v11 and later: Small 3.x, Devstral, Ministral). Any other model (SmolLM2, Gemma, ...) gets the
generic format: the tools described in a system message and Hermes-style calls, which small models
follow well.

Whatever the format, the answer is constrained (``appliance/constraints.py``): with
``tool_choice`` "required" or a named function the output can only be calls whose arguments match
the function's JSON schema, so a forced call always parses and validates; with "auto" it is either
plain text (or the ``response_format`` answer) or such calls, decided by the model's first token.
Nothing here knows HTTP or an engine: it works on messages, text and grammars.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.constraints import Grammar, closed, json_options
from engines.base import ChatMessage

MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls: ``start``, the calls joined by ``separator``, then ``end``.

    Each call is ``opener + {"name": ..., args_key: {...}} + closer``; with ``args_marker`` the name
    stands outside the JSON: ``opener + name [+ id_marker + id] + args_marker + {...} + closer``.
    """

    name: str
    opener: str
    closer: str
    args_key: str = "arguments"
    native: bool = False  # the chat template renders the tools and the calls itself
    max_calls: int = MAX_PARALLEL_CALLS
    start: str = ""
    end: str = ""
    separator: str = "\n"
    args_marker: str = ""
    id_marker: str = ""  # the model writes a 9-character call id after the name (Mistral Small 3.2)
    specials: tuple[str, ...] = ()  # markers that may be one special token of the model
    short_ids: bool = False  # the template refuses call ids other than 9 letters or digits (Mistral)

    @property
    def first_char(self) -> str:
        return (self.start or self.opener or "{")[0]


HERMES_MARKERS = ("<tool_call>", "</tool_call>")
HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", native=True, specials=HERMES_MARKERS)
LLAMA3 = ToolFormat("llama3", "", "", args_key="parameters", native=True, max_calls=1)
MISTRAL = ToolFormat(
    "mistral", "", "", native=True, start="[TOOL_CALLS][", end="]", separator=", ", specials=("[TOOL_CALLS]",),
    short_ids=True,
)  # fmt: skip
MISTRAL_V11 = ToolFormat(
    "mistral-v11", "[TOOL_CALLS]", "", native=True, separator="", args_marker="[ARGS]",
    specials=("[TOOL_CALLS]", "[ARGS]"), short_ids=True,
)  # fmt: skip
MISTRAL_V11_IDS = replace(
    MISTRAL_V11, name="mistral-v11-ids", id_marker="[CALL_ID]", specials=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
)
GENERIC = ToolFormat("generic", "<tool_call>\n", "\n</tool_call>", specials=HERMES_MARKERS)


def detect_format(template: str) -> ToolFormat:
    """The tool format a chat template was written for; the generic one if it knows none."""
    if "tools" not in template or "tool_calls" not in template:
        return GENERIC
    if "[TOOL_CALLS]" in template:
        if "[ARGS]" not in template:
            return MISTRAL
        return MISTRAL_V11_IDS if "[CALL_ID]" in template else MISTRAL_V11
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return GENERIC


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
    messages: Sequence[ChatMessage], request: ToolRequest | None, fmt: ToolFormat, *, system_role: bool = True
) -> tuple[list[ChatMessage], list[dict[str, Any]]]:
    """The conversation and the tool list to render: native templates get both as they are; the
    generic format gets the tools in a system message and the calls and results as text. Where the
    template takes no system message (``system_role`` false: Gemma 2), system text goes first in the
    first user message."""
    offered = request is not None and request.choice != "none"
    if fmt.native:
        history = [_with_short_ids(m) for m in messages] if fmt.short_ids else list(messages)
        return history, request.definitions() if offered and request is not None else []
    out: list[ChatMessage] = []
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            calls = [call_text(fmt, c["function"]["name"], c["function"]["arguments"]) for c in m.tool_calls]
            text = "\n".join([m.content, *calls] if m.content else calls)
            out.append(ChatMessage("assistant", text))
        elif m.role == "tool":
            result = f"<tool_response>\n{m.content}\n</tool_response>"
            # the results of parallel calls make one user turn: Gemma's and Mistral's templates refuse
            # two user messages in a row
            if i and messages[i - 1].role == "tool":
                out[-1] = ChatMessage("user", f"{out[-1].content}\n{result}")
            else:
                out.append(ChatMessage("user", result))
        else:
            out.append(replace(m, tool_calls=(), tool_call_id=None, name=None))
    if offered and request is not None:
        prompt = _system_prompt(request, fmt)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{prompt}")
        else:
            out.insert(0, ChatMessage("system", prompt))
    if not system_role and out and out[0].role == "system":
        system, out = out[0].content, out[1:]
        first = next((i for i, m in enumerate(out) if m.role == "user"), None)
        if first is None:
            out.insert(0, ChatMessage("user", system))
        else:
            out[first] = ChatMessage("user", f"{system}\n\n{out[first].content}")
    return out, []


def short_id(call_id: str) -> str:
    """A call id as Mistral's templates take it (9 letters or digits): kept if it is one, else derived
    from it, so a call and its result still match."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    alphabet = string.ascii_letters + string.digits
    return "".join(alphabet[(digest >> (6 * i)) % len(alphabet)] for i in range(9))


def _with_short_ids(m: ChatMessage) -> ChatMessage:
    if m.tool_calls:
        return replace(m, tool_calls=tuple(dict(c, id=short_id(str(c.get("id", "")))) for c in m.tool_calls))
    if m.tool_call_id is not None:
        return replace(m, tool_call_id=short_id(m.tool_call_id))
    return m


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def _literal(text: str, specials: Mapping[str, int]) -> str:
    """``text`` in Lark; a marker in it that is one special token of the model (Qwen's ``<tool_call>``,
    Mistral's ``[TOOL_CALLS]``) is that token (``<[id]>``): spelled with ordinary tokens it is text the
    model never writes. An empty text is an empty sequence."""
    if not specials:
        return _lark_string(text) if text else ""
    pattern = re.compile("|".join(re.escape(m) for m in sorted(specials, key=len, reverse=True)))
    parts, pos = [], 0
    for found in pattern.finditer(text):
        if found.start() > pos:
            parts.append(_lark_string(text[pos : found.start()]))
        parts.append(f"<[{specials[found.group()]}]>")
        pos = found.end()
    if pos < len(text):
        parts.append(_lark_string(text[pos:]))
    return " ".join(parts)


def markers(fmt: ToolFormat) -> tuple[str, ...]:
    """The call markers that may be special tokens of a model (``special_tokens`` looks them up)."""
    return fmt.specials


def _sequence(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _arguments(function: dict[str, Any]) -> dict[str, Any]:
    # closed: a function gets only the parameters it declares (strict or not)
    return dict(closed(_parameters(function)), **{"x-guidance": json_options(function.get("strict", False))})


def _call_rules(chosen: list[dict[str, Any]], fmt: ToolFormat, specials: Mapping[str, int]) -> list[str]:
    """Lark rules for one call (``call``) of one of the ``chosen`` functions."""
    opener, closer = _literal(fmt.opener, specials), _literal(fmt.closer, specials)
    if fmt.args_marker:  # the name outside the JSON: one alternative per function
        call_id = f"{_literal(fmt.id_marker, specials)} /[A-Za-z0-9]{{9}}/" if fmt.id_marker else ""
        marker = _literal(fmt.args_marker, specials)
        alternatives = [_sequence(_lark_string(f["name"]), call_id, marker, f"args{i}") for i, f in enumerate(chosen)]
        args = [f"args{i}: %json {json.dumps(_arguments(f), ensure_ascii=False)}" for i, f in enumerate(chosen)]
        return [f"call: {_sequence(opener, '(' + ' | '.join(alternatives) + ')', closer)}", *args]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, fmt.args_key: closed(_parameters(f))},
            "required": ["name", fmt.args_key],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    body: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    body["x-guidance"] = json_options(all(f.get("strict", False) for f in chosen))
    return [f"call: {_sequence(opener, 'body', closer)}", f"body: %json {json.dumps(body, ensure_ascii=False)}"]


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
    strict = all(f.get("strict", False) for f in chosen)
    n = fmt.max_calls if request.parallel and request.choice in ("auto", "required") else 1
    separator = _literal(fmt.separator, specials)
    calls = "call"
    for _ in range(n - 1):  # call (SEP call (SEP call)?)? ...: at most n calls
        calls = f"call ({_sequence(separator, calls)})?"
    rules = [
        f"calls: {_sequence(_literal(fmt.start, specials), calls, _literal(fmt.end, specials))}",
        *_call_rules(chosen, fmt, specials),
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
        return "", self._new_calls(scan_calls(self._buffer, self.fmt)[0])

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left at the end: content not yet passed on, or the last calls."""
        if self._mode == "calls":
            found, stop = scan_calls(self._buffer, self.fmt)
            calls, rest = self._new_calls(found), self._buffer[stop:].strip()
            self._buffer = ""
            return rest, calls  # rest: a call cut short (max_tokens), shown as content
        out, self._buffer = self._buffer, ""
        return out, []

    def _new_calls(self, found: list[tuple[str, Any]]) -> list[ToolCall]:
        new = [
            ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))
            for name, args in found[len(self.calls) :]
        ]
        self.calls.extend(new)
        return new


def scan_calls(text: str, fmt: ToolFormat) -> tuple[list[tuple[str, Any]], int]:
    """The whole calls at the start of ``text`` as (name, arguments), and where the scan stopped: just
    after the last whole call (after ``end`` once it came), so what lies beyond is a call cut short."""
    decoder = json.JSONDecoder()
    pos = 0

    def expect(marker: str) -> bool:  # consume ``marker`` (spaces around it are loose) if it comes next
        nonlocal pos
        marker = marker.strip()
        at = len(text) - len(text[pos:].lstrip())
        if marker and not text.startswith(marker, at):
            return False
        pos = at + len(marker)
        return True

    def json_value() -> Any:
        nonlocal pos
        value, pos = decoder.raw_decode(text, len(text) - len(text[pos:].lstrip()))
        return value

    if not expect(fmt.start):
        return [], 0
    calls: list[tuple[str, Any]] = []
    while True:
        before = pos
        try:
            if (calls and not expect(fmt.separator)) or not expect(fmt.opener):
                raise ValueError("no call here")
            if fmt.args_marker:
                args_at = text.find(fmt.args_marker, pos)
                if args_at < 0:
                    raise ValueError("the call is not whole yet")
                name = text[pos:args_at].split(fmt.id_marker)[0].strip() if fmt.id_marker else text[pos:args_at].strip()
                pos = args_at + len(fmt.args_marker)
                arguments = json_value()
            else:
                value = json_value()
                if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                    raise ValueError("not a call")
                name, arguments = value["name"], value.get(fmt.args_key, value.get("arguments", {}))
            if not isinstance(arguments, dict) or not expect(fmt.closer):
                raise ValueError("not a whole call")
        except ValueError:  # json.JSONDecodeError included: a call still arriving, or none
            pos = before
            break
        calls.append((name, arguments))
    if calls and fmt.end:
        expect(fmt.end)
    return calls, pos


def split_answer(text: str, fmt: ToolFormat) -> tuple[str | None, list[ToolCall]]:
    """A whole answer as (content, calls); content is None when the answer is only calls."""
    stream = ToolCallStream(fmt)
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    content += rest
    calls += more
    return (content or None) if calls else content, calls
