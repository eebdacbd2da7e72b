"""Every setting of the server, once: typed, documented, bounded.

Precedence is defaults < ``config.toml`` in the app's home < ``APPLIANCE_*`` environment
variables < command-line flags. The home directory (platformdirs' user data dir, or
``APPLIANCE_HOME``) holds the user's ``models.toml``, the imported model files and ``config.toml``.

A typo must not pass for a setting left at its default: anything in ``config.toml`` other than a
setting in its ``[server]`` table fails with the closest setting's name, an unknown ``APPLIANCE_*``
variable is warned about, and an invalid value is reported where it was written (the file and
key, the variable, or the flag).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_data_dir
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

DEFAULT_PORT = 8484
ENV_PREFIX = "APPLIANCE_"


class ConfigError(Exception):
    """A setting is invalid; the message names the setting and where it came from."""


_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
FOREVER_WORDS = ("forever", "never", "-1")


def parse_duration(value: str | float | None) -> float | None:
    """A keep-alive as Ollama writes it, in seconds; ``None`` means forever.

    Seconds as a number (``300``), or ``30s``, ``5m``, ``1h30m``; a negative number, ``forever``
    or ``never`` keep the model loaded for good; ``0`` unloads it as soon as it is idle.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '5m'")
    if isinstance(value, int | float):
        return None if value < 0 else float(value)
    text = value.strip().lower()
    if text in FOREVER_WORDS or text.startswith("-"):
        return None
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION_RE.match(text)
    if not text or match is None:
        raise ValueError(f"{value!r} is not a duration: write seconds (300), '30s', '5m', '1h30m', or 'forever'")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class Settings(BaseModel):
    """Server settings. Field descriptions are the reference documentation (see docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on. Non-loopback addresses need an API key.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port (0 picks a free one).")
    socket: Path | None = Field(None, description="Also listen on this Unix domain socket (mode 0600).")
    api_key: str | None = Field(None, min_length=8, description="Require 'Authorization: Bearer <key>'.")
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names accepted in the Host header besides the loopback names (a DNS-rebinding guard; "
        "with an API key every host is accepted).",
    )
    allowed_origins: tuple[str, ...] = Field(
        (),
        description="Web origins (scheme://host[:port]) whose pages may call the API; others get 403. "
        "'*' allows every origin.",
    )
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
    embedding_threads: int = Field(
        1,
        ge=1,
        le=1024,
        description="CPU threads for /v1/embeddings (one request at a time): few, so chat decoding keeps its cores.",
    )
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
    lora_mixing: bool = Field(
        True,
        description="Apply each request's LoRA adapters to its own rows of a batch (CPU models), so requests on "
        "different adapters and on the base decode together, with answers equal to their solo ones; off: "
        "llama.cpp applies adapters per decode call, one adapter set at a time.",
    )
    lora_batching: bool = Field(
        False,
        description="Without lora_mixing (or on a GPU): decode requests on the same LoRA adapter together: faster, "
        "but an answer may then differ (near ties) from the one it gets alone; off, each adapter request decodes "
        "on its own.",
    )
    prefix_cache: bool = Field(True, description="Reuse a finished slot's KV cache for a prompt sharing its prefix.")
    speculative: Literal["off", "prompt-lookup", "auto"] | None = Field(
        None, description="Speculative decoding for every model; default: each model's own setting in models.toml."
    )
    keep_alive: str | None = Field(
        None,
        description="How long an idle model stays loaded ('5m', '1h', seconds, 'forever'; '0': unload when idle), "
        "for every model without its own keep_alive in models.toml. Default: the models started with the server "
        "stay; a model loaded on demand by a request is unloaded after 5 minutes idle.",
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
    lora_dirs: tuple[Path, ...] = Field(
        (),
        description="Folders from which POST /v1/appliance/loras may add an adapter by path; other paths are refused "
        "without saying whether they exist (upload the file instead).",
    )
    max_upload_mb: float = Field(
        4096, gt=0, description="Largest LoRA adapter accepted as an upload to /v1/appliance/loras, in MiB."
    )
    shutdown_timeout: float = Field(10.0, ge=0, le=3600, description="Seconds running streams get to finish on stop.")
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a client may take to send a request's headers before 408."
    )
    body_timeout: float = Field(
        10.0,
        gt=0,
        le=86_400,
        description="Seconds a request's body may stall (no data) before 408; a JSON body must also be whole "
        "within 120 s.",
    )
    verify_sha256: bool = Field(True, description="Check model files against models.toml (cached per file).")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="Server log level.")

    @model_validator(mode="after")
    def _batch_holds_every_slot(self) -> Settings:
        if self.batch_size is not None and self.parallel is not None and self.batch_size < self.parallel:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least parallel ({self.parallel})")
        return self

    @field_validator("keep_alive")
    @classmethod
    def _is_duration(cls, value: str | None) -> str | None:
        parse_duration(value)
        return value

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
    def responses_file(self) -> Path:
        """Responses kept for ``previous_response_id`` (``/v1/responses`` with ``store: true``)."""
        return self.home / "responses.sqlite"

    @property
    def loras_dir(self) -> Path:
        return self.home / "loras"

    @property
    def cache_dir(self) -> Path:
        """What can be recomputed: safe to delete at any time (the engines probe's last answer)."""
        return self.home / "cache"

    @property
    def verified_file(self) -> Path:
        return self.home / "verified.json"


def app_paths() -> Paths:
    home = os.environ.get(ENV_PREFIX + "HOME")
    return Paths(Path(home).expanduser() if home else Path(user_data_dir("appliance", appauthor=False)))


# APPLIANCE_* variables that are read elsewhere and are not settings: no "unknown variable" warning.
# CPU_VARIANT: engines.cpu_backends; the others are the single executable's launcher's
# (packaging/launcher): set by it for the program, or read by it before the program starts.
NON_SETTING_ENV = frozenset(
    ENV_PREFIX + name for name in ("HOME", "CPU_VARIANT", "EXECUTABLE", "UNPACKED", "UNPACK_DIR", "LAUNCHER_VERBOSE")
)
SERVER_TABLE = "server"
_LIST_FIELDS = ("models", "allowed_hosts", "allowed_origins")  # comma-separated in the environment
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_README_HINT = "the settings are listed in docs/configuration.md"
_SECRETS = ("api_key",)  # never repeated in a message: it may end up in a shared log or screenshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Given:
    """One setting's value as one source gave it."""

    value: Any
    source: str  # short, for reports: "config.toml server.threads", "APPLIANCE_THREADS", "--threads"
    shown: str  # as the user wrote it, for messages: "/home/u/.../config.toml: [server].threads = 0"


def _closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` was most likely meant to be (``ctx-size`` and ``CTX_SIZE`` find ``ctx_size``)."""
    close = difflib.get_close_matches(word.lower().replace("-", "_"), list(choices), n=1)
    return close[0] if close else None


def _toml(value: Any) -> str:
    """A value written the TOML way (close enough for a message)."""
    if isinstance(value, bool | str | int | float | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _file_problems(data: dict[str, Any]) -> list[str]:
    """Every key of ``config.toml`` that is not a setting in ``[server]``, with what was probably meant."""
    fields = Settings.model_fields
    problems = []
    for key, value in data.items():
        if key == SERVER_TABLE:
            if not isinstance(value, dict):
                problems.append(f"{key} must be a table: write [{SERVER_TABLE}] on a line above the settings")
        elif isinstance(value, dict):
            close = _closest(key, [SERVER_TABLE])
            hint = f"did you mean [{close}]?" if close else f"settings go in the [{SERVER_TABLE}] table"
            problems.append(f"unknown table [{key}] ({hint})")
        else:
            close = _closest(key, fields)
            hint = f"did you mean [{SERVER_TABLE}].{close}?" if close else f"settings go in [{SERVER_TABLE}]"
            problems.append(f"{key} is outside the [{SERVER_TABLE}] table ({hint})")
    server = data.get(SERVER_TABLE)
    for key in server if isinstance(server, dict) else {}:
        if key not in fields:
            close = _closest(key, fields)
            hint = f"did you mean {close}?" if close else _README_HINT
            problems.append(f"unknown setting [{SERVER_TABLE}].{key} ({hint})")
    return problems


def _from_file(path: Path) -> dict[str, _Given]:
    """The ``[server]`` table of ``config.toml``; any other key or table there is a typo and fails."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    problems = _file_problems(data)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return {
        key: _Given(
            value,
            f"{path.name} {SERVER_TABLE}.{key}",
            f"{path}: [{SERVER_TABLE}].{key} = {'***' if key in _SECRETS else _toml(value)}",
        )
        for key, value in data.get(SERVER_TABLE, {}).items()
    }


def _env_value(name: str, raw: str) -> Any:
    if name in _LIST_FIELDS:
        return tuple(m.strip() for m in raw.split(",") if m.strip())
    if name == "lora_dirs":  # folders, separated as in PATH
        return tuple(Path(d) for d in raw.split(os.pathsep) if d.strip())
    if name == "log_redact":  # one pattern per line: a regex may well contain commas
        return tuple(line for line in raw.splitlines() if line.strip())
    if Settings.model_fields[name].annotation is bool:
        word = raw.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else raw  # anything else fails validation
    return raw


def _from_env() -> dict[str, _Given]:
    """``APPLIANCE_<FIELD>`` variables; an unknown ``APPLIANCE_*`` one is most likely a typo and is warned about.

    Only a warning: the variable may be meant for another version of the appliance, or for a
    wrapper script, and the environment is shared by everything a shell starts.
    """
    fields = Settings.model_fields
    values: dict[str, _Given] = {}
    for var, raw in os.environ.items():
        if not var.startswith(ENV_PREFIX) or var in NON_SETTING_ENV:
            continue
        name = var.removeprefix(ENV_PREFIX).lower()
        if name not in fields:
            close = _closest(name, fields)
            hint = f" (did you mean {ENV_PREFIX}{close.upper()}?)" if close else ""
            log.warning("%s is not a setting and is ignored%s", var, hint)
            continue
        if raw == "":  # set but empty: as if unset
            continue
        shown = f"{var}={raw}" if raw.strip() and not any(c.isspace() for c in raw) else f"{var}={raw!r}"
        shown = f"{var}=***" if name in _SECRETS else shown
        values[name] = _Given(_env_value(name, raw), var, shown)
    return values


def _from_flags(overrides: Mapping[str, Any], flags: Mapping[str, str]) -> dict[str, _Given]:
    """Command-line values (None: not given); ``flags`` names the flag of each setting, else ``--name-with-dashes``."""
    fields = Settings.model_fields
    unknown = [name for name in overrides if name not in fields]
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(repr(name) for name in unknown)}")
    values = {}
    for name, value in overrides.items():
        if value is None:
            continue
        flag = flags.get(name) or "--" + name.replace("_", "-")
        if name in _SECRETS:
            shown = f"{flag} ***"
        elif isinstance(value, bool):
            shown = flag
        elif isinstance(value, tuple | list):
            shown = " ".join(f"{flag} {item}" for item in value)
        else:
            shown = f"{flag} {value}"
        values[name] = _Given(value, flag, shown)
    return values


def _reason(error: ErrorDetails) -> str:
    """Pydantic's complaint in the words of the settings ("must be at least 1")."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    bounds = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most"}
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        choices = re.fullmatch(r"\^\(([\w|]+)\)\$", str(ctx.get("pattern", "")))
        return f"must be {' or '.join(choices.group(1).split('|'))}" if choices else f"must match {ctx.get('pattern')}"
    if kind == "string_too_short":
        return f"must be at least {ctx.get('min_length')} characters long"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    plain = {
        "int_parsing": "must be a whole number",
        "int_from_float": "must be a whole number",
        "int_type": "must be a whole number",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "tuple_type": "must be a list",
        "path_type": "must be a path",
    }
    return plain.get(kind) or error["msg"][:1].lower() + error["msg"][1:]


def _problem(error: ErrorDetails, given: Mapping[str, _Given]) -> str:
    """One invalid value: where it was written, then what is wrong with it."""
    loc = error["loc"]
    reason = _reason(error)
    if not loc:  # a rule across settings: name where each setting it mentions came from
        named = [g.shown for name, g in given.items() if re.search(rf"\b{name}\b", reason)]
        return reason + (f" (from {', '.join(named)})" if named else "")
    name = str(loc[0])
    item = f"item {int(loc[1]) + 1} " if len(loc) > 1 and isinstance(loc[1], int) else ""
    where = given[name].shown if name in given else name
    return f"{where}: {item}{reason}"


def load_settings_with_sources(
    paths: Paths, overrides: Mapping[str, Any] | None = None, flags: Mapping[str, str] | None = None
) -> tuple[Settings, dict[str, str]]:
    """Merge the four sources, and say where each setting not left at its default came from.

    The sources map a field to ``config.toml server.<field>``, ``APPLIANCE_<FIELD>`` or its flag
    (``flags`` names the flags whose name is not the field's with dashes). They are returned
    beside the settings, not kept in them, so a ``Settings`` stays a plain value that compares
    equal however it was made. An invalid value fails with where it was written and why.
    """
    environment = _from_env()  # first: its warnings also show when the file then fails
    given = _from_file(paths.config_file)
    given.update(environment)
    given.update(_from_flags(overrides or {}, flags or {}))
    try:
        settings = Settings(**{name: g.value for name, g in given.items()})
    except ValidationError as exc:
        raise ConfigError("; ".join(_problem(e, given) for e in exc.errors())) from exc
    return settings, {name: g.source for name, g in given.items()}


def load_settings(paths: Paths, overrides: dict[str, Any] | None = None) -> Settings:
    """Merge the four sources; an invalid value fails naming where it was written."""
    return load_settings_with_sources(paths, overrides)[0]
