"""``/v1/appliance/logs``: browse the request log, curate it with feedback, and export it as training data.

Each call opens its own short-lived connection in a worker thread: SQLite work never runs on the
event loop, and reads see everything the writer has committed (WAL). The export streams: its lines
are made in worker threads one chunk at a time, so a large log never sits in memory or holds up
other requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError
from appliance.requestlog.export import ExportResult, Format, export_lines, records_to_read
from appliance.requestlog.store import STATUSES, LogFilter, LogStore, RecordNotFoundError, parse_time

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/appliance/logs", dependencies=[Depends(require_api_key)])
FLUSH_WAIT_S = 3.0
EXPORT_CHUNK_BYTES = 64 * 1024  # lines are sent in chunks of about this size: one thread hop per chunk
TOTAL_HEADER = "X-Total-Records"
NDJSON = "application/x-ndjson"


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rating: Literal[-1, 1] | None = Field(None, description="+1 good answer, -1 bad answer.")
    correction: str | None = Field(None, min_length=1, description="The answer it should have given.")
    tags: list[str] | None = Field(None, max_length=64)
    note: str | None = None


def _path(request: Request) -> Path:
    path: Path | None = request.app.state.request_log.path
    if path is None:
        raise APIError(404, "The request log is off on this server (--no-log).", code="request_log_disabled")
    return path


def _timestamp(value: str | None, param: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise APIError(
            400, f"'{param}' must be unix seconds or an ISO 8601 date: got {value!r}.", param=param
        ) from None


async def _with_store(path: Path, work: Any) -> Any:
    def run() -> Any:
        store = LogStore.open(path)
        try:
            return work(store)
        finally:
            store.close()

    return await asyncio.to_thread(run)


def _filters(
    model: str | None,
    adapter: str | None,
    since: str | None,
    until: str | None,
    status: str | None,
    rating: int | None,
    tag: str | None,
    q: str | None,
    endpoint: str | None = None,
) -> LogFilter:
    """The query's filters, checked: a wrong value is a 400 naming the parameter."""
    if rating not in (None, -1, 1):
        raise APIError(400, "'rating' must be 1 or -1.", param="rating")
    if status is not None and status not in STATUSES:
        raise APIError(400, f"'status' must be one of {', '.join(STATUSES)}.", param="status")
    return LogFilter(
        model=model,
        adapter=adapter,
        since=_timestamp(since, "since"),
        until=_timestamp(until, "until"),
        status=status,
        rating=rating,
        tag=tag,
        text=q,
        endpoint=endpoint,
    )


@router.get("")
async def list_logs(
    request: Request,
    model: str | None = None,
    adapter: str | None = None,
    since: str | None = None,
    until: str | None = None,
    status: str | None = None,
    rating: int | None = Query(None, description="+1 or -1"),
    tag: str | None = None,
    q: str | None = Query(None, description="Text in the prompt or the answer."),
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    filters = _filters(model, adapter, since, until, status, rating, tag, q)
    total, rows = await _with_store(
        _path(request), lambda s: (s.count(filters), s.page(filters, limit=limit, offset=offset))
    )
    return {
        "object": "list",
        "data": rows,
        "total": total,
        "limit": limit,
        "offset": offset,
        "has_more": offset + len(rows) < total,
    }


EXPORT_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The examples, one JSON object per line (JSONL), in the order the export makes them. "
        f"`{TOTAL_HEADER}` says how many logged records the export reads, for a progress measure; the number "
        "of lines differs (records without an example are skipped, a multi-prompt completion gives several). "
        "A failure midway cuts the stream short, so a body that does not end with a newline is incomplete.",
        "headers": {TOTAL_HEADER: {"description": "Records the export reads.", "schema": {"type": "integer"}}},
        "content": {NDJSON: {"schema": {"type": "string"}}},
    }
}


