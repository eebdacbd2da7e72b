"""``/v1/responses``: OpenAI's Responses API, served as chat.

A request is translated into the chat request it means (``responses_convert``), checked by
``convert.chat_request`` like any chat request, and queued on the scheduler; its answer is sent as a
Response object or as Responses events (``responses_stream``). With ``store`` (the default, as at
OpenAI) the response is kept in the ``ResponseStore`` so a later request can continue it with
``previous_response_id``; ``GET``/``DELETE /v1/responses/{id}`` and ``.../input_items`` read and
remove what is kept. Every exchange goes to the request log as endpoint ``responses``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from appliance.api import convert
from appliance.api.edge import request_id, require_api_key, set_response_id
from appliance.api.errors import APIError, from_appliance_error
from appliance.api.models import ensure_model
from appliance.api.recording import Exchange
from appliance.api.responses_convert import (
    Item,
    Translation,
    new_id,
    outcome,
    response_object,
    split_tool_calls,
    translate,
    usage,
)
from appliance.api.responses_protocol import (
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseItemList,
    ResponseObject,
    ResponseStatus,
)
from appliance.api.responses_stream import response_events
from appliance.api.streaming import cancel_on_disconnect, event_stream, raise_if_failed
from appliance.generation import ApplianceError, FinishEvent, Generation
from appliance.responses_store import ResponseStore, ResponseStoreError, StoredResponse
from appliance.scheduler import Scheduler
from appliance.tools import ToolFormat

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/responses", dependencies=[Depends(require_api_key)])


def _store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


def _scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


@dataclass
class _Answer:
    """What one request's response is made of, from the moment its generation is queued."""

    body: ResponseCreateRequest
    translation: Translation
    history: list[Item]
    response_id: str
    created_at: int
    model: str
    defaults: tuple[float | None, float | None]  # the model's temperature and top_p
    store: ResponseStore
    tool_format: ToolFormat | None = None  # how the generation writes tool calls, when tools were offered

    def response(self, status: ResponseStatus, **state: object) -> ResponseObject:
        return response_object(
            self.body,
            self.translation,
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.model,
            defaults=self.defaults,
            status=status,
            **state,
        )

    async def finish(self, text: str, finish: FinishEvent, message_id: str | None = None) -> ResponseObject:
        """The finished response, stored when asked; a store that fails is logged, the answer still sent."""
        text, calls = split_tool_calls(text, self.tool_format)
        result = outcome(text, finish.finish_reason, calls, message_id=message_id)
        final = self.response(
            result.status,
            output=result.output,
            incomplete_details=result.incomplete_details,
            usage=usage(finish),
            completed_at=int(time.time()),
        )
        if self.body.store is not False:
            try:
                await asyncio.to_thread(
                    self.store.save, final.model_dump(mode="json"), self.translation.items, self.history
                )
            except ResponseStoreError:
                log.exception("could not store response %s; previous_response_id will not find it", final.id)
        return final


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", code="response_not_found")


async def _stored(request: Request, response_id: str) -> StoredResponse:
    stored = await asyncio.to_thread(_store(request).get, response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


async def _history(request: Request, body: ResponseCreateRequest) -> list[Item]:
    """The conversation a ``previous_response_id`` continues (without its instructions, as at OpenAI)."""
    if body.previous_response_id is None:
        return []
    stored = await asyncio.to_thread(_store(request).get, body.previous_response_id)
    if stored is None:
        raise APIError(
            404,
            f"Previous response with id '{body.previous_response_id}' not found. Only responses created with "
            "store: true (the default) can be continued; deleted ones cannot.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return stored.conversation


async def _submit(request: Request, translation: Translation, response_id: str, exchange: Exchange) -> Generation:
    """Chat's checks, then the queue; errors name the Responses field at fault (``input``, not ``messages``)."""
    try:
        internal = convert.chat_request(translation.chat)
        exchange.requests.append(internal)
        await ensure_model(request, internal.model)
        gen = await _scheduler(request).submit(internal, response_id)
    except APIError as exc:
        raise translation.remap(exc) from exc
    except ApplianceError as exc:
        raise translation.remap(from_appliance_error(exc)) from exc
    exchange.generations.append(gen)
    return gen


@router.post("", response_model=None)
async def create_response(body: ResponseCreateRequest, request: Request) -> Response | ResponseObject:
    response_id = f"resp_{request_id(request)}"
    set_response_id(request, response_id)
    exchange = Exchange(request, "responses", body, response_id)
    try:
        history = await _history(request, body)
        translation = translate(body, history)
        created_at = int(time.time())
        gen = await _submit(request, translation, response_id, exchange)
        sampling = _scheduler(request).resolve(gen.model).sampling_defaults
        answer = _Answer(
            body=body,
            translation=translation,
            history=history,
            response_id=response_id,
            created_at=created_at,
            model=gen.model,
            defaults=(sampling.temperature, sampling.top_p),
            store=_store(request),
            tool_format=gen.tool_format,
        )
        if body.stream:
            # with tools, the text may be a call: the items are known only at the end
            buffered = bool(translation.tools) and translation.tool_choice != "none"
            events = response_events(
                gen, answer.response("in_progress"), answer.finish, message_id=new_id("msg"), buffered=buffered
            )
            return event_stream(request, [gen], events, on_end=exchange.stream_ended)
        async with cancel_on_disconnect(request, [gen]):
            text, finish = await gen.collect()
        raise_if_failed(finish)
        final = await answer.finish(text, finish)
    except BaseException as exc:
        exchange.failed(exc)
        raise
    exchange.finished()
    return final


@router.get("/{response_id}")
async def retrieve_response(response_id: str, request: Request, stream: bool = False) -> ResponseObject:
    """A stored response, as it was sent."""
    if stream:
        raise APIError(
            400, "Replaying a response as a stream is not supported.", param="stream", code="unsupported_parameter"
        )
    return ResponseObject.model_validate((await _stored(request, response_id)).response)


@router.delete("/{response_id}")
async def delete_response(response_id: str, request: Request) -> ResponseDeleted:
    """Forget a stored response; responses that continued it keep their own copy of the conversation."""
    if not await asyncio.to_thread(_store(request).delete, response_id):
        raise _not_found(response_id)
    return ResponseDeleted(id=response_id)


@router.get("/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> ResponseItemList:
    """The items a response was generated from: the conversation it continued, then its own input."""
    stored = await _stored(request, response_id)
    items = [*stored.history, *stored.input_items]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise APIError(400, f"No item with id '{after}' in this response's input.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return ResponseItemList(
        data=page,
        first_id=page[0]["id"] if page else None,
        last_id=page[-1]["id"] if page else None,
        has_more=len(items) > limit,
    )
