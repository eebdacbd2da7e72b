"""Turning one API exchange into a request-log record, however it ends.

A route opens an ``Exchange`` as soon as its body is parsed and closes it exactly once: when the
answer is complete, when the stream ends or the client goes away (cancelled, with what was
produced), or when it fails (client or server error, with the message). Handing the record over
is a non-blocking queue put: the disk is the writer thread's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from appliance.api.errors import APIError, from_appliance_error
from appliance.generation import ApplianceError, Generation, GenerationRequest
from appliance.requestlog.record import ExchangeRecord, Status

log = logging.getLogger(__name__)

OPT_OUT_HEADER = "x-appliance-log"
OPT_OUT_VALUES = ("off", "0", "false", "no")
DRAIN_TIMEOUT_S = 2.0
_draining: set[asyncio.Task[None]] = set()  # strong references until each task is done


def client_identity(request: Request) -> str:
    """Who asked: an API-key holder, an app on the Unix socket, or a local client."""
    if request.app.state.settings.api_key is not None and request.headers.get("authorization"):
        return "api-key"  # the /v1 dependency has checked it by the time a route runs
    server = request.scope.get("server")
    if server is None or server[1] is None:  # uvicorn gives (path, None) on a Unix socket
        return "unix-socket"
    return "local"


def _prompt_text(requests: Sequence[GenerationRequest]) -> str | None:
    texts = []
    for r in requests:
        if r.messages is not None:
            texts.append("\n".join(f"{m.role}: {m.content}" for m in r.messages))
        elif r.prompt is not None:
            texts.append(r.prompt)
    return "\n\n".join(texts) if texts else None


class Exchange:
    """One request's facts, collected while it runs."""

    def __init__(self, request: Request, endpoint: str, body: BaseModel | dict[str, Any], response_id: str) -> None:
        self._request = request
        self._log = request.app.state.request_log
        opted_out = request.headers.get(OPT_OUT_HEADER, "").strip().lower() in OPT_OUT_VALUES
        self.enabled = self._log is not None and self._log.path is not None and not opted_out
        self.id = response_id
        self.endpoint = endpoint
        # a body that failed validation is kept as sent, if it was a JSON object at all
        self._body = body.model_dump(mode="json", exclude_unset=True) if isinstance(body, BaseModel) else body
        self._created_at = time.time()
        self._start = time.monotonic()
        self.requests: list[GenerationRequest] = []
        self.generations: list[Generation] = []
        # what a route without generations (embeddings) knows itself: its model's facts and its token count
        self.provenance: dict[str, Any] = {}
        self.prompt_tokens: int | None = None
        self._closed = False

    def failed(self, exc: BaseException) -> None:
        """The route raised: a client or server error, by the HTTP status it maps to."""
        if isinstance(exc, ApplianceError):
            exc = from_appliance_error(exc)
        if isinstance(exc, asyncio.CancelledError) or (isinstance(exc, APIError) and exc.detail.code == "cancelled"):
            self.finished()  # the client went away, or the server is stopping
        elif isinstance(exc, APIError):
            status: Status = "client_error" if exc.status < 500 else "server_error"
            self.close(status, http_status=exc.status, error=exc.detail.message)
        else:
            self.close("server_error", http_status=500, error=f"{type(exc).__name__}: {exc}")

    def finished(self, *, http_status: int = 200) -> None:
        """The generations ended (or the stream was cut): the status follows from how."""
        status: Status = "ok"
        errors = []
        for gen in self.generations:
            finish = gen.finish
            if finish is None:
                status, reason = "cancelled", "the client went away"
            elif finish.finish_reason in ("stop", "length"):
                continue
            elif finish.finish_reason == "cancelled":
                status, reason = "cancelled", finish.error or "the client went away"
            elif finish.finish_reason == "timeout":
                status, reason = "server_error", f"queue_timeout: {finish.error}"
            elif finish.finish_reason == "shutdown":
                status, reason = "server_error", f"shutting_down: {finish.error}"
            else:
                status = "server_error" if status == "ok" else status
                reason = f"{finish.finish_reason}: {finish.error}"
            errors.append(reason)
        if not self.generations:
            status, errors = "cancelled", ["the client went away"]
        self.close(status, http_status=http_status, error="; ".join(errors) or None)

    def stream_ended(self) -> None:
        """A stream is over; if the client cut it, wait briefly for the scheduler's final counts.

        The text recorded is what the client was sent; the token counts come from the finish
        event the scheduler emits once it has dropped the cancelled sequence (the next step).
        """
        if all(g.finish is not None for g in self.generations) or not self.enabled:
            self.finished()
            return
        sent = [list(g.parts) for g in self.generations]
        task = asyncio.get_running_loop().create_task(self._drain(sent))
        _draining.add(task)
        task.add_done_callback(_draining.discard)

    async def _drain(self, sent: list[list[str]]) -> None:
        async def rest(gen: Generation) -> None:
            async for _ in gen.events():
                pass

        for gen in self.generations:
            if gen.finish is None:
                gen.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rest(gen), DRAIN_TIMEOUT_S)
        for gen, parts in zip(self.generations, sent, strict=True):
            gen.parts[:] = parts
        self.finished()

    def close(self, status: Status, *, http_status: int | None, error: str | None = None) -> None:
        if self._closed or not self.enabled:
            return
        self._closed = True
        try:
            self._log.submit(self._record(status, http_status, error))
        except Exception:  # the log must never break serving
            log.exception("could not build the request log record of %s", self.id)

    def _record(self, status: Status, http_status: int | None, error: str | None) -> ExchangeRecord:
        gens = self.generations
        finishes = [g.finish for g in gens if g.finish is not None]
        model = gens[0].base_model or gens[0].model if gens else str(self._body.get("model", ""))
        provenance: dict[str, Any] = self.provenance
        adapters: list[dict[str, Any]] = []
        if gens:
            provenance = gens[0].provenance
            adapters = [{"name": n, "scale": scale, "sha256": sha} for n, scale, sha in gens[0].adapters]
        first = [g.first_text_at for g in gens if g.first_text_at is not None]
        choices = [
            {"index": i, "text": g.text, "finish_reason": g.finish.finish_reason if g.finish else None}
            for i, g in enumerate(gens)
        ]
        return ExchangeRecord(
            id=self.id,
            created_at=self._created_at,
            finished_at=self._created_at + (time.monotonic() - self._start),
            client=client_identity(self._request),
            endpoint=self.endpoint,
            model=model,
            stream=bool(self._body.get("stream", False)),
            request=self._body,
            status=status,
            choices=choices,
            prompt_text=_prompt_text(self.requests),
            prompt_tokens=sum(g.prompt_tokens for g in gens) if gens else self.prompt_tokens,
            completion_tokens=sum(f.completion_tokens for f in finishes) if gens else None,
            cached_tokens=sum(f.cached_tokens for f in finishes) if gens else None,
            ttft_ms=(min(first) - self._start) * 1000 if first else None,
            http_status=http_status,
            error=error,
            adapters=adapters,
            **provenance,
        )


LOGGED_PATHS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
}


def record_invalid(request: Request, body: Any, status: int, message: str) -> None:
    """A request to a logged endpoint refused before its route ran (invalid body): a client error."""
    endpoint = LOGGED_PATHS.get(request.url.path)
    if endpoint is None:
        return
    response_id = request.state.response_id if hasattr(request.state, "response_id") else None
    rid = response_id or f"req-{request.state.request_id}"
    sent = body if isinstance(body, dict) else {"body": body if isinstance(body, str | list) else repr(body)}
    Exchange(request, endpoint, sent, rid).close("client_error", http_status=status, error=message)
