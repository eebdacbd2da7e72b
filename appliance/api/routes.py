"""Thin routes: wire request -> internal request -> scheduler -> wire response."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from appliance import __version__
from appliance.api import convert
from appliance.api.answers import chat_choice, completion_logprobs
from appliance.api.edge import request_id, require_api_key, set_response_id
from appliance.api.errors import APIError
from appliance.api.metrics import render
from appliance.api.models import ensure_model, servable_chat_models
from appliance.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
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
    raise_if_failed,
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
    """Every chat model a request may name, with its ``state`` (one not loaded is loaded by the first
    request naming it), then each loaded LoRA adapter as a model of its own (``parent``: its base)."""
    scheduler, created = _scheduler(request), request.app.state.started
    models = await asyncio.to_thread(servable_chat_models, request)
    cards = [ModelCard(id=m, created=created, state=state) for m, state in models]
    adapters = scheduler.adapter_models()
    cards += [ModelCard(id=m, created=c, parent=parent, state="loaded") for m, parent, c in adapters]
    return ModelList(data=cards)


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    scheduler = _scheduler(request)
    if not scheduler.routes(model_id):
        models = dict(await asyncio.to_thread(servable_chat_models, request))
        residency = request.app.state.residency
        found = residency.model_id(model_id) if residency is not None else None
        if found in models:
            return ModelCard(id=found, created=request.app.state.started, state=models[found])
    runner, adapter = scheduler.target(model_id)
    if adapter is None:
        return ModelCard(id=runner.model_id, created=request.app.state.started, state="loaded")
    _, created, _ = runner.adapters().get(adapter, (None, 0, 0))
    return ModelCard(id=f"{runner.model_id}:{adapter}", created=created, parent=runner.model_id, state="loaded")


def _choices(internal: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` requests for ``n`` choices; with a seed, choice i samples with seed + i (distinct, repeatable)."""
    if n == 1:
        return [internal]
    seed = internal.sampling.get("seed")
    if seed is None:
        return [internal] * n
    return [dataclasses.replace(internal, sampling={**internal.sampling, "seed": seed + i}) for i in range(n)]


@v1.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletion:
    response_id = f"chatcmpl-{request_id(request)}"
    set_response_id(request, response_id)
    exchange = Exchange(request, "chat.completions", body, response_id)
    try:
        internal = convert.chat_request(body)
        internals = _choices(internal, body.n or 1)
        exchange.requests.append(internal)
        await ensure_model(request, body.model)
        _check_capacity(request, body.model, len(internals), "n")
        created = int(time.time())
        gens = await _submit_all(_scheduler(request), internals, response_id, len(internals))
        exchange.generations.extend(gens)
        logprobs = internal.sampling.get("logprobs") is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = chat_chunks(
                gens,
                response_id=response_id,
                created=created,
                include_usage=include_usage,
                fingerprint=_fingerprint(request, gens[0].model),
                logprobs=logprobs,
            )
            return event_stream(request, gens, chunks, on_end=exchange.stream_ended)
        results = await _collect_all(request, gens)
    except BaseException as exc:
        exchange.failed(exc)
        raise
    exchange.finished()
    return ChatCompletion(
        id=response_id,
        created=created,
        model=gens[0].model,
        choices=[
            chat_choice(i, gen, text, finish, logprobs)
            for i, (gen, (text, finish)) in enumerate(zip(gens, results, strict=True))
        ],
        usage=convert.usage([f for _, f in results], per_prompt=len(gens)),
        system_fingerprint=_fingerprint(request, gens[0].model),
    )


def _check_capacity(request: Request, model: str, count: int, param: str) -> None:
    """One API request asking for more generations than a model can ever hold at once is a 400."""
    capacity = _scheduler(request).capacity(model)
    if count > capacity:
        raise APIError(
            400,
            f"Too many choices in one request: {count}, and this server holds at most {capacity} "
            f"requests for '{model}' at once. Send them in several requests.",
            param=param,
            code="too_many_prompts" if param == "prompt" else "too_many_choices",
        )


async def _collect_all(request: Request, gens: list[Generation]) -> list[tuple[str, FinishEvent]]:
    results: list[tuple[str, FinishEvent]] = []
    async with cancel_on_disconnect(request, gens):
        for gen in gens:
            results.append(await gen.collect())
    for _, finish in results:
        raise_if_failed(finish)
    return results


async def _submit_all(
    scheduler: Scheduler, requests: list[GenerationRequest], response_id: str, n: int = 1
) -> list[Generation]:
    """Submit every prompt's ``n`` choices (consecutive in ``requests``), each prompt's together."""
    gens: list[Generation] = []
    try:
        for i in range(0, len(requests), n):
            request_id = response_id if i == 0 else f"{response_id}-{i}"
            gens.extend(await scheduler.submit_choices(requests[i : i + n], request_id))
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
        prompts = convert.completion_requests(body)
        n = body.n or 1
        # OpenAI's order: the n choices of the first prompt, then those of the next
        internals = [choice for internal in prompts for choice in _choices(internal, n)]
        exchange.requests.extend(prompts)
        await ensure_model(request, body.model)
        _check_capacity(request, body.model, len(internals), "prompt" if n == 1 else "n")
        if body.echo and any(r.prompt is None for r in internals):
            raise APIError(400, "echo is supported for text prompts only.", param="echo", code="unsupported_parameter")
        echo = [r.prompt or "" for r in internals] if body.echo else [""] * len(internals)
        logprobs = internals[0].sampling.get("logprobs")
        created = int(time.time())
        gens = await _submit_all(_scheduler(request), internals, response_id, n)
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
                logprobs=logprobs,
                per_prompt=n,
            )
            return event_stream(request, gens, chunks, on_end=exchange.stream_ended)
        results = await _collect_all(request, gens)
    except BaseException as exc:
        exchange.failed(exc)
        raise
    exchange.finished()
    choices: list[Any] = [
        CompletionChoice(
            index=i,
            text=echo[i] + text,
            finish_reason=finish.finish_reason,
            logprobs=completion_logprobs(gen.logprobs, len(echo[i]), with_top=logprobs > 0)
            if logprobs is not None
            else None,
        )
        for i, (gen, (text, finish)) in enumerate(zip(gens, results, strict=True))
    ]
    return Completion(
        id=response_id,
        created=created,
        model=gens[0].model,
        choices=choices,
        usage=convert.usage([f for _, f in results], per_prompt=body.n or 1),
        system_fingerprint=_fingerprint(request, gens[0].model),
    )
