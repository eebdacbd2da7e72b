"""CORS for the origins the user allowed: browser apps on those origins can call the API.

The edge (``edge.py``) has already refused any request from a web page whose origin is not
allowed; what is left here is to say so to the browser. A listed origin gets
``Access-Control-Allow-Origin`` on every answer (with ``Vary: Origin``, as the answer differs by
origin), and its preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is answered here,
before the routes, which know no ``OPTIONS``. Credentials (cookies) are never allowed: the API
authenticates with a Bearer key, which a page sends as a header, so ``*`` stays safe to give.
"""

from __future__ import annotations

from starlette.types import Message, Send

METHODS = b"GET, POST, PUT, DELETE, OPTIONS"
# what a browser app needs to read: our request id, the retry hint of a 503, the streaming type
EXPOSED = b"x-request-id, retry-after, content-type"
MAX_AGE = b"600"  # seconds a browser may reuse a preflight answer
MAX_HEADER_LIST = 2048  # the request-headers list a preflight may ask for, echoed back


def is_preflight(method: str, headers: dict[str, str]) -> bool:
    return method == "OPTIONS" and "access-control-request-method" in headers


def allow_origin_headers(origin: str, allowed: frozenset[str]) -> list[tuple[bytes, bytes]]:
    given = b"*" if "*" in allowed else origin.encode("latin-1")
    return [(b"access-control-allow-origin", given), (b"vary", b"Origin")]


async def answer_preflight(send: Send, origin: str, allowed: frozenset[str], headers: dict[str, str]) -> None:
    """204 with what the browser asked to use: our methods, and the request headers it named
    (``authorization``, ``content-type``, the OpenAI SDK's ``x-stainless-*``...)."""
    wanted = headers.get("access-control-request-headers", "")[:MAX_HEADER_LIST]
    out = [
        *allow_origin_headers(origin, allowed),
        (b"access-control-allow-methods", METHODS),
        (b"access-control-max-age", MAX_AGE),
        (b"content-length", b"0"),
    ]
    if wanted.strip():
        out.append((b"access-control-allow-headers", wanted.encode("latin-1")))
    await send({"type": "http.response.start", "status": 204, "headers": out})
    await send({"type": "http.response.body", "body": b""})


def with_cors(send: Send, origin: str, allowed: frozenset[str]) -> Send:
    """``send`` that adds the allow-origin and exposed headers to the response's start."""

    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            extra = [*allow_origin_headers(origin, allowed), (b"access-control-expose-headers", EXPOSED)]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return send_with_cors
