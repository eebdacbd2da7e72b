"""The wire's ``response_format``, ``tools``/``tool_choice`` and tool-call history, checked and converted.

Each mistake is refused here with the field named (``tools.1.function.name``...), so a client
learns at once; what passes becomes engine-neutral values (``Grammar``, ``ToolRequest``,
``ChatMessage`` tool fields) that the scheduler turns into a prompt and a constraint.
"""

from __future__ import annotations

import json
import re
from typing import Any

from appliance.api.errors import APIError
from appliance.api.protocol import ChatCompletionRequest
from appliance.constraints import Grammar, json_schema
from appliance.tools import ToolRequest

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def response_format(value: dict[str, Any] | None) -> Grammar | None:
    """``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema`` (that schema)."""
    if not value:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema({"type": "object"}, strict=False)
    if kind != "json_schema":
        raise _bad("response_format.type", f"Invalid response_format type {kind!r}: text, json_object or json_schema.")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "response_format json_schema needs a 'json_schema' object.")
    if not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
        raise _bad(
            "response_format.json_schema.name",
            "response_format.json_schema.name must be 1-64 letters, digits, underscores or dashes.",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema", "The schema must be a JSON object.")
    return json_schema(schema, strict=bool(spec.get("strict")), param="response_format.json_schema.schema")


def tool_request(req: ChatCompletionRequest) -> ToolRequest | None:
    """The request's tools and tool_choice, checked; None when it offers no tools."""
    if req.functions is not None or (req.model_extra or {}).get("function_call") is not None:
        param = "functions" if req.functions is not None else "function_call"
        raise APIError(
            400,
            "The deprecated functions/function_call parameters are not supported: use tools and tool_choice.",
            param=param,
            code="unsupported_parameter",
        )
    if not req.tools:
        if req.tool_choice is not None and req.tool_choice != "none":
            raise _bad("tool_choice", "tool_choice is only allowed when tools are specified.")
        if req.parallel_tool_calls is not None:
            raise _bad("parallel_tool_calls", "parallel_tool_calls is only allowed when tools are specified.")
        return None
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(req.tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(
                400,
                f"Tool type {kind!r} is not supported: only 'function' tools.",
                param=f"tools.{i}.type",
                code="unsupported_parameter",
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad(f"tools.{i}.function", "A function tool needs a 'function' object.")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(
                f"tools.{i}.function.name", "A function name must be 1-64 letters, digits, underscores or dashes."
            )
        if any(f["name"] == name for f in functions):
            raise _bad(f"tools.{i}.function.name", f"The function name '{name}' is used twice.")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"tools.{i}.function.parameters", "parameters must be a JSON schema object.")
        unknown = set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise _bad(f"tools.{i}.function.{sorted(unknown)[0]}", "Unrecognized field of a function definition.")
        functions.append({k: v for k, v in function.items() if v is not None})
    # one call per answer unless asked: small models given the choice repeat the same call
    return ToolRequest(tuple(functions), _tool_choice(req.tool_choice, functions), req.parallel_tool_calls is True)


def _tool_choice(value: Any, functions: list[dict[str, Any]]) -> str:
    if value is None:
        return "auto"
    if value in ("auto", "required", "none"):
        return str(value)
    name = None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
    if not isinstance(name, str):
        raise _bad(
            "tool_choice",
            'tool_choice must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}.',
        )
    if not any(f["name"] == name for f in functions):
        raise _bad("tool_choice", f"tool_choice names the function '{name}', which is not among the tools.")
    return name


def history_tool_calls(index: int, calls: Any) -> tuple[dict[str, Any], ...]:
    """An assistant message's ``tool_calls`` with the arguments parsed, as chat templates expect them."""
    if not isinstance(calls, list):
        raise _bad(f"messages.{index}.tool_calls", "tool_calls must be a list.")
    out = []
    for j, call in enumerate(calls):
        where = f"messages.{index}.tool_calls.{j}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{where}.function", "A tool call needs a function with a name.")
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as exc:
            raise _bad(f"{where}.function.arguments", f"The arguments are not valid JSON: {exc.msg}.") from exc
        out.append(
            {
                "id": str(call.get("id") or f"call_{index}_{j}"),
                "type": "function",
                "function": {"name": function["name"], "arguments": parsed},
            }
        )
    return tuple(out)
