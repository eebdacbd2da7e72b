"""``/v1/appliance/logs``: browse the request log and curate it with feedback.

Each call opens its own short-lived connection in a worker thread: SQLite work never runs on the
event loop, and reads see everything the writer has committed (WAL).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError
from appliance.requestlog.store import STATUSES, LogFilter, LogStore, RecordNotFoundError, parse_time

router = APIRouter(prefix="/v1/appliance/logs", dependencies=[Depends(require_api_key)])
FLUSH_WAIT_S = 3.0


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
    if rating not in (None, -1, 1):
        raise APIError(400, "'rating' must be 1 or -1.", param="rating")
    if status is not None and status not in STATUSES:
        raise APIError(400, f"'status' must be one of {', '.join(STATUSES)}.", param="status")
    filters = LogFilter(
        model=model,
        adapter=adapter,
        since=_timestamp(since, "since"),
        until=_timestamp(until, "until"),
        status=status,
        rating=rating,
        tag=tag,
        text=q,
    )
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