# declared before ``/{record_id}``, which would otherwise take "export" for an id
@router.get("/export", response_class=StreamingResponse, responses=EXPORT_OK)
async def export_logs(
    request: Request,
    fmt: Annotated[
        Format,
        Query(
            alias="format",
            description="chat: OpenAI chat JSONL; dpo: TRL preference pairs; completions: prompt/completion.",
        ),
    ] = "chat",
    model: str | None = None,
    adapter: str | None = None,
    since: str | None = None,
    until: str | None = None,
    status: str | None = Query("ok", description="Only answered exchanges make training data, by default."),
    rating: int | None = Query(None, description="+1 or -1"),
    tag: str | None = None,
    q: str | None = Query(None, description="Text in the prompt or the answer."),
    endpoint: Literal["chat.completions", "completions"] | None = Query(
        None, description="dpo: pairs from this endpoint (default chat.completions)."
    ),
    dedupe: bool = Query(False, description="Drop identical examples."),
) -> StreamingResponse:
    """The log as fine-tuning JSONL, the same as ``appliance logs export`` writes, streamed."""
    filters = _filters(model, adapter, since, until, status, rating, tag, q, endpoint)
    path = _path(request)
    # what was served until now is in the export, as far as the writer gets there in time
    await asyncio.to_thread(request.app.state.request_log.flush, FLUSH_WAIT_S)
    total = await _with_store(path, lambda s: records_to_read(s, fmt, filters))
    chunks = _export_chunks(path, fmt, filters, dedupe)
    headers = {
        TOTAL_HEADER: str(total),
        "Content-Disposition": f'attachment; filename="appliance-{fmt}.jsonl"',
        "Cache-Control": "no-store",  # prompts may hold personal data
    }
    # a plain iterator: Starlette takes each chunk from it in a worker thread, never on the event loop
    return StreamingResponse(chunks, media_type=NDJSON, headers=headers)


def _export_chunks(path: Path, fmt: Format, filters: LogFilter, dedupe: bool) -> Generator[bytes, None, None]:
    """The export's lines in chunks of whole lines; its own connection, closed however the stream ends."""
    store = LogStore.open(path)
    result = ExportResult()
    try:
        chunk = bytearray()
        for line in export_lines(store, fmt, filters, dedupe=dedupe, result=result):
            chunk += line
            if len(chunk) >= EXPORT_CHUNK_BYTES:
                yield bytes(chunk)
                chunk.clear()
        if chunk:
            yield bytes(chunk)
        log.info(
            "exported %d %s examples (%d duplicates, %d skipped: %s)",
            result.examples,
            fmt,
            result.duplicates,
            result.skipped,
            result.skip_reasons or "none",
        )
    finally:
        store.close()


async def _get_after_flush(request: Request, record_id: str, work: Any) -> Any:
    """Run ``work`` on the record, waiting for the writer once if it is not committed yet."""
    path = _path(request)
    try:
        return await _with_store(path, work)
    except RecordNotFoundError:
        await asyncio.to_thread(request.app.state.request_log.flush, FLUSH_WAIT_S)
    try:
        return await _with_store(path, work)
    except RecordNotFoundError as exc:
        raise APIError(404, str(exc), param="id", code="log_not_found") from None


@router.get("/{record_id}")
async def get_log(record_id: str, request: Request) -> dict[str, Any]:
    return await _get_after_flush(request, record_id, lambda s: s.get(record_id))  # type: ignore[no-any-return]


@router.post("/{record_id}/feedback")
async def post_feedback(record_id: str, feedback: Feedback, request: Request) -> dict[str, Any]:
    if feedback.model_fields_set == set():
        raise APIError(400, "Give at least one of rating, correction, tags, note.", code="empty_feedback")
    fields = feedback.model_dump(exclude_unset=True)
    return await _get_after_flush(  # type: ignore[no-any-return]
        request, record_id, lambda s: s.set_feedback(record_id, **fields)
    )
