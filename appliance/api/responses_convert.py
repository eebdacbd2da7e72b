"""Pure converters between the Responses API and chat: a request becomes a ``ChatCompletionRequest``.

``/v1/responses`` is chat with another wire format, so a request is translated into the chat request
it means and handed to ``convert.chat_request``: every check and feature of chat (sampling bounds,
the chat template, tools and ``response_format`` once chat takes them) applies unchanged. What only
the Responses API has is handled here: its flat tools, ``text.format``, ``instructions``, input
items (messages, ``function_call``, ``function_call_output``) and the history of a previous
response. Errors chat raises name chat's fields (``messages.3.content``); ``remap_param`` turns them
back into the field the client sent (``input.2.content``).

The other way, ``outcome`` turns a finished generation (its text, finish reason and tool calls)
into Responses output items; it is the one place that knows their shape.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from appliance.api.errors import APIError, unknown_parameter, unsupported_parameter
from appliance.api.protocol import ChatCompletionRequest
from appliance.api.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    IncompleteDetails,
    InputTokensDetails,
    JsonSchemaFormat,
    MessageItem,
    OutputItem,
    RefusalPart,
    ResponseCreateRequest,
    ResponseFunctionToolCall,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseStatus,
    ResponseUsage,
    TextPart,
)
from appliance.generation import FinishEvent
from appliance.tools import ToolFormat, split_answer

Item = dict[str, Any]  # an input or output item as stored and listed (``input_items``)
M = TypeVar("M", bound=BaseModel)

# OpenAI fields this server does not offer, refused by name (any other unknown field: unknown_parameter).
_UNSUPPORTED_EXTRAS = {
    "conversation": "Conversations are not supported: chain responses with previous_response_id.",
    "prompt": "Prompt templates are not supported: send the input itself.",
    "context_management": "Context management (compaction) is not supported.",
    "moderation": "Moderation is not supported on this server.",
    "image": "Image options are not supported: this server generates text.",
    "background_options": "Background responses are not supported.",
    "prompt_cache_options": "Prompt cache options are not supported: the prefix cache here is automatic.",
}
# ``include`` values that change nothing here: no reasoning items are ever produced.
_HARMLESS_INCLUDES = frozenset({"reasoning.encrypted_content"})
_BUILTIN_TOOL_CHOICES = ("none", "auto", "required")
MAX_METADATA = 16


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _parse(model: type[M], value: Any, where: str) -> M:
    """``value`` as ``model``; a mistake is a 400 naming the field inside ``where`` (``input.2.role``)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        # a union (``str | list[...]``) adds the member tried to the path: name the field, not the member
        union = next((i for i, p in enumerate(loc) if p == "str" or "[" in p), None)
        inner = ".".join(loc[:union])
        param = f"{where}.{inner}" if inner else where
        if union is not None:
            raise APIError(400, f"Invalid value for '{param}': a string or a list of parts.", param=param) from None
        if first["type"] == "extra_forbidden":
            raise unknown_parameter(param) from None
        if first["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param) from None
        raise APIError(400, f"Invalid value for '{param}': {first['msg']}.", param=param) from None


# -- request checks -----------------------------------------------------------------------------------


def check_request(body: ResponseCreateRequest) -> None:
    """Refuse, by name, every field this server would otherwise ignore or answer differently."""
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED_EXTRAS:
            if value is not None:
                raise unsupported_parameter(name, _UNSUPPORTED_EXTRAS[name])
        else:
            raise unknown_parameter(name)
    if body.background:
        raise unsupported_parameter(
            "background", "Background responses are not supported: use stream to get text early."
        )
    if body.truncation == "auto":
        raise unsupported_parameter(
            "truncation", "truncation 'auto' is not supported: a too-long input is refused instead."
        )
    if body.top_logprobs:
        raise unsupported_parameter("top_logprobs", "logprobs are not supported yet.")
    if body.max_tool_calls is not None:
        raise unsupported_parameter(
            "max_tool_calls", "max_tool_calls is not supported: it limits built-in tools, none here."
        )
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
    for value in body.include or ():
        if value not in _HARMLESS_INCLUDES:
            raise unsupported_parameter("include", f"include '{value}' is not supported here.")
    _check_reasoning(body.reasoning)
    _check_metadata(body.metadata)


def _check_reasoning(reasoning: Mapping[str, Any] | None) -> None:
    if not reasoning:
        return
    for key, value in reasoning.items():
        if key not in ("effort", "summary", "generate_summary"):
            raise unknown_parameter(f"reasoning.{key}")
        if key == "effort" and value not in (None, "none"):
            raise unsupported_parameter(
                "reasoning.effort", f"Reasoning effort '{value}' is not supported: these models do not reason."
            )
        if key != "effort" and value is not None:
            raise unsupported_parameter(
                f"reasoning.{key}", "Reasoning summaries are not supported: these models do not reason."
            )


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA:
        raise APIError(400, f"metadata holds at most {MAX_METADATA} keys.", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise APIError(
                400, f"metadata '{key[:64]}': keys hold at most 64 characters, values 512.", param="metadata"
            )


# -- input items ----------------------------------------------------------------------------------------


def input_items(body: ResponseCreateRequest) -> list[Item]:
    """The request's ``input`` as items, each with an id, in the form stored and listed by ``input_items``."""
    given = body.input
    if given is None:
        raise APIError(400, "Missing required parameter: 'input'.", param="input")
    if isinstance(given, str):
        return [_message("user", [{"type": "input_text", "text": given}])]
    if not isinstance(given, list) or not given:
        raise APIError(400, "Invalid value for 'input': a string or a non-empty list of items.", param="input")
    return [_input_item(item, f"input.{i}") for i, item in enumerate(given)]


def _message(role: str, content: list[Item], item_id: str | None = None) -> Item:
    return {"id": item_id or new_id("msg"), "type": "message", "role": role, "status": "completed", "content": content}


def _input_item(raw: Any, where: str) -> Item:
    if not isinstance(raw, dict):
        raise APIError(400, f"Invalid value for '{where}': an input item is an object.", param=where)
    kind = raw.get("type", "message")
    if kind == "message":
        msg = _parse(MessageItem, raw, where)
        parts = [{"type": "input_text", "text": msg.content}] if isinstance(msg.content, str) else msg.content
        text_type = "output_text" if msg.role == "assistant" else "input_text"
        content = [_text_part(part, f"{where}.content.{j}", text_type) for j, part in enumerate(parts)]
        return _message(msg.role, content, msg.id)
    if kind == "function_call":
        call = _parse(FunctionCallItem, raw, where)
        fields = call.model_dump(exclude={"id", "status"})
        return {"id": call.id or new_id("fc"), **fields, "status": "completed"}
    if kind == "function_call_output":
        out = _parse(FunctionCallOutputItem, raw, where)
        output: str | list[Item] = out.output
        if isinstance(out.output, list):
            output = [_text_part(part, f"{where}.output.{j}", "input_text") for j, part in enumerate(out.output)]
        return {
            "id": out.id or new_id("fco"),
            "type": kind,
            "call_id": out.call_id,
            "output": output,
            "status": "completed",
        }
    if isinstance(kind, str) and kind in ("item_reference", "reasoning", "compaction"):
        raise unsupported_parameter(
            f"{where}.type", f"Input items of type '{kind}' are not supported: send the item itself."
        )
    raise unsupported_parameter(
        f"{where}.type",
        f"Input items of type '{kind}' are not supported; this server takes 'message', 'function_call' and "
        "'function_call_output' items.",
    )


def _text_part(raw: Any, where: str, text_type: str) -> Item:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "refusal":
        return _parse(RefusalPart, raw, where).model_dump()
    if kind in ("input_image", "input_file", "input_audio"):
        raise unsupported_parameter(
            f"{where}.type", f"Content part type '{kind}' is not supported by this model; only text."
        )
    part = _parse(TextPart, raw, where)
    if text_type == "output_text":
        return {"type": "output_text", "text": part.text, "annotations": []}
    return {"type": "input_text", "text": part.text}


def _text_of(content: str | Sequence[Item]) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [str(part.get("text", part.get("refusal", ""))) for part in content]


# -- the chat request -------------------------------------------------------------------------------------


@dataclass
class Translation:
    """A Responses request as the chat request it means, with what the response echoes back."""

    chat: ChatCompletionRequest
    items: list[Item]  # this request's own input items
    tools: list[Item] = field(default_factory=list)  # the flat tools, as echoed
    tool_choice: str | Item = "auto"
    text: Item = field(default_factory=lambda: {"format": {"type": "text"}, "verbosity": "medium"})
    # a chat field (prefix) -> the Responses field it came from, to name the right one in an error
    params: dict[str, str] = field(default_factory=dict)

    def remap(self, error: APIError) -> APIError:
        """A chat-level error, naming the field the client sent instead of chat's."""
        detail = error.detail
        param = remap_param(detail.param, self.params)
        if param == detail.param:
            return error
        return APIError(
            error.status, detail.message, type=detail.type, param=param, code=detail.code, headers=error.headers
        )


def remap_param(param: str | None, table: Mapping[str, str]) -> str | None:
    """``messages.3.content.0`` -> ``input.2.content.0``: the longest prefix in ``table`` wins."""
    if param is None:
        return None
    parts = param.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return ".".join([table[prefix], *parts[n:]])
    return param


def translate(body: ResponseCreateRequest, history: Sequence[Item] = ()) -> Translation:
    """The chat request for ``body``, continuing ``history`` (a previous response's items) if any.

    ``instructions`` become the first (system) message; a previous response's instructions are not
    carried over, as OpenAI does.
    """
    check_request(body)
    items = input_items(body)
    params: dict[str, str] = {
        "messages": "input",
        "max_completion_tokens": "max_output_tokens",
        "response_format": "text.format",
        "response_format.json_schema": "text.format",
    }
    messages: list[Item] = []
    if body.instructions is not None:
        params |= {"messages.0": "instructions", "messages.0.content": "instructions"}
        messages.append({"role": "system", "content": body.instructions})
    sourced = [(item, "previous_response_id") for item in history]
    sourced += [(item, f"input.{i}") for i, item in enumerate(items)]
    for item, source in sourced:
        _add_chat_message(messages, params, item, source)
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "user": body.user,
    }
    tools, tool_choice = _add_tools(body, chat, params)
    text = _add_text_format(body, chat)
    return Translation(
        chat=ChatCompletionRequest.model_validate(chat),
        items=items,
        tools=tools,
        tool_choice=tool_choice,
        text=text,
        params=params,
    )


def _add_chat_message(messages: list[Item], params: dict[str, str], item: Item, source: str) -> None:
    """Append ``item`` as chat messages: consecutive function calls join the assistant message before them."""
    index = len(messages)
    if item["type"] == "message":
        params[f"messages.{index}"] = source
        messages.append(
            {"role": item["role"], "content": [{"type": "text", "text": t} for t in _text_of(item["content"])]}
        )
    elif item["type"] == "function_call":
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": None}
            messages.append(last)
            params[f"messages.{index}"] = source
        if "tool_calls" not in last:
            params[f"messages.{len(messages) - 1}.tool_calls"] = source
        calls = last.setdefault("tool_calls", [])
        where = f"messages.{len(messages) - 1}.tool_calls.{len(calls)}"
        params |= {where: source, f"{where}.id": f"{source}.call_id", f"{where}.function": source}
        calls.append(
            {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
        )
    else:  # function_call_output
        params |= {
            f"messages.{index}": source,
            f"messages.{index}.content": f"{source}.output",
            f"messages.{index}.tool_call_id": f"{source}.call_id",
            f"messages.{index}.role": f"{source}.type",
        }
        messages.append(
            {"role": "tool", "tool_call_id": item["call_id"], "content": "\n".join(_text_of(item["output"]))}
        )


def _add_tools(
    body: ResponseCreateRequest, chat: dict[str, Any], params: dict[str, str]
) -> tuple[list[Item], str | Item]:
    """Flat Responses function tools -> chat's nested ones; built-in tools (web search...) are refused."""
    tools: list[Item] = []
    for i, raw in enumerate(body.tools or ()):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "function":
            raise unsupported_parameter(
                f"tools.{i}.type",
                f"Tool type '{kind}' is not supported: this server runs function tools only (type 'function'), "
                "which your code executes.",
            )
        tool = _parse(FunctionTool, raw, f"tools.{i}")
        tools.append(tool.model_dump())
        function = tool.model_dump(exclude={"type"}, exclude_none=True)
        chat.setdefault("tools", []).append({"type": "function", "function": function})
        params[f"tools.{i}.function"] = f"tools.{i}"
    choice = body.tool_choice
    if choice is None:
        choice = "auto"
    elif isinstance(choice, str):
        if choice not in _BUILTIN_TOOL_CHOICES:
            raise APIError(400, f"Invalid value for 'tool_choice': '{choice}'.", param="tool_choice")
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str) or set(choice) != {"type", "name"}:
            raise APIError(400, "tool_choice of type 'function' takes exactly a 'name'.", param="tool_choice")
        if name not in {t["name"] for t in tools}:
            raise APIError(400, f"tool_choice names '{name}', which is not in tools.", param="tool_choice.name")
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise unsupported_parameter(
            "tool_choice", f"tool_choice '{kind}' is not supported: 'none', 'auto', 'required' or a function."
        )
    if tools:
        chat["tool_choice"] = (
            {"type": "function", "function": {"name": choice["name"]}} if isinstance(choice, dict) else choice
        )
        params["tool_choice.function"] = "tool_choice"
        if body.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = body.parallel_tool_calls
    elif choice not in ("auto", "none"):
        raise APIError(400, "tool_choice needs tools.", param="tool_choice")
    return tools, choice


def _add_text_format(body: ResponseCreateRequest, chat: dict[str, Any]) -> Item:
    """``text.format`` -> chat's ``response_format``; ``text.verbosity`` other than the default is refused."""
    text = dict(body.text or {})
    for key in text:
        if key not in ("format", "verbosity"):
            raise unknown_parameter(f"text.{key}")
    verbosity = text.get("verbosity")
    if verbosity not in (None, "medium"):
        raise unsupported_parameter(
            "text.verbosity", f"text.verbosity '{verbosity}' is not supported: ask in the input."
        )
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        schema = _parse(JsonSchemaFormat, fmt, "text.format")
        fmt = schema.model_dump(by_alias=True, exclude_none=True)
        chat["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    elif kind in ("text", "json_object"):
        extra = next((key for key in fmt if key != "type"), None)
        if extra is not None:
            raise unknown_parameter(f"text.format.{extra}")
        if kind == "json_object":
            chat["response_format"] = {"type": "json_object"}
    else:
        raise APIError(
            400, "text.format.type is one of 'text', 'json_object', 'json_schema'.", param="text.format.type"
        )
    return {"format": fmt, "verbosity": "medium"}


# -- the result ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made: ``arguments`` is JSON text."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Outcome:
    output: list[OutputItem]
    status: Literal["completed", "incomplete"]
    incomplete_details: IncompleteDetails | None


def outcome(
    text: str, finish_reason: str, tool_calls: Sequence[ToolCall] = (), *, message_id: str | None = None
) -> Outcome:
    """A finished generation (text, finish reason ``stop``/``length``, tool calls) as Responses output items.

    The message comes first when there is text (or nothing else), then one ``function_call`` item per
    call. A generation cut by its token limit is ``incomplete``, as OpenAI reports it.
    """
    incomplete = finish_reason == "length"
    status: Literal["completed", "incomplete"] = "incomplete" if incomplete else "completed"
    output: list[OutputItem] = []
    if text or not tool_calls:
        message_id = message_id or new_id("msg")
        output.append(ResponseOutputMessage(id=message_id, status=status, content=[ResponseOutputText(text=text)]))
    for call in tool_calls:
        output.append(
            ResponseFunctionToolCall(
                id=new_id("fc"), status="completed", call_id=call.call_id, name=call.name, arguments=call.arguments
            )
        )
    details = IncompleteDetails(reason="max_output_tokens") if incomplete else None
    return Outcome(output, status, details)


def split_tool_calls(text: str, tool_format: ToolFormat | None) -> tuple[str, list[ToolCall]]:
    """The generated text as message text and the tool calls in it (chat's parser, ``appliance.tools``)."""
    if tool_format is None:
        return text, []
    content, calls = split_answer(text, tool_format)
    return content or "", [ToolCall(c.id, c.name, c.arguments) for c in calls]


def usage(finish: FinishEvent) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=finish.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=finish.cached_tokens),
        output_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )


def response_object(
    body: ResponseCreateRequest,
    translation: Translation,
    *,
    response_id: str,
    created_at: int,
    model: str,
    defaults: tuple[float | None, float | None],
    status: ResponseStatus,
    **state: Any,
) -> ResponseObject:
    """The Response object: the request's settings echoed (``defaults``: the model's temperature and
    top_p, for those the client left out), with ``state`` (output, usage...) as it stands."""
    temperature, top_p = defaults
    return ResponseObject(
        id=response_id,
        created_at=created_at,
        status=status,
        model=model,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        parallel_tool_calls=body.parallel_tool_calls is True,  # one call unless asked, as in chat
        previous_response_id=body.previous_response_id,
        store=body.store is not False,
        temperature=body.temperature if body.temperature is not None else temperature,
        top_p=body.top_p if body.top_p is not None else top_p,
        text=translation.text,
        tool_choice=translation.tool_choice,
        tools=translation.tools,
        user=body.user,
        metadata=body.metadata or {},
        safety_identifier=body.safety_identifier,
        prompt_cache_key=body.prompt_cache_key,
        **state,
    )
