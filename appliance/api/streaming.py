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

from appliance.api.convert import usage
from appliance.api.errors import error_body
from appliance.generation import Event, FinishEvent, Generation, TextEvent

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
    gen: Generation, *, created: int, include_usage: bool, fingerprint: str | None = None
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        data: dict[str, Any] = {
            "id": gen.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": gen.model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    yield chunk({"role": "assistant", "content": ""})
    async for event in gen.events():
        if isinstance(event, TextEvent):
            yield chunk({"content": event.text})
            continue
        error = finish_error(event)
        if error is not None:
            yield sse(error)
            return
        yield chunk({}, event.finish_reason)
        if include_usage:
            yield sse(
                {
                    "id": gen.id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": gen.model,
                    "system_fingerprint": fingerprint,
                    "choices": [],
                    "usage": usage([event]).model_dump(),
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
) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
        data: dict[str, Any] = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": gens[0].model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    for index, prefix in enumerate(echo):
        if prefix:
            yield chunk(index, prefix)
    finishes: list[FinishEvent] = []
    async for index, event in merged_events(gens):
        if isinstance(event, TextEvent):
            yield chunk(index, event.text)
            continue
        error = finish_error(event)
        if error is not None:
            yield sse(error)
            return
        finishes.append(event)
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
                "usage": usage(finishes).model_dump(),
            }
        )
    yield DONE
