"""``GET /v1/appliance/hardware``: what the server found at start-up and the plan it loaded each model with.

The same report as ``appliance doctor --json``, so an ops person can ask a running server why a
model is on the CPU without a shell on the box.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError

router = APIRouter(prefix="/v1/appliance", dependencies=[Depends(require_api_key)])


@router.get("/hardware")
async def hardware(request: Request) -> dict[str, Any]:
    report = request.app.state.hardware
    if report is None:
        raise APIError(404, "this server was started without a hardware report", code="not_found")
    data: dict[str, Any] = report.model_dump(mode="json")
    return data
