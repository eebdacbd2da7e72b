"""``/v1/appliance/loras``: list, add and remove LoRA adapters on the running server.

Adding takes either a path on this machine (JSON ``{"path", "base", "name"}``) or the file itself
as the raw request body (``Content-Type: application/octet-stream``, ``?base=...&name=...``), so
``curl --data-binary @adapter.gguf`` works from another box. A path is read on the client's behalf,
so it must lie in a folder the user named (``lora_dirs``); any other is refused with one message
whether or not it exists, so the route cannot be used to learn what files the machine holds.
A wrong file is refused with what is wrong (which tensor, which shapes) and changes nothing.
Removing answers once the adapter is freed, after the requests still using it end; new requests
are refused it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError
from appliance.lora.store import AdapterExistsError, AdapterNotFoundError, AdapterStoreError
from appliance.lora.sync import AdapterState, AdapterSync
from appliance.registry import RegistryError

router = APIRouter(prefix="/v1/appliance/loras", dependencies=[Depends(require_api_key)])


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    base: str = Field(min_length=1)
    name: str | None = None


def _sync(request: Request) -> AdapterSync:
    sync: AdapterSync | None = request.app.state.loras
    if sync is None:
        raise APIError(503, "LoRA adapters are not available on this server.", type="server_error")
    return sync


def _allowed_path(request: Request, raw: str) -> Path:
    """The adapter file named by a client, if it lies in one of the ``lora_dirs`` (symlinks resolved)."""
    folders: tuple[Path, ...] = request.app.state.settings.lora_dirs
    path = Path(raw).expanduser()
    if path.is_absolute():
        resolved = path.resolve()
        if any(resolved.is_relative_to(folder.expanduser().resolve()) for folder in folders):
            return resolved
    where = ", ".join(str(f) for f in folders) if folders else "none is configured"
    raise APIError(
        403,
        "Adding an adapter by path is allowed only for absolute paths in the folders named by lora_dirs "
        f"(--lora-dir; here: {where}). Upload the file instead: "
        "POST it with 'Content-Type: application/octet-stream' and ?base=MODEL&name=NAME.",
        param="path",
        code="path_not_allowed",
    )


def _card(state: AdapterState) -> dict[str, Any]:
    record = state.record
    return {
        "id": record.model_id,
        "object": "lora",
        **record.model_dump(mode="json"),
        "loaded": state.loaded,
        "in_use": state.in_use,
        "error": state.error,
    }


def _api_error(exc: Exception) -> APIError:
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), param="name", code="lora_not_found")
    if isinstance(exc, AdapterExistsError):
        return APIError(409, str(exc), param="name", code="lora_exists")
    if isinstance(exc, RegistryError):
        return APIError(404, str(exc), param="base", code="model_not_found")
    return APIError(400, str(exc), code="invalid_lora")


@router.get("")
async def list_adapters(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(s) for s in _sync(request).states()]}


@router.get("/{name}")
async def get_adapter(name: str, request: Request) -> dict[str, Any]:
    try:
        return _card(_sync(request).state(name))
    except AdapterStoreError as exc:
        raise _api_error(exc) from exc


async def _receive_upload(request: Request, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".upload-", suffix=".gguf", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                await asyncio.to_thread(fh.write, chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


@router.post("", status_code=201)
async def add_adapter(request: Request) -> JSONResponse:
    sync = _sync(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload: Path | None = None
    try:
        if content_type == "application/octet-stream":
            base, name = request.query_params.get("base"), request.query_params.get("name")
            if not base or not name:
                raise APIError(400, "An uploaded adapter needs ?base=<model>&name=<name>.", param="base")
            upload = await _receive_upload(request, sync.store.dir)
            body = AddAdapter(path=str(upload), base=base, name=name)
        else:
            try:
                body = AddAdapter.model_validate_json(await request.body())
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or None
                raise APIError(400, f"Invalid request: {where or 'body'}: {first['msg']}.", param=where) from exc
        source = upload if upload is not None else _allowed_path(request, body.path)
        state = await asyncio.to_thread(sync.add, source, base=body.base, name=body.name)
    except (AdapterStoreError, RegistryError) as exc:
        if upload is not None:  # say the name the client gave, not our temporary file's
            exc.args = (str(exc).replace(upload.name, f"'{request.query_params.get('name')}' (uploaded)"),)
        raise _api_error(exc) from exc
    finally:
        if upload is not None:
            with contextlib.suppress(OSError):
                upload.unlink()
    return JSONResponse(_card(state), status_code=201)


@router.delete("/{name}")
async def remove_adapter(name: str, request: Request) -> dict[str, Any]:
    try:
        gone = await asyncio.to_thread(_sync(request).remove, name)
    except AdapterStoreError as exc:
        raise _api_error(exc) from exc
    while not all(event.is_set() for event in gone):  # the requests using it are still running
        await asyncio.sleep(0.05)
    return {"id": name, "object": "lora", "deleted": True}
