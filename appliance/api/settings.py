"""``/v1/appliance/settings``: read and write the ``[server]`` table of ``config.toml`` over HTTP.

The desktop app may be attached to a server on another machine, so it cannot read the home
directory itself: this route is how its Settings screen and ``appliance --serve`` agree on one file.
``GET`` describes every setting (value, default, bounds, where the running value came from, what
the file says), built from ``Settings`` itself so a new setting shows up without touching this file.
``PUT`` validates the changed values merged with the file, in the words ``appliance.config`` uses
when the server starts (so a value refused here is one the next start would refuse too), then
writes the file atomically. Settings are read at start-up, so a change applies on the next start.
The API key is written but never sent back: a settings screen is often shared or screenshotted.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from appliance.api.edge import require_api_key
from appliance.api.errors import APIError

# The private helpers are imported on purpose: a value refused here must read exactly as it does
# when ``--serve`` reads the file, and these are where that wording lives.
from appliance.config import (
    _SECRETS,
    SERVER_TABLE,
    ConfigError,
    Paths,
    Settings,
    _closest,
    _from_file,
    _Given,
    _problem,
    _toml,
)

router = APIRouter(prefix="/v1/appliance/settings", dependencies=[Depends(require_api_key)])

SettingType = Literal["boolean", "integer", "number", "string", "array"]
DEFAULT_SOURCE = "default"
_CHOICES_PATTERN = re.compile(r"\^\(([\w|-]+)\)\$")  # a pattern like ^(debug|info)$ is a list of choices
_write_lock = threading.Lock()  # two saves at once must not interleave their read-modify-write


class SettingInfo(BaseModel):
    """One setting: what it is (from ``Settings``' JSON schema), its running value, and the file's."""

    name: str
    description: str
    type: SettingType
    items: SettingType | None = Field(None, description="The type of a list's items.")
    format: str | None = Field(None, description="'path' for a file or folder (also of a list's items).")
    nullable: bool = Field(description="Null (unset) is allowed: the server then picks (see the description).")
    choices: list[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    min_length: int | None = None
    pattern: str | None = None
    secret: bool = Field(description="Its value is never sent: only whether it is set.")
    default: JsonValue
    value: JsonValue = Field(description="The value the server runs with (null for a secret).")
    is_set: bool = Field(description="The running value is not null (for a secret, the only thing said about it).")
    source: str | None = Field(
        description="Where the running value came from: 'default', 'config.toml server.<name>', 'APPLIANCE_<NAME>' "
        "or a flag; null when this server does not know."
    )
    in_file: bool = Field(description="config.toml's [server] table has this setting.")
    file_value: JsonValue = Field(description="The value in config.toml (null when absent, or for a secret).")


class SettingsReport(BaseModel):
    """Every setting, and the file they are saved to."""

    file: str
    file_error: str | None = Field(description="Why config.toml cannot be read as it is (then nothing is in_file).")
    settings: list[SettingInfo]


class SettingsUpdate(BaseModel):
    """The settings to write; null removes a setting from the file (back to its default)."""

    model_config = ConfigDict(extra="forbid")

    values: dict[str, JsonValue]


class SettingsSaved(BaseModel):
    """What the file holds now, and what the change needs to apply."""

    file: str
    values: dict[str, JsonValue] = Field(description="config.toml's [server] table, secrets left out.")
    secrets_set: list[str] = Field(description="The secret settings the file holds (their values are not sent).")
    changed: list[str]
    restart_required: bool = Field(description="Settings are read at start-up: any change applies on the next one.")
    restart_settings: list[str] = Field(description="The changed settings that need a restart (all of them today).")
    overridden: dict[str, str] = Field(
        description="Changed settings that an environment variable or flag overrode when this server started, "
        "with which: the file's value applies only if that one is gone at the next start."
    )


def _paths(request: Request) -> Paths:
    paths: Paths | None = request.app.state.paths
    if paths is None:
        raise APIError(404, "this server was started without a home directory to save settings in", code="not_found")
    return paths


def _schema_facts(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The flat facts of one property of ``Settings``' JSON schema (a nullable one is an ``anyOf`` with null)."""
    variants = schema.get("anyOf", [schema])
    nullable = any(v.get("type") == "null" for v in variants)
    main: Mapping[str, Any] = next((v for v in variants if v.get("type") != "null"), {})
    items = main.get("items", {})
    pattern = main.get("pattern")
    choices = main.get("enum")
    match = _CHOICES_PATTERN.fullmatch(pattern) if pattern else None
    if choices is None and match:
        choices = match.group(1).split("|")
    return {
        "type": main.get("type", "string"),
        "items": items.get("type"),
        "format": main.get("format") or items.get("format"),
        "nullable": nullable,
        "choices": choices,
        "minimum": main.get("minimum"),
        "maximum": main.get("maximum"),
        "exclusive_minimum": main.get("exclusiveMinimum"),
        "exclusive_maximum": main.get("exclusiveMaximum"),
        "min_length": main.get("minLength"),
        "pattern": pattern,
    }


def _file_table(path: Path) -> tuple[dict[str, Any], str | None]:
    """The file's ``[server]`` table, or nothing and why (read the way the server reads it at start-up)."""
    try:
        return {name: given.value for name, given in _from_file(path).items()}, None
    except ConfigError as exc:
        return {}, str(exc)


@router.get("", response_model=SettingsReport)
def read_settings(request: Request) -> SettingsReport:
    """Every setting with its running value, default, bounds, source and the value saved in config.toml."""
    path = _paths(request).config_file
    sources: Mapping[str, str] | None = request.app.state.sources
    running = request.app.state.settings.model_dump(mode="json")
    defaults = Settings().model_dump(mode="json")
    properties = Settings.model_json_schema()["properties"]
    table, file_error = _file_table(path)
    infos = []
    for name, field in Settings.model_fields.items():
        secret = name in _SECRETS
        source = None if sources is None else sources.get(name, DEFAULT_SOURCE)
        infos.append(
            SettingInfo(
                name=name,
                description=field.description or "",
                secret=secret,
                default=None if secret else defaults[name],
                value=None if secret else running[name],
                is_set=running[name] is not None,
                source=source,
                in_file=name in table,
                file_value=None if secret else table.get(name),
                **_schema_facts(properties[name]),
            )
        )
    return SettingsReport(file=str(path), file_error=file_error, settings=infos)


def _shown(name: str, value: Any) -> str:
    return f"{name} = {'***' if name in _SECRETS else _toml(value)}"


def _validated(given: dict[str, _Given], values: Mapping[str, Any]) -> Settings:
    """The file's table with ``values`` merged in, as ``Settings``; refused in ``appliance.config``'s words."""
    merged = dict(given)
    for name, value in values.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = _Given(value, "request", _shown(name, value))
    try:
        return Settings(**{name: g.value for name, g in merged.items()})
    except ValidationError as exc:
        errors = exc.errors()
        param = next((str(e["loc"][0]) for e in errors if e["loc"]), None)
        message = "; ".join(_problem(e, merged) for e in errors)
        raise APIError(400, message, param=param, code="invalid_setting") from exc


def _write_atomically(path: Path, document: dict[str, Any], secret: bool) -> None:
    """Write the whole file through a temporary one and ``os.replace``: a crash leaves the old file or the new.

    A new file is private (mkstemp's 0600); an existing one keeps its mode, less group and other
    access once it holds a secret.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            tomli_w.dump(document, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode & ~0o077 if secret else mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@router.put("", response_model=SettingsSaved)
def write_settings(request: Request, update: SettingsUpdate) -> SettingsSaved:
    """Validate the values with the file's other settings, then save them in config.toml's ``[server]`` table."""
    path = _paths(request).config_file
    for name in update.values:
        if name not in Settings.model_fields:
            close = _closest(name, Settings.model_fields)
            hint = f" (did you mean {close}?)" if close else ""
            raise APIError(400, f"unknown setting {name!r}{hint}", param=name, code="unknown_setting")
    with _write_lock:
        try:
            given = _from_file(path)
            document = tomllib.loads(path.read_text("utf-8")) if path.exists() else {}
        except (ConfigError, OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            message = f"config.toml cannot be updated until it is fixed by hand: {exc}"
            raise APIError(400, message, code="invalid_config_file") from exc
        settings = _validated(given, update.values)
        normalized = settings.model_dump(mode="json")
        old: dict[str, Any] = document.get(SERVER_TABLE, {})
        new = {name: value for name, value in old.items() if update.values.get(name, value) is not None}
        new.update({name: normalized[name] for name, value in update.values.items() if value is not None})
        changed = [name for name in Settings.model_fields if old.get(name) != new.get(name)]
        if changed:
            document[SERVER_TABLE] = new
            _write_atomically(path, document, secret=any(name in new for name in _SECRETS))
    sources: Mapping[str, str] = request.app.state.sources or {}
    from_file = f"{path.name} "
    return SettingsSaved(
        file=str(path),
        values={name: value for name, value in new.items() if name not in _SECRETS},
        secrets_set=[name for name in _SECRETS if name in new],
        changed=changed,
        restart_required=bool(changed),
        restart_settings=changed,
        overridden={
            name: source
            for name in changed
            if (source := sources.get(name)) is not None and not source.startswith(from_file)
        },
    )
