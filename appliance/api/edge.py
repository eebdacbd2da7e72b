"""What every HTTP request passes first: who may ask, how big and how slow its body may be, and its id.

A pure ASGI middleware, so it acts before anything buffers or parses the body:

- **Host and Origin** (a guard against web pages on the same machine). Without an API key the
  server trusts whoever can reach it, which on loopback means any program of this user, but
  also any web page the user opens: a page can POST to ``http://127.0.0.1:8484`` (a "simple"
  cross-origin request needs no preflight), and a DNS-rebinding page can even read the answers,
  since its own host name then points at us. So without an API key the Host header must name
  this machine (loopback names, or ``allowed_hosts``), and a request from a web page (it has an
  ``Origin``) must come from an allowed origin; a state-changing request must carry JSON (the one
  upload route also takes ``application/octet-stream``), a content type no page can send across
  origins without a preflight we never grant. The Unix socket is not reachable from a browser.
- **Body size and pace**: a declared or streamed body over the limit gets 413; a client that stops
  sending its body gets 408 (headers that come too slowly are the protocol's business, see
  ``appliance.api.server``).
- **Shape**: a JSON body nested deeper than ``bodycheck.MAX_DEPTH`` or holding a lone surrogate
  gets 400 before any parser sees it.
- **CORS**: a page of an allowed origin gets the headers a browser needs, and its preflight is
  answered (``cors.py``).
- **Request id**: generated here; a route that answers with its own id (``chatcmpl-...``) stores
  it in ``request.state.response_id`` and ``X-Request-Id`` carries exactly the id the client sees
  in the body (the request log keys on it).

Every refusal is OpenAI's error shape, counted by code for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api import bodycheck, cors
from appliance.api.errors import APIError, error_body

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPES = ("application/json",)
UPLOAD_TYPES = ("application/octet-stream",)
# a JSON body is buffered whole; past this a client is too slow even if it never pauses for long
JSON_BODY_MAX_S = 120.0
# how much of an over-limit body is read and thrown away before the 413, so the client, still
# sending, reads our answer instead of a connection reset
DRAIN_MAX_BYTES = 64 << 20
DRAIN_MAX_S = 5.0


@dataclass(frozen=True)
class EdgePolicy:
    """The edge's settings, taken from ``Settings`` once by ``create_app``."""

    max_body_bytes: int
    body_timeout: float
    api_key: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    uploads: dict[str, int] = field(default_factory=dict)  # path -> its own, larger limit (file uploads)


