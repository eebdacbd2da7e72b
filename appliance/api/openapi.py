"""The published OpenAPI schema, made to say what the server really answers.

FastAPI documents what it sees in the route signatures: a 200, and a 422 for every operation that
takes input. This server never sends a 422 (``errors.py`` turns every validation error into a 400
in OpenAI's ``ErrorResponse`` shape), refuses some requests at the edge before any route runs
(403, 408, 413, 415), and reads the LoRA upload's body by hand, so FastAPI cannot see any of that.

Rather than repeat ``responses=`` on every router, one table here says which error statuses apply
to an operation, judged from its method, its path and whether it takes input; the few answers only
one route gives (the LoRA upload, the health report, the event stream) are listed by route. The
schema is built once with ``get_openapi`` and post-processed (FastAPI's documented pattern for
extending the schema), then cached on the app like FastAPI's own.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from appliance.api.loras import AddAdapter
from appliance.api.protocol import ChatCompletion, Completion, ErrorResponse
from appliance.api.responses_protocol import ResponseObject

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

SCHEMAS = "#/components/schemas/"
RESPONSES = "#/components/responses/"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
STATE_CHANGING = frozenset({"post", "put", "patch", "delete"})
LORAS = "/v1/appliance/loras"
# the routes that queue work for a model (a generation, or embeddings), so the only ones that answer "come back later"
GENERATIONS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"})
# the models the post-processing refers to, with the side of the wire each is on
MODELS: tuple[tuple[type[BaseModel], JsonSchemaMode], ...] = (
    (ErrorResponse, "serialization"),
    (AddAdapter, "validation"),
    (ChatCompletion, "serialization"),
    (Completion, "serialization"),
)
# FastAPI's 422 body: dropped once no operation documents a 422 (HTTPValidationError first, it refers to the other)
VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


@dataclass(frozen=True)
class Operation:
    """The facts about one operation that decide which error statuses it can answer."""

    method: str
    path: str
    takes_input: bool  # a request body or query parameters, which can be invalid

    @property
    def needs_key(self) -> bool:
        return self.path == "/metrics" or self.path == "/v1" or self.path.startswith("/v1/")

    @property
    def is_lora(self) -> bool:
        return self.path == LORAS or self.path.startswith(LORAS + "/")


def _always(_: Operation) -> bool:
    return True


# status -> the reusable response (components/responses) that documents it, for the operations it applies to.
# A route's own entry for a status (ROUTE_RESPONSES) wins over this table, and the first row that applies wins.
STATUS_TABLE: tuple[tuple[str, str, Callable[[Operation], bool]], ...] = (
    ("400", "BadRequest", lambda op: op.takes_input),
    ("401", "Unauthorized", lambda op: op.needs_key),
    ("403", "Forbidden", _always),
    ("404", "NotFound", _always),
    ("405", "MethodNotAllowed", _always),
    ("408", "RequestTimeout", _always),
    ("413", "RequestTooLarge", _always),
    ("415", "UnsupportedMediaType", lambda op: op.method in STATE_CHANGING),
    ("500", "ServerError", _always),
    ("503", "Overloaded", lambda op: op.path in GENERATIONS),
    ("503", "LoraUnavailable", lambda op: op.is_lora),
    ("503", "ModelUnavailable", lambda op: op.path.endswith("/load")),
)


def _error(
    message: str, *, code: str | None = None, type: str = "invalid_request_error", param: str | None = None
) -> JsonObject:
    """One named example of the error body, as ``errors.APIError`` sends it."""
    return {"value": {"error": {"message": message, "type": type, "param": param, "code": code}}}


def _error_response(description: str, examples: dict[str, JsonObject], headers: JsonObject | None = None) -> JsonObject:
    response: JsonObject = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": SCHEMAS + "ErrorResponse"}, "examples": examples}},
    }
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: JsonObject) -> JsonObject:
    return {"description": description, "schema": schema}


# what a request naming a registered model that is not loaded may get (loading it on demand)
MODEL_UNAVAILABLE: dict[str, JsonObject] = {
    "insufficient_memory": _error(
        "gemma3-270m: not enough memory to load 'gemma3-270m': it needs 1.1 GiB of RAM and 640 MiB is free beside "
        "what is loaded (smollm2-135m-instruct); unload a model (POST /v1/appliance/models/ID/unload, or "
        "`appliance unload ID`), or set a smaller ctx_size or parallel",
        type="server_error",
        param="model",
        code="insufficient_memory",
    ),
    "model_unavailable": _error(
        "model 'gemma3-270m' is linked to /data/models/gemma.gguf, which is gone (moved or deleted); if it moved: "
        "appliance models remove gemma3-270m && appliance models import NEW-PATH --link --id gemma3-270m",
        type="server_error",
        param="model",
        code="model_unavailable",
    ),
    "model_unloading": _error(
        "The model 'gemma3-270m' is being unloaded; retry in a moment.",
        type="server_error",
        param="model",
        code="model_unloading",
    ),
}

FORBIDDEN_EXAMPLES: dict[str, JsonObject] = {
    "forbidden_host": _error(
        "Host 'example.com' is not allowed: without an API key this server answers only requests addressed to "
        "this machine (localhost, 127.0.0.1, ::1) or to a name in allowed_hosts.",
        code="forbidden_host",
    ),
    "forbidden_origin": _error(
        "Requests from web pages of origin 'https://example.com' are not allowed; add it to allowed_origins "
        "(APPLIANCE_ALLOWED_ORIGINS) to let that site call this server.",
        code="forbidden_origin",
    ),
}
FORBIDDEN = (
    "Refused before routing: without an API key, the `Host` header names a host this server does not answer "
    "for (`forbidden_host`); or a web page of an origin not in `allowed_origins` sent it (`forbidden_origin`)."
)

COMPONENT_RESPONSES: dict[str, JsonObject] = {
    "BadRequest": _error_response(
        "Invalid request: a body that is not valid JSON, not an object, nested too deep or holding invalid "
        "Unicode; a missing, unsupported or out-of-range parameter; or a prompt longer than the model's context. "
        "`param` names the field at fault.",
        {
            "invalid_json": _error("We could not parse the JSON body of your request: it is not valid JSON."),
            "invalid_value": _error(
                "Invalid value for 'temperature': Input should be less than or equal to 2.", param="temperature"
            ),
            "context_length_exceeded": _error(
                "This model's maximum context length is 4096 tokens.",
                param="messages",
                code="context_length_exceeded",
            ),
        },
    ),
    "Unauthorized": _error_response(
        "The server has an API key, and the request did not send it as `Authorization: Bearer <key>`, or sent another.",
        {"invalid_api_key": _error("Incorrect API key provided.", code="invalid_api_key")},
        {"WWW-Authenticate": _header("Always `Bearer`.", {"type": "string"})},
    ),
    "Forbidden": _error_response(FORBIDDEN, FORBIDDEN_EXAMPLES),
    "NotFound": _error_response(
        "The model, adapter, log record or stored response named does not exist (`model_not_found`, "
        "`lora_not_found`, `log_not_found`, `response_not_found`), the feature is off on this server, or the URL "
        "is unknown (`not_found`).",
        {
            "model_not_found": _error(
                "The model 'gpt-17' does not exist or is not loaded. Loaded models: smollm2-135m-instruct.",
                param="model",
                code="model_not_found",
            ),
            "not_found": _error("Unknown URL. See docs/api.md for the endpoints this server offers.", code="not_found"),
        },
    ),
    "MethodNotAllowed": _error_response(
        "The URL exists, but not with this method; `Allow` lists the methods it takes.",
        {"method_not_allowed": _error("Method not allowed for this URL.", code="method_not_allowed")},
        {"Allow": _header("The methods this URL takes.", {"type": "string"})},
    ),
    "RequestTimeout": _error_response(
        "The request's headers or body arrived too slowly; the connection is closed.",
        {
            "request_timeout": _error(
                "The request body did not arrive in time (no data for 30 s, or more than 120 s in all).",
                code="request_timeout",
            )
        },
    ),
    "RequestTooLarge": _error_response(
        "The body is larger than the server's limit (`max_body_bytes`; the LoRA upload has its own, "
        "`max_upload_mb`). It is refused before it is read.",
        {"request_too_large": _error("Request body too large: the limit is 8388608 bytes.", code="request_too_large")},
    ),
    "UnsupportedMediaType": _error_response(
        "A state-changing request with a body that is not `application/json` (or `+json`); a web page "
        "cannot send that across origins without a preflight.",
        {
            "unsupported_media_type": _error(
                "Unsupported Content-Type 'text/plain': send the body as JSON with 'Content-Type: application/json'.",
                code="unsupported_media_type",
            )
        },
    ),
    "ServerError": _error_response(
        "The server failed: an unexpected error, or the engine failed during the generation "
        "(`generation_failed`). A client mistake is never a 500.",
        {
            "server_error": _error("The server had an error while processing your request.", type="server_error"),
            "generation_failed": _error(
                "Generation failed: the engine stopped.", type="server_error", code="generation_failed"
            ),
        },
    ),
    "Overloaded": _error_response(
        "Try again after `Retry-After` seconds: the queue is full (`server_overloaded`), the request waited "
        "too long in it (`queue_timeout`), it was cancelled (`cancelled`) or the server is shutting down "
        "(`shutting_down`).",
        {
            "server_overloaded": _error(
                "The server is at capacity for model 'smollm2-135m-instruct' (64 requests waiting). Retry later.",
                type="server_error",
                code="server_overloaded",
            ),
            "queue_timeout": _error(
                "The request timed out waiting: no slot within 60 s.", type="server_error", code="queue_timeout"
            ),
            "shutting_down": _error("The server is shutting down.", type="server_error", code="shutting_down"),
            **{name: example for name, example in MODEL_UNAVAILABLE.items() if name != "model_unavailable"},
        },
        {"Retry-After": _header("Seconds to wait before retrying.", {"type": "integer", "minimum": 0})},
    ),
    "ModelUnavailable": _error_response(
        "The model cannot be loaded now: it does not fit beside the loaded models (`insufficient_memory`), "
        "its file has a problem (`model_unavailable`), or it is being unloaded (`model_unloading`).",
        MODEL_UNAVAILABLE,
    ),
    "LoraUnavailable": _error_response(
        "This server was started without LoRA adapter support.",
        {"unavailable": _error("LoRA adapters are not available on this server.", type="server_error")},
    ),
}

HEALTH_SCHEMA: JsonObject = {
    "type": "object",
    "required": ["status", "models", "request_log"],
    "properties": {
        "status": {
            "type": "string",
            "enum": ["ok", "degraded", "shutting_down"],
            "description": "`degraded`: serving, but the request log cannot be written (still a 200).",
        },
        "models": {
            "type": "array",
            "description": "Per loaded model: slots, queue depth, tokens/s, cache and draft counters.",
            "items": {"type": "object"},
        },
        "request_log": {"type": "object", "description": "The request log's state; `enabled` is false with --no-log."},
    },
}

UPLOAD_PARAMETERS: list[JsonObject] = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "description": f"{what} Required with an `application/octet-stream` body; not read with a JSON body.",
        "schema": {"type": "string", "minLength": 1},
    }
    for name, what in (("base", "The model the adapter is for."), ("name", "The name to load the adapter under."))
]


def _generation_ok(model: type[BaseModel], chunk: str) -> JsonObject:
    """The 200 of a generation route: the whole object, or with ``stream`` an event stream of chunks."""
    return {
        "description": "The completion; with `stream: true`, a `text/event-stream` of chunks instead.",
        "content": {
            "application/json": {"schema": {"$ref": SCHEMAS + model.__name__}},
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": f"With `stream: true`: server-sent events, each `data:` line a `{chunk}` object "
                    "as JSON, then `data: [DONE]`; a generation that fails midway ends with an `ErrorResponse` body "
                    "instead.",
                }
            },
        },
    }


# what only one route answers, keyed by (method, path); merged before the table, and never replaced by it
ROUTE_RESPONSES: dict[tuple[str, str], dict[str, JsonObject]] = {
    ("post", "/v1/chat/completions"): {"200": _generation_ok(ChatCompletion, "chat.completion.chunk")},
    ("post", "/v1/completions"): {"200": _generation_ok(Completion, "text_completion")},
    ("post", "/v1/responses"): {
        "200": {
            "description": "The response; with `stream: true`, a `text/event-stream` of Responses events instead.",
            "content": {
                # FastAPI documents it already: GET /v1/responses/{id} answers one
                "application/json": {"schema": {"$ref": SCHEMAS + ResponseObject.__name__}},
                "text/event-stream": {
                    "schema": {
                        "type": "string",
                        "description": "With `stream: true`: server-sent events, each an `event: <type>` line and a "
                        "`data:` line with that `type` and a `sequence_number`, from `response.created` to "
                        "`response.completed` (or `response.incomplete`, `response.failed`); no `[DONE]`.",
                    }
                },
            },
        },
        "404": _error_response(
            "The model named does not exist (`model_not_found`), or `previous_response_id` names a response that "
            "was not stored or was deleted (`previous_response_not_found`).",
            {
                "previous_response_not_found": _error(
                    "Previous response with id 'resp_123' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            },
        ),
    },
    ("get", "/health"): {
        "200": {
            "description": "The server is up; the load of each model and the request log's state.",
            "content": {"application/json": {"schema": {"$ref": SCHEMAS + "Health"}}},
        },
        "503": {
            "description": "The server is shutting down: the same report, with `status` `shutting_down` "
            "(not an `ErrorResponse`).",
            "content": {"application/json": {"schema": {"$ref": SCHEMAS + "Health"}}},
        },
    },
    ("get", "/metrics"): {
        "200": {
            "description": "Prometheus text exposition of the load and request counters.",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},  # what metrics.render sends
        }
    },
    ("post", LORAS): {
        "201": {"description": "The adapter was checked against its base model and loaded; the body is its card."},
        "400": _error_response(
            "Refused, and nothing changed: the adapter is not a LoRA GGUF or does not fit the base model "
            "(`invalid_lora`; the message names the tensor and the shapes), the JSON body is invalid, or an "
            "upload came without `base` and `name`.",
            {
                "invalid_lora": _error(
                    "Adapter 'pirate': tensor blk.0.attn_q has shape [64, 576].", code="invalid_lora"
                ),
                "upload_without_query": _error("An uploaded adapter needs ?base=<model>&name=<name>.", param="base"),
            },
        ),
        "403": _error_response(
            FORBIDDEN + " Or a JSON body names a path outside the folders in `lora_dirs` (`path_not_allowed`): "
            "upload the file instead.",
            FORBIDDEN_EXAMPLES
            | {
                "path_not_allowed": _error(
                    "Adding an adapter by path is allowed only for absolute paths in the folders named by lora_dirs.",
                    param="path",
                    code="path_not_allowed",
                )
            },
        ),
        "404": _error_response(
            "No model by the `base` given.",
            {"model_not_found": _error("Unknown model 'gpt-17'.", param="base", code="model_not_found")},
        ),
        "409": _error_response(
            "An adapter by this name already exists.",
            {"lora_exists": _error("An adapter named 'pirate' exists already.", param="name", code="lora_exists")},
        ),
        "415": _error_response(
            "The body is neither `application/json` nor `application/octet-stream`.",
            {
                "unsupported_media_type": _error(
                    "Unsupported Content-Type 'text/plain': send the body as JSON with "
                    "'Content-Type: application/json or application/octet-stream'.",
                    code="unsupported_media_type",
                )
            },
        ),
    },
}

LORA_REQUEST_BODY: JsonObject = {
    "required": True,
    "description": "Either the path of an adapter file on the server's machine, as JSON, or the GGUF file itself "
    "(then `base` and `name` go in the query).",
    "content": {
        "application/json": {
            "schema": {"$ref": SCHEMAS + "AddAdapter"},
            "example": {"path": "/srv/adapters/pirate.gguf", "base": "smollm2-135m-instruct", "name": "pirate"},
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json`` and the docs) publish the real responses.

    The schema is built on the first call, when every router is included, and cached on the app.
    """

    def openapi() -> JsonObject:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi_schema = None  # one FastAPI built before this call would be served as it is
    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to replace the schema


