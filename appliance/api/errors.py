"""Map every failure to OpenAI's error shape and the right HTTP status, by exception class.

``{"error": {"message", "type", "param", "code"}}`` is what the official client parses into its
typed exceptions (``BadRequestError``, ``NotFoundError``...). A client mistake is never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.api.protocol import ErrorDetail, ErrorResponse
from appliance.generation import (
    ApplianceError,
    ContextLengthError,
    GenerationFailedError,
    InvalidParameterError,
    InvalidPromptError,
    ModelUnavailableError,
    QueueFullError,
    ShuttingDownError,
    UnknownAdapterError,
    UnknownModelError,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error to send as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers


def error_body(
    status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()


def from_appliance_error(exc: ApplianceError) -> APIError:
    """The one mapping from internal error classes to HTTP."""
    if isinstance(exc, UnknownModelError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, UnknownAdapterError):
        return APIError(400, str(exc), param="lora", code="lora_not_found")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidParameterError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, InvalidPromptError):
        return APIError(400, str(exc), param=exc.param, code="invalid_prompt")
    if isinstance(exc, QueueFullError):
        return APIError(
            503, str(exc), type="server_error", code="server_overloaded", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, ModelUnavailableError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return APIError(503, str(exc), type="server_error", param="model", code=exc.code, headers=headers)
    if isinstance(exc, ShuttingDownError):
        return APIError(503, str(exc), type="server_error", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, GenerationFailedError):
        return APIError(500, str(exc), type="server_error", code="generation_failed")
    return APIError(500, str(exc), type="server_error")


def _json(err: APIError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=err.detail).model_dump(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if first.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return "The request body must be a JSON object.", None
    return f"Invalid value for '{param}': {first.get('msg')}.", param


def install_error_handlers(app: FastAPI, on_invalid: Callable[[Request, Any, int, str], None] | None = None) -> None:
    """``on_invalid`` sees every request refused for its body (the request log records them)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _json(exc)

    @app.exception_handler(ApplianceError)
    async def _appliance_error(_: Request, exc: ApplianceError) -> JSONResponse:
        return _json(from_appliance_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        if on_invalid is not None:
            on_invalid(request, exc.body, 400, message)
        return _json(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large"}
        message = (
            str(exc.detail)
            if exc.status_code not in (404, 405)
            else {
                404: "Unknown URL. See docs/api.md for the endpoints this server offers.",
                405: "Method not allowed for this URL.",
            }[exc.status_code]
        )
        return _json(
            APIError(exc.status_code, message, code=codes.get(exc.status_code), headers=getattr(exc, "headers", None))
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _json(APIError(500, "The server had an error while processing your request.", type="server_error"))


def unsupported_parameter(param: str, message: str) -> APIError:
    """A parameter this server knows but does not honour (or not with this value)."""
    return APIError(400, message, param=param, code="unsupported_parameter")


def unknown_parameter(param: str) -> APIError:
    """A field this server does not know: refused, never silently ignored."""
    return APIError(
        400,
        f"Unrecognized request argument supplied: {param}. docs/api.md lists every parameter this server takes.",
        param=param,
        code="unknown_parameter",
    )
