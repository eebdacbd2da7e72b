"""``POST /v1/embeddings``: OpenAI's embeddings endpoint over the registered embedding models.

The wire types live here (this route alone uses them); the models are an ``EmbeddingModels``
built by ``bootstrap`` and run off the event loop there. This module converts the wire request
once (inputs, ``dimensions``, ``encoding_format``), refuses what it cannot honour by name, and
turns the engine's typed input errors into 400s that say which input and why.

``dimensions`` is honoured only where it means something: the model's own width always, and a
smaller one only for a model registered as ``matryoshka`` (trained so that a vector's first values
are a good shorter vector; the vector is then cut and normalised again). Cutting another model's
vectors degrades them silently, so other values are refused with ``unsupported_parameter``.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from appliance.api.edge import request_id, require_api_key, set_response_id
from appliance.api.errors import APIError
from appliance.api.recording import Exchange
from appliance.embedding import EmbeddingEntry, EmbeddingModels
from engines.embeddings import EmbeddingInputError, InputTooLongError, shortened

MAX_INPUTS = 2048  # OpenAI's own cap per request

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name, never ignored

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # accepted, as OpenAI does; changes nothing here

    @field_validator("input", mode="wrap")
    @classmethod
    def _one_of_four_shapes(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One message naming ``input`` rather than the union's four attempts."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                "it must be a string, an array of strings, an array of token ids, or an array of arrays of token ids"
            ) from None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the vector's little-endian float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def _input_error(message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param="input", code=code)


def _refuse_unknown(body: EmbeddingRequest) -> None:
    for name in body.model_extra or {}:
        raise APIError(
            400,
            f"Unrecognized request argument supplied: {name}. docs/api.md lists every parameter this server takes.",
            param=name,
            code="unknown_parameter",
        )


def _inputs(body: EmbeddingRequest) -> tuple[list[str], list[list[int]]]:
    """(texts, token lists): one of them empty. Empty inputs are refused here, as OpenAI does."""
    raw = body.input
    texts: list[str] = [raw] if isinstance(raw, str) else [x for x in raw if isinstance(x, str)]
    tokens: list[list[int]] = [] if texts else [x for x in raw if isinstance(x, list)]
    if not texts and not tokens and raw and isinstance(raw[0], int):
        tokens = [[x for x in raw if isinstance(x, int)]]  # a single list of token ids
    items: list[str] | list[list[int]] = texts or tokens
    if not items:
        raise _input_error("'input' must not be empty.")
    if len(items) > MAX_INPUTS:
        raise _input_error(f"Too many inputs: {len(items)}; at most {MAX_INPUTS} per request.")
    for i, item in enumerate(items):
        if not item:
            kind = "string" if texts else "token list"
            raise _input_error(f"Input {i} is an empty {kind}; every input must have content.")
    return texts, tokens


def _entry(request: Request, name: str) -> tuple[EmbeddingModels, EmbeddingEntry]:
    models: EmbeddingModels | None = getattr(request.app.state, "embeddings", None)
    entry = models.find(name) if models is not None else None
    if models is None or entry is None:
        available = ", ".join(models.model_ids) if models is not None and models.model_ids else "none"
        if name in request.app.state.scheduler.model_ids:
            raise APIError(
                400,
                f"'{name}' is a chat model; embeddings need an embedding model. Embedding models here: {available}.",
                param="model",
                code="model_not_supported",
            )
        raise APIError(
            404,
            f"The model '{name}' does not exist or is not an embedding model. Embedding models here: {available}.",
            param="model",
            code="model_not_found",
        )
    if entry.problem is not None:
        raise APIError(
            404,
            f"The embedding model '{entry.spec.id}' is not available on this server: {entry.problem}. "
            "A GGUF embedding model can be added with `appliance models import FILE.gguf`.",
            param="model",
            code="model_not_found",
        )
    return models, entry


def _dimensions(body: EmbeddingRequest, entry: EmbeddingEntry, native: int) -> int:
    wanted = body.dimensions
    if wanted is None or wanted == native:
        return native
    if not entry.spec.matryoshka:
        raise APIError(
            400,
            f"'{entry.spec.id}' gives {native}-dimension vectors only: it was not trained for shorter ones "
            "(Matryoshka), and cutting its vectors would degrade them. Leave 'dimensions' out.",
            param="dimensions",
            code="unsupported_parameter",
        )
    if wanted > native:
        raise APIError(
            400, f"'dimensions' must be at most {native} for '{entry.spec.id}'; got {wanted}.", param="dimensions"
        )
    return wanted


def _encoded(vectors: np.ndarray[Any, np.dtype[np.float32]], fmt: str) -> list[Any]:
    if fmt == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    return [v.tolist() for v in vectors]  # a float32 printed as a double reads back as the same float32


@router.post("/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    """One L2-normalised float32 vector per input (strings or token id lists), each the one it gets alone."""
    response_id = f"emb-{request_id(request)}"
    set_response_id(request, response_id)
    exchange = Exchange(request, "embeddings", body, response_id)
    try:
        _refuse_unknown(body)
        texts, tokens = _inputs(body)
        models, entry = _entry(request, body.model)
        exchange.provenance = entry.provenance
        facts = await models.facts(entry)
        dimensions = _dimensions(body, entry, facts.dimensions)
        try:
            result = await models.embed(entry, texts, tokens)
        except InputTooLongError as exc:
            raise _input_error(
                f"Input {exc.index} is {exc.tokens} tokens long; '{entry.spec.id}' takes at most {exc.limit} "
                "tokens per input. Shorten or split it.",
                code="context_length_exceeded",
            ) from exc
        except EmbeddingInputError as exc:
            raise _input_error(f"Invalid input: {exc}.") from exc
        vectors = result.vectors if dimensions == facts.dimensions else shortened(result.vectors, dimensions)
        used = sum(result.tokens)
    except BaseException as exc:
        exchange.failed(exc)
        raise
    exchange.prompt_tokens = used
    exchange.close("ok", http_status=200)
    data = _encoded(vectors, body.encoding_format)
    return JSONResponse(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "model": entry.spec.id,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }
    )
