"""Every setting of the server, once: typed, documented, bounded.

Precedence is defaults < ``config.toml`` in the app's home < ``APPLIANCE_*`` environment
variables < command-line flags. The home directory (platformdirs' user data dir, or
``APPLIANCE_HOME``) holds the user's ``models.toml``, the imported model files and ``config.toml``.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_data_dir
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PORT = 8484
ENV_PREFIX = "APPLIANCE_"


class ConfigError(Exception):
    """A setting is invalid; the message names the setting and where it came from."""


class Settings(BaseModel):
    """Server settings. Field descriptions are the reference documentation (see README)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on. Non-loopback addresses need an API key.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port (0 picks a free one).")
    socket: Path | None = Field(None, description="Also listen on this Unix domain socket (mode 0600).")
    api_key: str | None = Field(None, min_length=8, description="Require 'Authorization: Bearer <key>'.")
    models: tuple[str, ...] = Field((), description="Model ids (or aliases) to load; default: the default model.")
    ctx_size: int | None = Field(
        None,
        ge=128,
        le=1 << 20,
        description="Context length of each slot, in tokens; default 4096, reduced by the planner if memory is short.",
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Sequence slots per model (concurrent generations); default: planned (8-16 CPU, 16 GPU).",
    )
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads; default: the usable physical cores.")
    batch_size: int | None = Field(
        None, ge=128, le=16384, description="Max tokens per decode step (prompt chunk size); default 512."
    )
    device: Literal["auto", "cpu", "cuda", "rocm", "metal", "vulkan"] = Field(
        "auto", description="Where models run: auto picks CUDA > ROCm > Metal > Vulkan > CPU among what the build has."
    )
    gpu_layers: int | None = Field(
        None, ge=-1, description="Layers offloaded to the GPU (-1: all); default: as many as fit in free VRAM."
    )
    probe_timeout: float = Field(
        15.0, gt=0, le=600, description="Seconds a hardware probe may take before it is killed and reported."
    )
    max_queue: int = Field(64, ge=0, le=100_000, description="Requests that may wait for a slot before 503.")
    queue_timeout: float = Field(
        60.0, gt=0, le=86_400, description="Seconds a request may wait for a slot before it fails with 503."
    )
    flash_attn: bool = Field(
        True, description="Flash attention: faster batches; off makes solo and batched answers identical at any length."
    )
    lora_batching: bool = Field(
        False,
        description="Decode requests on the same LoRA adapter together: faster, but an answer may then differ "
        "(near ties) from the one it gets alone; off, each adapter request decodes on its own.",
    )
    prefix_cache: bool = Field(True, description="Reuse a finished slot's KV cache for a prompt sharing its prefix.")
    speculative: Literal["off", "prompt-lookup"] | None = Field(
        None, description="Speculative decoding for every model; default: each model's own setting in models.toml."
    )
    log_requests: bool = Field(True, description="Record every exchange in the request log (SQLite) for fine-tuning.")
    log_file: Path | None = Field(None, description="The request log database; default: requests.sqlite in the home.")
    log_redact: tuple[str, ...] = Field(
        (), description="Extra regular expressions whose matches are redacted before a record is written."
    )
    log_redact_builtin: bool = Field(
        True, description="Redact e-mail addresses, bearer tokens and API keys before a record is written."
    )
    log_max_age_days: float | None = Field(None, gt=0, description="Delete logged exchanges older than this.")
    log_max_rows: int | None = Field(None, ge=1, description="Keep at most this many logged exchanges.")
    log_max_mb: float | None = Field(None, gt=0, description="Keep the request log under this many MiB.")
    log_buffer: int = Field(
        10_000, ge=1, description="Records kept in memory while the log cannot be written; beyond, dropped."
    )
    max_body_bytes: int = Field(8 << 20, ge=1024, description="Largest accepted request body; larger gets 413.")
    max_upload_mb: float = Field(
        4096, gt=0, description="Largest LoRA adapter accepted as an upload to /v1/appliance/loras, in MiB."
    )
    shutdown_timeout: float = Field(10.0, ge=0, le=3600, description="Seconds running streams get to finish on stop.")
    verify_sha256: bool = Field(True, description="Check model files against models.toml (cached per file).")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="Server log level.")

    @model_validator(mode="after")
    def _batch_holds_every_slot(self) -> Settings:
        if self.batch_size is not None and self.parallel is not None and self.batch_size < self.parallel:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least parallel ({self.parallel})")
        return self

    @field_validator("log_redact")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from exc
        return patterns

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")


@dataclass(frozen=True)
class Paths:
    """Where the appliance keeps the user's state."""

    home: Path

    @property
    def models_file(self) -> Path:
        return self.home / "models.toml"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def log_file(self) -> Path:
        return self.home / "requests.sqlite"

    @property
    def loras_dir(self) -> Path:
        return self.home / "loras"

    @property
    def verified_file(self) -> Path:
        return self.home / "verified.json"


def app_paths() -> Paths:
    home = os.environ.get(ENV_PREFIX + "HOME")
    return Paths(Path(home).expanduser() if home else Path(user_data_dir("appliance", appauthor=False)))


def _from_env() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is None or raw == "":
            continue
        if name == "models":
            values[name] = tuple(m.strip() for m in raw.split(",") if m.strip())
        elif name == "log_redact":  # one pattern per line: a regex may well contain commas
            values[name] = tuple(line for line in raw.splitlines() if line.strip())
        elif field.annotation is bool:
            values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            values[name] = raw
    return values


def load_settings(paths: Paths, overrides: dict[str, Any] | None = None) -> Settings:
    """Merge the four sources; an invalid value fails with the setting's name."""
    merged: dict[str, Any] = {}
    if paths.config_file.exists():
        try:
            merged.update(tomllib.loads(paths.config_file.read_text("utf-8")).get("server", {}))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{paths.config_file}: {exc}") from exc
    merged.update(_from_env())
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings(**merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid setting: {problems}") from exc
