"""Server-sent events exactly as the official ``openai`` client parses them, and disconnect handling.

Chat streams send a role delta first, content deltas, a chunk carrying ``finish_reason``, the
usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``. A failure after
the stream has started is sent as an ``error`` event, which the client raises as ``APIError``.
Whatever ends the stream (done, client gone, server stopping), its generation is cancelled so
the slot is freed at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from appliance.api.answers import chat_logprobs, completion_logprobs, finish_reason, tool_call_deltas
from appliance.api.convert import usage
from appliance.api.errors import APIError, error_body
from appliance.generation import Event, FinishEvent, Generation, TextEvent, TokenInfo
from appliance.tools import ToolCall, ToolCallStream

DISCONNECT_POLL_S = 0.2
DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def finish_error(finish: FinishEvent) -> dict[str, Any] | None:
    """The error event for a generation that did not end normally, if any."""
    if finish.finish_reason == "error":
        return error_body(500, f"Generation failed: {finish.error}", type="server_error", code="generation_failed")
    if finish.finish_reason == "timeout":
        return error_body(
            503, f"The request timed out waiting: {finish.error}.", type="server_error", code="queue_timeout"
        )
    if finish.finish_reason == "shutdown":
        return error_body(
            503, f"The server is shutting down: {finish.error}.", type="server_error", code="shutting_down"
        )
    if finish.finish_reason == "cancelled":
        return error_body(
            503,
            "The generation was cancelled: " + (finish.error or "request cancelled") + ".",
            type="server_error",
            code="cancelled",
        )
    return None


def raise_if_failed(finish: FinishEvent) -> None:
    """A whole (not streamed) answer whose generation did not end normally: its error response."""
    error = finish_error(finish)
    if error is not None:
        detail = error["error"]
        status = 500 if finish.finish_reason == "error" else 503
        headers = {"Retry-After": "5"} if status == 503 else None
        raise APIError(status, detail["message"], type=detail["type"], code=detail["code"], headers=headers)


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, generations: Sequence[Generation]) -> AsyncIterator[None]:
    """Cancel ``generations`` as soon as the client goes away, while the block runs."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        for generation in generations:
            generation.cancel()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        for generation in generations:
            generation.cancel()  # no-op once finished; frees the slot if we stopped early


async def merged_events(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several generations as they come, tagged with the generation's index."""
    if len(generations) == 1:
        async for event in generations[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        async for event in generation.events():
            await queue.put((index, event))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(generations)
        while remaining:
            index, event = await queue.get()
            if isinstance(event, FinishEvent):
                remaining -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


def event_stream(
    request: Request,
    generations: Sequence[Generation],
    body: AsyncIterator[str],
    on_end: Callable[[], None] | None = None,
) -> StreamingResponse:
    """The SSE response; ``on_end`` runs once the stream is over, whole or cut by the client."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async with cancel_on_disconnect(request, generations):
                async for piece in body:
                    yield piece
        finally:
            if on_end is not None:
                on_end()

    return StreamingResponse(
        guarded(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def chat_chunks(
    gens: Sequence[Generation],
    *,
    response_id: str,
    created: int,
    include_usage: bool,
    fingerprint: str | None = None,
    logprobs: bool = False,
) -> AsyncIterator[str]:
    """The chunks of ``n`` choices (one generation each), interleaved as their tokens come.

    With tools, a choice's text goes through its ``ToolCallStream``: content is passed on as it
    comes, each tool call as one delta once it is complete (index, id, name and arguments).
    """

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, lp: Any = None) -> str:
        data: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": gens[0].model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    streams = [ToolCallStream(g.tool_format) if g.tool_format is not None else None for g in gens]
    n_calls = [0] * len(gens)
    held: list[list[TokenInfo]] = [[] for _ in gens]  # logprobs of text not passed on yet (a call's)

    def pieces(index: int, content: str, calls: list[ToolCall]) -> list[str]:
        out = []
        lp = chat_logprobs(held[index]).model_dump() if logprobs and held[index] and (content or calls) else None
        if content:
            out.append(chunk(index, {"content": content}, lp=lp))
        if calls:
            out.append(
                chunk(index, {"tool_calls": tool_call_deltas(calls, n_calls[index])}, lp=None if content else lp)
            )
            n_calls[index] += len(calls)
        if content or calls:
            held[index] = []
        return out

    for index in range(len(gens)):
        yield chunk(index, {"role": "assistant", "content": ""})
    finishes: list[FinishEvent] = []
    async for index, event in merged_events(gens):
        stream = streams[index]
        if isinstance(event, TextEvent):
            held[index].extend(event.logprobs)
            content, calls = stream.feed(event.text) if stream is not None else (event.text, [])
            for piece in pieces(index, content, calls):
                yield piece
            continue
        error = finish_error(event)
        if error is not None:
            yield sse(error)
            return
        if stream is not None:
            for piece in pieces(index, *stream.finish()):
                yield piece
        finishes.append(event)
        yield chunk(index, {}, finish_reason(event, n_calls[index] > 0))
    if include_usage:
        yield sse(
            {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": gens[0].model,
                "system_fingerprint": fingerprint,
                "choices": [],
                "usage": usage(finishes, per_prompt=len(gens)).model_dump(),
            }
        )
    yield DONE


async def completion_chunks(
    gens: Sequence[Generation],
    *,
    response_id: str,
    created: int,
    include_usage: bool,
    echo: Sequence[str],
    fingerprint: str | None = None,
    logprobs: int | None = None,
    per_prompt: int = 1,
) -> AsyncIterator[str]:
    offsets = [len(e) for e in echo]  # where each choice's next token starts in its text

    def chunk(index: int, text: str, finish_reason: str | None = None, infos: Sequence[TokenInfo] = ()) -> str:
        lp = None
        if logprobs is not None and infos:
            lp = completion_logprobs(infos, offsets[index], with_top=logprobs > 0).model_dump()
        offsets[index] += len(text)
        data: dict[str, Any] = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": gens[0].model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    for index, prefix in enumerate(echo):
        if prefix:
            offsets[index] = 0
            yield chunk(index, prefix)
    finishes: dict[int, FinishEvent] = {}
    async for index, event in merged_events(gens):
        if isinstance(event, TextEvent):
            yield chunk(index, event.text, infos=event.logprobs)
            continue
        error = finish_error(event)
        if error is not None:
            yield sse(error)
            return
        finishes[index] = event
        yield chunk(index, "", event.finish_reason)
    if include_usage:
        yield sse(
            {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": gens[0].model,
                "system_fingerprint": fingerprint,
                "choices": [],
                "usage": usage([finishes[i] for i in sorted(finishes)], per_prompt).model_dump(),
            }
        )
    yield DONE
