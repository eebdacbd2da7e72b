"""Thin routes: wire request -> internal request -> scheduler -> wire response."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from appliance import __version__
from appliance.api import convert
from appliance.api.edge import request_id, require_api_key, set_response_id
from appliance.api.errors import APIError
from appliance.api.metrics import render
from appliance.api.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from appliance.api.recording import Exchange
from appliance.api.streaming import (
    cancel_on_disconnect,
    chat_chunks,
    completion_chunks,
    event_stream,
    finish_error,
)
from appliance.generation import FinishEvent, Generation, GenerationRequest
from appliance.scheduler import Scheduler

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


def _fingerprint(request: Request, model: str) -> str | None:
    """OpenAI's ``system_fingerprint``: what decides the answers besides the request, here the model
    file (its sha256's start) and this build; a client that caches answers keys on it."""
    sha = _scheduler(request).resolve(model).provenance.get("model_sha256")
    return f"fp_{sha[:10]}_{__version__}" if sha else None


def _raise_if_failed(finish: FinishEvent) -> None:
    error = finish_error(finish)
    if error is not None:
        detail = error["error"]
        status = 500 if finish.finish_reason == "error" else 503
        headers = {"Retry-After": "5"} if status == 503 else None
        raise APIError(status, detail["message"], type=detail["type"], code=detail["code"], headers=headers)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness plus the load (slots, queue depth, tokens/s, cache and draft counters) and the log's state.

    ``status`` is ``ok``, ``degraded`` (serving, but the request log cannot be written: still 200,
    the endpoint answers) or ``shutting_down`` (503, so a load balancer stops sending work).
    """
    scheduler = _scheduler(request)
    log_status = request.app.state.request_log.status()
    status = "ok"
    if log_status.get("error"):
        status = "degraded"
    if not scheduler.accepting:
        status = "shutting_down"
    body = {
        "status": status,
        "models": [vars(s) for s in scheduler.stats()],
        # a log that cannot be written shows here; serving goes on
        "request_log": log_status,
    }
    return JSONResponse(body, status_code=503 if status == "shutting_down" else 200)


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the same figures."""
    body, content_type = render(request.app.state.metrics)
    return Response(body, media_type=content_type)


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    """The loaded models, then each loaded LoRA adapter as a model of its own (``parent``: its base)."""
    scheduler, created = _scheduler(request), request.app.state.started
    cards = [ModelCard(id=m, created=created) for m in scheduler.model_ids]
    cards += [ModelCard(id=m, created=c, parent=parent) for m, parent, c in scheduler.adapter_models()]
    return ModelList(data=cards)


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    runner, adapter = _scheduler(request).target(model_id)
    if adapter is None:
        return ModelCard(id=runner.model_id, created=request.app.state.started)
    _, created, _ = runner.adapters().get(adapter, (None, 0, 0))
    return ModelCard(id=f"{runner.model_id}:{adapter}", created=created, parent=runner.model_id)


@v1.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletion:
    response_id = f"chatcmpl-{request_id(request)}"
    set_response_id(request, response_id)
    exchange = Exchange(request, "chat.completions", body, response_id)
    try:
        internal = convert.chat_request(body)
        exchange.requests.append(internal)
        created = int(time.time())
        gen = await _scheduler(request).submit(internal, response_id)
        exchange.generations.append(gen)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = chat_chunks(
                gen, created=created, include_usage=include_usage, fingerprint=_fingerprint(request, gen.model)
            )
            return event_stream(request, [gen], chunks, on_end=exchange.stream_ended)
        async with cancel_on_disconnect(request, [gen]):
            text, finish = await gen.collect()
        _raise_if_failed(finish)
    except BaseException as exc:
        exchange.failed(exc)
        raise
    exchange.finished()
    return ChatCompletion(
        id=response_id,
        created=created,
        model=gen.model,
        choices=[ChatChoice(index=0, message=ChatMessageOut(content=text), finish_reason=finish.finish_reason)],
        usage=convert.usage([finish]),
        system_fingerprint=_fingerprint(request, gen.model),
    )


async def _submit_all(scheduler: Scheduler, requests: list[GenerationRequest], response_id: str) -> list[Generation]:
    gens: list[Generation] = []
    try:
        for i, internal in enumerate(requests):
            gens.append(await scheduler.submit(internal, response_id if i == 0 else f"{response_id}-{i}"))
    except BaseException:
        for gen in gens:
            gen.cancel()
        raise
    return gens


@v1.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response | Completion:
    response_id = f"cmpl-{request_id(request)}"
    set_response_id(request, response_id)
    exchange = Exchange(request, "completions", body, response_id)
    try:
        internals = convert.completion_requests(body)
        exchange.requests.extend(internals)
        capacity = _scheduler(request).capacity(body.model)
        if len(internals) > capacity:
            raise APIError(
                400,
                f"Too many prompts in one request: {len(internals)}, and this server holds at most {capacity} "
                f"requests for '{body.model}' at once. Send them in several requests.",
                param="prompt",
                code="too_many_prompts",
            )
        if body.echo and any(r.prompt is None for r in internals):
            raise APIError(400, "echo is supported for text prompts only.", param="echo", code="unsupported_parameter")
        echo = [r.prompt or "" for r in internals] if body.echo else [""] * len(internals)
        created = int(time.time())
        gens = await _submit_all(_scheduler(request), internals, response_id)
        exchange.generations.extend(gens)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = completion_chunks(
                gens,
                response_id=response_id,
                created=created,
                include_usage=include_usage,
                echo=echo,
                fingerprint=_fingerprint(request, gens[0].model),
            )
            return event_stream(request, gens, chunks, on_end=exchange.stream_ended)
        results: list[tuple[str, FinishEvent]] = []
        async with cancel_on_disconnect(request, gens):
            for gen in gens:
                results.append(await gen.collect())
        for _, finish in results:
            _raise_if_failed(finish)
    except BaseException as exc:
        exchange.failed(exc)
        raise
    exchange.finished()
    choices: list[Any] = [
        CompletionChoice(index=i, text=echo[i] + text, finish_reason=finish.finish_reason)
        for i, (text, finish) in enumerate(results)
    ]
    return Completion(
        id=response_id,
        created=created,
        model=gens[0].model,
        choices=choices,
        usage=convert.usage([f for _, f in results]),
        system_fingerprint=_fingerprint(request, gens[0].model),
    )
