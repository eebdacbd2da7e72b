"""What every HTTP request passes first: a request id, the body size limit and the API key.

The size limit is a pure ASGI middleware so it also stops chunked uploads that declare no
Content-Length, before the body is buffered. The request id is generated here; a route that
answers with its own id (``chatcmpl-...``) stores it in ``request.state.response_id`` and the
``X-Request-Id`` header carries exactly the id the client sees in the body (the request log keys
on it).
"""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.errors import APIError, error_body


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, uploads: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = max_body_bytes
        self.uploads = uploads or {}  # path -> its own, larger limit (file uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        limit = self.uploads.get(scope["path"], self.default_limit)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(send, rid, limit)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, self._too_large_message(limit))
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_id = state.get("response_id") or f"req-{rid}"
                headers = [*message.get("headers", []), (b"x-request-id", response_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, limited_receive, send_with_id)

    @staticmethod
    def _too_large_message(limit: int) -> str:
        return f"Request body too large: the limit is {limit} bytes."

    async def _too_large(self, send: Send, rid: str, limit: int) -> None:
        body = json.dumps(error_body(413, self._too_large_message(limit), code="request_too_large")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", f"req-{rid}".encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def require_api_key(request: Request) -> None:
    """FastAPI dependency on the /v1 routes: a Bearer key, compared in constant time."""
    key: str | None = request.app.state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


def request_id(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


def set_response_id(request: Request, response_id: str) -> None:
    request.state.response_id = response_id
