"""A finished generation as OpenAI's choice: message or tool calls, finish reason, logprobs.

Shared by the whole-answer and streaming paths so both say the same thing: an answer that is only
tool calls has ``content: null`` and ``finish_reason: "tool_calls"``; logprobs come in chat's
per-token format or the legacy completions format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from appliance.api.protocol import (
    ChatChoice,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionLogprobs,
    FunctionCall,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprob,
)
from appliance.generation import FinishEvent, Generation, TokenInfo
from appliance.tools import ToolCall, split_answer


def token_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def chat_logprobs(infos: Sequence[TokenInfo]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=token_text(info.data),
                logprob=info.logprob,
                bytes=list(info.data),
                top_logprobs=[TopLogprob(token=token_text(d), logprob=p, bytes=list(d)) for d, p in info.top],
            )
            for info in infos
        ]
    )


def completion_logprobs(infos: Sequence[TokenInfo], offset: int = 0, with_top: bool = True) -> CompletionLogprobs:
    """``offset``: where the first token's text starts in the choice's text (after an echoed prompt)."""
    offsets, position = [], offset
    for info in infos:
        offsets.append(position)
        position += len(token_text(info.data))
    return CompletionLogprobs(
        tokens=[token_text(i.data) for i in infos],
        token_logprobs=[i.logprob for i in infos],
        top_logprobs=[{token_text(d): p for d, p in i.top} for i in infos] if with_top else None,
        text_offset=offsets,
    )


def tool_calls_out(calls: Sequence[ToolCall]) -> list[ToolCallOut]:
    return [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def finish_reason(finish: FinishEvent, has_calls: bool) -> str:
    return "tool_calls" if has_calls and finish.finish_reason == "stop" else finish.finish_reason


def chat_choice(index: int, gen: Generation, text: str, finish: FinishEvent, logprobs: bool) -> ChatChoice:
    content: str | None = text
    calls: list[ToolCall] = []
    if gen.tool_format is not None:
        content, calls = split_answer(text, gen.tool_format)
    return ChatChoice(
        index=index,
        message=ChatMessageOut(content=content, tool_calls=tool_calls_out(calls) or None),
        finish_reason=finish_reason(finish, bool(calls)),
        logprobs=chat_logprobs(gen.logprobs) if logprobs else None,
    )


def tool_call_deltas(calls: Sequence[ToolCall], first_index: int) -> list[dict[str, Any]]:
    """Streamed calls as OpenAI sends them: each with its index, id, type, name and arguments."""
    return [
        {
            "index": first_index + i,
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for i, c in enumerate(calls)
    ]
