"""``/v1/appliance/requests``: what the server is doing right now, and cancelling one request.

The desktop app's Requests screen polls this every second, so it answers from memory without
touching the disk: every model's queued and running requests with their live token counts, TTFT
and speed, the last finished ones, and each model's load (the figures of ``/health``). Cancelling
ends a request as if its client had gone away: its stream gets the ``cancelled`` error event, a
non-streamed call gets a 503 ``cancelled``, and the request log records it as cancelled, saying
that the server did it.

Who sent each request (``client``) is known only at the HTTP edge, so ``ClientTagMiddleware``
sets the scheduler's ``submitted_by`` for each HTTP request's task; routes need not pass it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError
from appliance.api.protocol import ErrorResponse
from appliance.api.recording import client_identity
from appliance.generation import FinishReason
from appliance.scheduler import FINISHED_KEPT, RequestSnapshot, RunnerStats, Scheduler, submitted_by

router = APIRouter(prefix="/v1/appliance/requests", dependencies=[Depends(require_api_key)])

CANCEL_REASON = "cancelled on the server (DELETE /v1/appliance/requests)"
CANCEL_WAIT_S = 2.0  # the decode loop drops a cancelled request at its next step: milliseconds
CANCEL_POLL_S = 0.02

RequestState = Literal["queued", "prefilling", "generating", "finished"]
RequestStatus = Literal["running", "ok", "cancelled", "timeout", "error", "shutdown"]
STATUS_OF: dict[FinishReason, RequestStatus] = {
    "stop": "ok",
    "length": "ok",
    "cancelled": "cancelled",
    "timeout": "timeout",
    "error": "error",
    "shutdown": "shutdown",
}


class AdapterUse(BaseModel):
    name: str
    scale: float


class RequestInfo(BaseModel):
    """One queued, running or finished request."""

    id: str = Field(description="The id its client sees in the response (`chatcmpl-...`, `cmpl-...`).")
    object: Literal["appliance.request"] = "appliance.request"
    model: str = Field(description="The loaded model answering it.")
    adapters: list[AdapterUse] = Field(description="The LoRA adapters applied, with their scales.")
    client: str | None = Field(description="Who sent it: `local`, `api-key` or `unix-socket`; null if not over HTTP.")
    state: RequestState
    status: RequestStatus = Field(description="`running` until it ends; then `ok` (stop or length) or why it ended.")
    finish_reason: FinishReason | None
    error: str | None = Field(description="Why it failed or who cancelled it.")
    prompt_tokens: int
    prompt_tokens_done: int = Field(description="Prompt tokens computed or taken from the prefix cache so far.")
    cached_tokens: int = Field(description="Prompt tokens taken from the prefix cache.")
    completion_tokens: int = Field(description="Tokens generated so far.")
    max_tokens: int
    enqueued_at: float = Field(description="Unix time it was queued (after tokenization).")
    started_at: float | None = Field(description="Unix time it got a slot.")
    finished_at: float | None
    queue_ms: float | None = Field(description="Time spent waiting for a slot.")
    ttft_ms: float | None = Field(description="Time from queueing to the first token.")
    tokens_per_second: float | None = Field(description="Decode speed: tokens after the first, per second.")


class RequestList(BaseModel):
    object: Literal["list"] = "list"
    created: float = Field(description="Unix time of this snapshot.")
    data: list[RequestInfo] = Field(description="Queued and running requests, first come first.")
    finished: list[RequestInfo] = Field(description="The last finished requests, newest first.")
    models: list[RunnerStats] = Field(description="Each loaded model's load and counters, as in /health.")


class CancelledRequest(BaseModel):
    id: str
    object: Literal["appliance.request"] = "appliance.request"
    cancelled: Literal[True] = True
    ended: bool = Field(description="Whether it had ended by the time this answer was sent.")


def request_info(snap: RequestSnapshot, now: float) -> RequestInfo:
    """The wire form of a snapshot, with the figures derived from its times (``now``: unix time)."""
    end = snap.finished_at if snap.finished_at is not None else now
    first = snap.first_token_at
    speed = None
    if first is not None and snap.completion_tokens > 1 and end > first:
        speed = round((snap.completion_tokens - 1) / (end - first), 2)
    reason = snap.finish_reason
    status: RequestStatus = "running" if reason is None else STATUS_OF[reason]
    return RequestInfo(
        id=snap.id,
        model=snap.model,
        adapters=[AdapterUse(name=name, scale=scale) for name, scale in snap.adapters],
        client=snap.client or None,
        state=snap.state,
        status=status,
        finish_reason=reason,
        error=snap.error,
        prompt_tokens=snap.prompt_tokens,
        prompt_tokens_done=snap.prompt_tokens_done,
        cached_tokens=snap.cached_tokens,
        completion_tokens=snap.completion_tokens,
        max_tokens=snap.max_tokens,
        enqueued_at=snap.enqueued_at,
        started_at=snap.started_at,
        finished_at=snap.finished_at,
        queue_ms=_ms(snap.enqueued_at, snap.started_at),
        ttft_ms=_ms(snap.enqueued_at, first),
        tokens_per_second=speed,
    )


def _ms(start: float, end: float | None) -> float | None:
    return None if end is None else round(max(0.0, end - start) * 1000, 1)


def _scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


@router.get("")
async def list_requests(
    request: Request,
    finished: int = Query(FINISHED_KEPT, ge=0, le=FINISHED_KEPT, description="How many finished requests to list."),
) -> RequestList:
    """Queued and running requests of every model, the last finished ones, and each model's load."""
    scheduler = _scheduler(request)
    live, done = scheduler.requests()
    now = time.time()
    return RequestList(
        created=now,
        data=[request_info(s, now) for s in live],
        finished=[request_info(s, now) for s in done[:finished]],
        models=scheduler.stats(),
    )


@router.delete(
    "/{request_id}",
    responses={409: {"model": ErrorResponse, "description": "The request has already finished."}},
)
async def cancel_request(request_id: str, request: Request) -> CancelledRequest:
    """Cancel a queued or running request; answers once it has ended (within about 2 s)."""
    scheduler = _scheduler(request)
    if not scheduler.cancel(request_id, CANCEL_REASON):
        _, done = scheduler.requests()
        if any(s.id == request_id for s in done):
            raise APIError(409, f"The request '{request_id}' has already finished.", code="request_finished")
        raise APIError(
            404, f"No queued or running request has the id '{request_id}'.", param="id", code="request_not_found"
        )
    deadline = time.monotonic() + CANCEL_WAIT_S
    while (running := any(s.id == request_id for s in scheduler.requests()[0])) and time.monotonic() < deadline:
        await asyncio.sleep(CANCEL_POLL_S)
    return CancelledRequest(id=request_id, ended=not running)


class ClientTagMiddleware:
    """Sets ``submitted_by`` for the task of each HTTP request, so the scheduler knows who sent it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = submitted_by.set(client_identity(Request(scope)))
        try:
            await self.app(scope, receive, send)
        finally:
            submitted_by.reset(token)


def install(app: FastAPI) -> None:
    """The routes, and the middleware that tells them who sent each request."""
    app.include_router(router)
    app.add_middleware(ClientTagMiddleware)