class EdgeRefusedError(Exception):
    """A request stopped at the edge; becomes an error response there."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def _host_name(host: str) -> str:
    """``[::1]:8484`` -> ``::1``, ``LocalHost.:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always the loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _origin(value: str) -> str:
    """An Origin header in a comparable form: ``scheme://host:port``, lower case, default port implied."""
    parts = urlsplit(value.strip().lower())
    if not parts.scheme or not parts.hostname:
        return value.strip().lower()
    default = {"http": 80, "https": 443}.get(parts.scheme)
    port = parts.port if parts.port is not None else default
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port != default else "")


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, policy: EdgePolicy, refusals: Counter[str] | None = None) -> None:
        self.app = app
        self.policy = policy
        self.allowed_origins = frozenset(_origin(o) for o in policy.allowed_origins)
        self.refusals: Counter[str] = refusals if refusals is not None else Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        try:
            self._check_caller(scope, headers)
            origin = headers.get("origin")
            listed = origin is not None and self._origin_listed(origin)
            if listed and cors.is_preflight(scope["method"], headers):
                assert origin is not None
                await cors.answer_preflight(send, origin, self.allowed_origins, headers)
                return
            receive = await self._checked_body(scope, headers, receive)
        except EdgeRefusedError as refusal:
            self.refusals[refusal.code] += 1
            await _refuse(send, rid, refusal, close=refusal.status in (408, 413))
            return
        if listed:
            assert origin is not None
            send = cors.with_cors(send, origin, self.allowed_origins)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_id = state.get("response_id") or f"req-{rid}"
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", response_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)

    # -- who may ask ----------------------------------------------------------------------

    def _check_caller(self, scope: Scope, headers: dict[str, str]) -> None:
        server = scope.get("server")
        on_socket = server is None or server[1] is None  # uvicorn gives (path, None) on a Unix socket
        host = headers.get("host")
        if not self.policy.api_key and not on_socket and host is not None and not self._host_allowed(host):
            raise EdgeRefusedError(
                403,
                f"Host '{host}' is not allowed: without an API key this server answers only requests addressed to "
                "this machine (localhost, 127.0.0.1, ::1) or to a name in allowed_hosts.",
                "forbidden_host",
            )
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host, scope):
            raise EdgeRefusedError(
                403,
                f"Requests from web pages of origin '{origin}' are not allowed; add it to allowed_origins "
                "(APPLIANCE_ALLOWED_ORIGINS) to let that site call this server.",
                "forbidden_origin",
            )
        if scope["method"] in STATE_CHANGING and _has_body(headers):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            allowed = JSON_TYPES + (UPLOAD_TYPES if scope["path"] in self.policy.uploads else ())
            if media not in allowed and not media.endswith("+json"):
                raise EdgeRefusedError(
                    415,
                    f"Unsupported Content-Type '{media or '(none)'}': send the body as JSON with "
                    f"'Content-Type: {' or '.join(allowed)}'.",
                    "unsupported_media_type",
                )

    def _host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        return is_loopback_name(name) or name in self.policy.allowed_hosts or "*" in self.policy.allowed_hosts

    def _origin_listed(self, origin: str) -> bool:
        """Allowed by name (not only as the same origin): such a page gets CORS headers."""
        return "*" in self.allowed_origins or _origin(origin) in self.allowed_origins

    def _origin_allowed(self, origin: str, host: str | None, scope: Scope) -> bool:
        if self._origin_listed(origin):
            return True
        # same origin: a page this server itself would serve (none today; a future web UI)
        scheme = scope.get("scheme", "http")
        normal = _origin(origin)
        return host is not None and normal != "null" and normal == _origin(f"{scheme}://{host}")

    # -- the body -------------------------------------------------------------------------

    async def _checked_body(self, scope: Scope, headers: dict[str, str], receive: Receive) -> Receive:
        """The receive channel the app gets: the buffered and checked body, or a guarded stream."""
        path = scope["path"]
        limit = self.policy.uploads.get(path, self.policy.max_body_bytes)
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            if headers.get("expect", "").lower() != "100-continue":  # else the client waits, sending nothing
                await _drain(receive, int(declared))
            raise _too_large(limit)
        if not _has_body(headers):
            return receive
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if path in self.policy.uploads and media in UPLOAD_TYPES:
            return self._guarded_stream(receive, limit)
        body = await self._read_json_body(receive, limit)
        if bodycheck.too_deep(body):
            raise EdgeRefusedError(
                400,
                f"The JSON body is nested deeper than {bodycheck.MAX_DEPTH} levels; "
                "no parameter of this API needs that.",
                "invalid_json_depth",
            )
        where = bodycheck.lone_surrogate(body)
        if where is not None:
            raise EdgeRefusedError(
                400,
                f"Invalid Unicode in '{where}': a lone surrogate escape (\\ud800-\\udfff without its pair) is not a "
                "character. Send valid UTF-8 text.",
                "invalid_unicode",
                param=None if where == "body" else where,
            )
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect, when it comes

        return replay

    async def _read_json_body(self, receive: Receive, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + JSON_BODY_MAX_S
        while True:
            message = await self._receive_in_time(receive, deadline)
            if message["type"] == "http.disconnect":
                raise EdgeRefusedError(
                    400, "The client closed the connection before sending the whole body.", "incomplete"
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _drain(receive, 0)
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _receive_in_time(self, receive: Receive, deadline: float) -> Message:
        timeout = min(self.policy.body_timeout, max(0.0, deadline - time.monotonic()))
        try:
            return await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise EdgeRefusedError(
                408,
                f"The request body did not arrive in time (no data for {self.policy.body_timeout:g} s, or more than "
                f"{JSON_BODY_MAX_S:g} s in all).",
                "request_timeout",
            ) from None

    def _guarded_stream(self, receive: Receive, limit: int) -> Receive:
        """An upload's body, streamed to the route: the same limits, checked piece by piece."""
        received = 0

        async def guarded() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.policy.body_timeout)
            except TimeoutError:
                self.refusals["request_timeout"] += 1
                raise StarletteHTTPException(
                    408, f"The upload stalled: no data for {self.policy.body_timeout:g} s."
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    self.refusals["request_too_large"] += 1
                    raise StarletteHTTPException(413, _too_large_message(limit))
            return message

        return guarded


def _has_body(headers: dict[str, str]) -> bool:
    length = headers.get("content-length", "").strip()
    return "transfer-encoding" in headers or (length.isdigit() and int(length) > 0)


def _too_large_message(limit: int) -> str:
    return f"Request body too large: the limit is {limit} bytes."


def _too_large(limit: int) -> EdgeRefusedError:
    return EdgeRefusedError(413, _too_large_message(limit), "request_too_large")


async def _drain(receive: Receive, declared: int) -> None:
    """Read and discard what the client is still sending, within bounds (see ``DRAIN_MAX_BYTES``)."""
    if declared > DRAIN_MAX_BYTES:
        return
    deadline = time.monotonic() + DRAIN_MAX_S
    drained = 0
    while drained <= DRAIN_MAX_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


async def _refuse(send: Send, rid: str, refusal: EdgeRefusedError, *, close: bool) -> None:
    body = json.dumps(error_body(refusal.status, str(refusal), param=refusal.param, code=refusal.code)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", f"req-{rid}".encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
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
