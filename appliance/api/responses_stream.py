"""The Responses API's server-sent events, in the order and shape OpenAI sends them.

Each event is an ``event: <type>`` line and a ``data:`` line holding ``type`` and a
``sequence_number`` counting from 0; there is no ``data: [DONE]``: the stream ends after its
terminal event. A response's life is ``response.created``, ``response.in_progress``, then per
output item ``response.output_item.added``, its content (``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``, ``response.content_part.done``;
or for a function call ``response.function_call_arguments.delta`` / ``.done``) and
``response.output_item.done``, and finally ``response.completed`` (``response.incomplete`` when
``max_output_tokens`` cut it, ``response.failed`` when the generation failed).

Text streams token by token. With tools the text may turn out to be a tool call, which is known
only once the generation has finished, so the items are then sent at the end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from appliance.api.responses_protocol import (
    ResponseError,
    ResponseFunctionToolCall,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
)
from appliance.api.streaming import finish_error
from appliance.generation import FinishEvent, Generation, TextEvent

# (text, finish, id of the message streamed so far) -> the finished response, stored if asked
Finalize = Callable[[str, FinishEvent, str], Awaitable[ResponseObject]]


class _Events:
    """Numbers events in the order they are sent."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, **fields, "sequence_number": self._next}
        self._next += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _dump(model: ResponseObject | ResponseOutputMessage | ResponseFunctionToolCall | ResponseOutputText) -> Any:
    return model.model_dump(mode="json")


async def response_events(
    gen: Generation, start: ResponseObject, finalize: Finalize, *, message_id: str, buffered: bool
) -> AsyncIterator[str]:
    """The events of one response; ``start`` is the response as created (no output yet)."""
    event = _Events()
    yield event("response.created", response=_dump(start))
    yield event("response.in_progress", response=_dump(start))
    streamed = not buffered
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    if streamed:
        for piece in _message_start(event, message_id, 0):
            yield piece
    async for generated in gen.events():
        if streamed and isinstance(generated, TextEvent):
            yield event("response.output_text.delta", **where, delta=generated.text, logprobs=[])
    assert gen.finish is not None
    error = finish_error(gen.finish)
    if error is not None:
        detail = error["error"]
        failed = start.model_copy(
            update={"status": "failed", "error": ResponseError(code=detail["code"], message=detail["message"])}
        )
        yield event("response.failed", response=_dump(failed))
        return
    final = await finalize(gen.text, gen.finish, message_id)
    for index, item in enumerate(final.output):
        if isinstance(item, ResponseOutputMessage):
            if not (streamed and item.id == message_id):
                for piece in _message_start(event, item.id, index):
                    yield piece
                if item.content[0].text:
                    here = {"item_id": item.id, "output_index": index, "content_index": 0}
                    yield event("response.output_text.delta", **here, delta=item.content[0].text, logprobs=[])
            for piece in _message_end(event, item, index):
                yield piece
        else:
            for piece in _function_call(event, item, index):
                yield piece
    terminal = "response.incomplete" if final.status == "incomplete" else "response.completed"
    yield event(terminal, response=_dump(final))


def _message_start(event: _Events, item_id: str, index: int) -> list[str]:
    empty = ResponseOutputMessage(id=item_id, status="in_progress", content=[])
    return [
        event("response.output_item.added", output_index=index, item=_dump(empty)),
        event(
            "response.content_part.added",
            item_id=item_id,
            output_index=index,
            content_index=0,
            part=_dump(ResponseOutputText(text="")),
        ),
    ]


def _message_end(event: _Events, item: ResponseOutputMessage, index: int) -> list[str]:
    part = item.content[0]
    where = {"item_id": item.id, "output_index": index, "content_index": 0}
    return [
        event("response.output_text.done", **where, text=part.text, logprobs=[]),
        event("response.content_part.done", **where, part=_dump(part)),
        event("response.output_item.done", output_index=index, item=_dump(item)),
    ]


def _function_call(event: _Events, item: ResponseFunctionToolCall, index: int) -> list[str]:
    started = item.model_copy(update={"status": "in_progress", "arguments": ""})
    where = {"item_id": item.id, "output_index": index}
    return [
        event("response.output_item.added", output_index=index, item=_dump(started)),
        event("response.function_call_arguments.delta", **where, delta=item.arguments),
        event("response.function_call_arguments.done", **where, name=item.name, arguments=item.arguments),
        event("response.output_item.done", output_index=index, item=_dump(item)),
    ]