def build_openapi(app: FastAPI) -> JsonObject:
    """FastAPI's schema for ``app``, with the 422s replaced by the statuses the server sends."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        summary=app.summary,
        description=app.description,
        terms_of_service=app.terms_of_service,
        contact=app.contact,
        license_info=app.license_info,
        routes=app.routes,
        webhooks=app.webhooks.routes,
        tags=app.openapi_tags,
        servers=app.servers,
        separate_input_output_schemas=app.separate_input_output_schemas,
    )
    components: JsonObject = schema.setdefault("components", {})
    schemas: JsonObject = components.setdefault("schemas", {})
    _add_schemas(schemas, _model_schemas())
    _add_schemas(schemas, {"Health": HEALTH_SCHEMA})
    used: set[str] = set()
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                used |= _document(method, path, operation)
    shared = components.setdefault("responses", {})
    for name in dict.fromkeys(name for _, name, _ in STATUS_TABLE if name in used):
        shared.setdefault(name, COMPONENT_RESPONSES[name])
    _drop_unreferenced(schema, VALIDATION_SCHEMAS)
    return copy.deepcopy(schema)  # it holds this module's constants: whoever edits it later must not edit them


def _document(method: str, path: str, operation: JsonObject) -> set[str]:
    """Fix one operation in place; returns the names of the shared responses it now refers to."""
    responses: JsonObject = operation.setdefault("responses", {})
    responses.pop("422", None)
    if (method, path) == ("post", LORAS):
        operation.setdefault("requestBody", LORA_REQUEST_BODY)
        parameters: list[JsonObject] = operation.setdefault("parameters", [])
        present = {(p.get("name"), p.get("in")) for p in parameters}
        parameters += [p for p in UPLOAD_PARAMETERS if (p["name"], p["in"]) not in present]
    for status, response in ROUTE_RESPONSES.get((method, path), {}).items():
        _merge_response(responses, status, response)
    facts = Operation(
        method=method,
        path=path,
        takes_input="requestBody" in operation or any(p.get("in") == "query" for p in operation.get("parameters", [])),
    )
    used: set[str] = set()
    for status, name, applies in STATUS_TABLE:
        if applies(facts) and status not in responses:
            responses[status] = {"$ref": RESPONSES + name}
            used.add(name)
    operation["responses"] = dict(sorted(responses.items()))
    return used


def _merge_response(responses: JsonObject, status: str, response: JsonObject) -> None:
    """A route's own response for a status, over what FastAPI guessed.

    A body schema FastAPI generated (from a ``response_model`` or ``responses=``) is kept; an empty
    one is only its guess for a route that returns a ``Response`` (``application/json``, ``{}``), so
    it goes when the route's entry says what the body really is.
    """
    existing = responses.get(status)
    if existing is None or "$ref" in existing:
        responses[status] = response
        return
    existing["description"] = response["description"]
    if "content" not in response:
        return
    content: JsonObject = existing.setdefault("content", {})
    for media_type in [m for m, media in content.items() if not media.get("schema")]:
        del content[media_type]
    for media_type, media in response["content"].items():
        content.setdefault(media_type, media)


def _model_schemas() -> JsonObject:
    _, top = models_json_schema(MODELS, ref_template=SCHEMAS + "{model}")
    definitions: JsonObject = top.get("$defs", {})
    return definitions


def _add_schemas(schemas: JsonObject, new: JsonObject) -> None:
    """Add component schemas; one FastAPI already generated under the same name is kept."""
    for name, definition in new.items():
        existing = schemas.setdefault(name, definition)
        if existing is not definition and existing != definition:
            log.warning("OpenAPI: schema %s already generated differently; keeping FastAPI's", name)


def _drop_unreferenced(schema: JsonObject, names: tuple[str, ...]) -> None:
    schemas: JsonObject = schema.get("components", {}).get("schemas", {})
    for name in names:
        definition = schemas.pop(name, None)
        if definition is not None and f'"{SCHEMAS}{name}"' in json.dumps(schema):
            schemas[name] = definition  # still referred to: keep it
