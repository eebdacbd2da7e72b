"""``/v1/appliance/models``: the model registry, importing a GGUF file into it, loading and unloading.

``GET`` lists every registered model (built-in and imported) and whether this server has it loaded.
``POST .../{id}/load`` and ``.../{id}/unload`` load a registered chat model now (planned beside
the loaded ones; 503 with the reason when it does not fit) and unload one (after its running
requests end); both answer the model's state (``ModelResidency``). ``POST`` with JSON
``{"path": "/abs/file.gguf", "id": "optional-id"}`` does what ``appliance models import`` does:
checks the file is a sound GGUF before copying anything, copies and hashes it into the store and
registers it in the user's ``models.toml``. Failures answer 400 with the import's own message
(which tensor, truncated, not GGUF...). The model is registered, not loaded: the running server
serves it after a restart with it among its models.

The path names a file on the *server's* machine, read on the client's behalf, so it is accepted
only from the same machine: a loopback client or the Unix socket. Anyone else gets 403 with one
message whether or not the file exists, so the route cannot be used to learn what files the box
holds (a remote client has no way to name our files usefully anyway; it would upload them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError
from appliance.config import Paths, app_paths
from appliance.generation import UnknownModelError
from appliance.modelstore import DuplicateModelError, ModelFileError, import_model
from appliance.registry import ModelSpec, Registry, RegistryError, load_registry
from appliance.residency import ModelStatus, Residency

router = APIRouter(prefix="/v1/appliance/models", dependencies=[Depends(require_api_key)])

# one import at a time: two imports under the same id would both pass the "already exists" check
_import_lock = threading.Lock()


class ImportModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="An absolute path to a GGUF file on the server's machine.")
    id: str | None = Field(None, description="The model's id; by default derived from the file name.")


class RegisteredModel(BaseModel):
    """One model of the registry, without where its file lies (a client has no use for the server's paths)."""

    id: str
    object: str = "model"
    engine: str
    kind: str  # "chat", or "embedding": served at /v1/embeddings
    quantization: str | None
    architecture: str | None
    context_length: int | None
    size_bytes: int | None
    sha256: str | None
    description: str | None
    aliases: list[str]
    source: str  # "built-in" or the models.toml that registers it
    default: bool  # the registry's default model
    loaded: bool  # this server serves it now (an embedding model: it answers with it, loading it on first use)

    @classmethod
    def of(cls, spec: ModelSpec, *, default: bool, loaded: bool) -> RegisteredModel:
        return cls(
            id=spec.id,
            engine=spec.engine,
            kind=spec.kind,
            quantization=spec.quantization,
            architecture=spec.architecture,
            context_length=spec.context_length,
            size_bytes=spec.size_bytes,
            sha256=spec.sha256,
            description=spec.description,
            aliases=list(spec.aliases),
            source=spec.source,
            default=default,
            loaded=loaded,
        )


class RegisteredModelList(BaseModel):
    object: str = "list"
    data: list[RegisteredModel]


def _paths(request: Request) -> Paths:
    """The home the server was started with; an app built without one (tests) uses APPLIANCE_HOME's."""
    paths: Paths | None = getattr(request.app.state, "paths", None)
    return paths if paths is not None else app_paths()


def _loopback_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def same_machine(request: Request) -> bool:
    """Whether the request came over the Unix socket or from a loopback address."""
    server = request.scope.get("server")
    if server is None or server[1] is None:  # uvicorn gives (path, None) on a Unix socket
        return True
    return request.client is not None and _loopback_ip(request.client.host)


@router.get("")
async def list_registered(request: Request) -> RegisteredModelList:
    try:
        registry = await asyncio.to_thread(load_registry, _paths(request))
    except RegistryError as exc:
        raise APIError(500, str(exc), type="server_error", code="registry_invalid") from exc
    loaded = set(request.app.state.scheduler.model_ids)
    embeddings = getattr(request.app.state, "embeddings", None)
    loaded.update(embeddings.model_ids if embeddings is not None else ())
    return RegisteredModelList(
        data=[RegisteredModel.of(s, default=s.id == registry.default_model, loaded=s.id in loaded) for s in registry]
    )


def _import(paths: Paths, source: Path, model_id: str | None) -> ModelSpec:
    with _import_lock:
        return import_model(paths, source, model_id, progress=False)


@router.post("", status_code=201)
async def import_gguf(body: ImportModel, request: Request) -> RegisteredModel:
    source = Path(body.path).expanduser()
    if not same_machine(request) or not source.is_absolute():
        raise APIError(
            403,
            "Importing a model by path is allowed only for an absolute path, from a client on the server's own "
            "machine (loopback or the Unix socket); copy the file to that machine and import it there.",
            param="path",
            code="path_not_allowed",
        )
    try:
        spec = await asyncio.to_thread(_import, _paths(request), source, body.id)
    except DuplicateModelError as exc:  # the same bytes are registered already: nothing was copied
        raise APIError(409, str(exc), param="path", code="model_exists") from exc
    except ModelFileError as exc:
        raise APIError(400, str(exc), param="path", code="invalid_model_file") from exc
    except RegistryError as exc:
        raise APIError(500, str(exc), type="server_error", code="registry_invalid") from exc
    except OSError as exc:  # unreadable source, full disk: the file system's words are the useful ones
        raise APIError(400, f"could not import {source}: {exc.strerror or exc}", param="path") from exc
    return RegisteredModel.of(spec, default=False, loaded=spec.id in request.app.state.scheduler.model_ids)


class ModelResidency(BaseModel):
    """A chat model's state on this server, as the load and unload routes answer it."""

    id: str
    object: Literal["model.residency"] = "model.residency"
    state: Literal["loaded", "loading", "unloading", "not_loaded"]
    keep_alive_seconds: float | None = Field(
        None, description="While loaded: the idle time after which it is unloaded; null: it stays."
    )
    loaded_at: int | None = Field(None, description="When it was loaded (Unix seconds).")
    load_seconds: float | None = Field(None, description="How long its last load took, request to serving.")
    idle_seconds: float | None = None
    last_error: str | None = Field(None, description="Why its last load failed, until one succeeds.")
    device: str | None = None
    memory_bytes: int | None = Field(None, description="The memory its plan booked: weights, KV cache, compute.")
    slots: int | None = None
    ctx_size: int | None = None

    @classmethod
    def of(cls, status: ModelStatus) -> ModelResidency:
        plan = status.plan
        return cls(
            id=status.model,
            state=status.state,
            keep_alive_seconds=status.keep_alive,
            loaded_at=int(status.loaded_at) if status.loaded_at is not None else None,
            load_seconds=status.load_seconds,
            idle_seconds=status.idle_seconds,
            last_error=status.last_error,
            device=plan.device.value if plan else None,
            memory_bytes=sum(m.total for m in plan.memory) if plan else None,
            slots=plan.slots.value if plan else None,
            ctx_size=plan.ctx_size.value if plan else None,
        )


def _residency(request: Request) -> Residency:
    residency: Residency | None = getattr(request.app.state, "residency", None)
    if residency is None:
        raise APIError(404, "this server loads its models at start-up only", code="not_found")
    return residency


async def ensure_model(request: Request, name: str) -> None:
    """Load the registered chat model a request names, if it is not loaded (no-op without a residency)."""
    residency: Residency | None = getattr(request.app.state, "residency", None)
    if residency is not None:
        await residency.ensure(name)


def _chat_model(request: Request, residency: Residency, name: str) -> str:
    model_id = residency.model_id(name)
    if model_id is None:
        known = [s.id for s in _registry(request) if s.kind == "chat"]
        raise UnknownModelError(name, known)
    return model_id


def _registry(request: Request) -> Registry:
    try:
        return load_registry(_paths(request))
    except RegistryError as exc:
        raise APIError(500, str(exc), type="server_error", code="registry_invalid") from exc


def servable_chat_models(request: Request) -> list[tuple[str, str]]:
    """Every chat model a request may name, with its state: the loaded ones first, in load order,
    then each registered one whose file is here (without a residency, the loaded ones only)."""
    scheduler = request.app.state.scheduler
    residency: Residency | None = getattr(request.app.state, "residency", None)
    if residency is None:
        return [(m, "loaded") for m in scheduler.model_ids]
    listed = {m: residency.status(m).state for m in residency.loaded_ids()}
    for spec in _registry(request):
        if spec.kind != "chat" or spec.id in listed:
            continue
        try:
            present = spec.resolve_file(_paths(request).models_dir).exists()
        except RegistryError:  # its package is not installed
            present = False
        if present:
            listed[spec.id] = residency.status(spec.id).state
    return list(listed.items())


@router.post("/{model_id}/load")
async def load_model(model_id: str, request: Request) -> ModelResidency:
    """Load a registered chat model now; 503 (``insufficient_memory``...) with the reason if it cannot be."""
    residency = _residency(request)
    chat_id = await asyncio.to_thread(_chat_model, request, residency, model_id)
    return ModelResidency.of(await residency.load(chat_id))


@router.post("/{model_id}/unload")
async def unload_model(model_id: str, request: Request) -> ModelResidency:
    """Unload a model once its running requests end; a model that is not loaded is left as it is."""
    residency = _residency(request)
    chat_id = await asyncio.to_thread(_chat_model, request, residency, model_id)
    return ModelResidency.of(await residency.unload(chat_id))


@router.get("/{model_id}/state")
async def model_state(model_id: str, request: Request) -> ModelResidency:
    """A chat model's state, without changing it."""
    residency = _residency(request)
    chat_id = await asyncio.to_thread(_chat_model, request, residency, model_id)
    return ModelResidency.of(residency.status(chat_id))
