"""Models that are folders: a GGUF of the store converted to ONNX, or such a folder imported.

``appliance models convert MODEL --to onnx`` runs the converter (``engines.onnx.convert``: gguf,
numpy and onnx only, no PyTorch) into a hidden folder of the store, moves it into place only
once it is complete, hashes it and registers it as a new model, so the default install serves
its default model through ONNX with no download. A folder's sha256 is that of its manifest
(``modelstore.sha256_path``), checked at start-up as a file's is.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from appliance.config import Paths
from appliance.modelstore import (
    ModelFileError,
    add_to_user_registry,
    check_new_id,
    path_size,
    refuse_duplicate,
    remember_verified,
    sha256_path,
    suggest_id,
    verify_model_file,
)
from appliance.registry import ModelSpec, RegistryError, load_registry
from engines import formats
from engines.base import ModelLoadError
from engines.onnx.convert import ConversionError, OnnxModelConfig, convert

TARGETS = ("onnx",)
PRECISIONS = ("int4", "fp32")


def _new_id(paths: Paths, model_id: str) -> None:
    check_new_id(paths, model_id)
    if (paths.models_dir / model_id).exists():
        raise ModelFileError(f"{paths.models_dir / model_id} already exists; choose another id with --id")


def convert_model(
    paths: Paths,
    name: str,
    *,
    to: str = "onnx",
    precision: str = "int4",
    model_id: str | None = None,
    progress: bool = True,
) -> ModelSpec:
    """Convert the GGUF model ``name`` of the registry and register the result."""
    if to not in TARGETS:
        raise ModelFileError(f"cannot convert to '{to}' (known: {', '.join(TARGETS)})")
    if precision not in PRECISIONS:
        raise ModelFileError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    try:
        source = load_registry(paths).get(name)
    except RegistryError as exc:
        raise ModelFileError(str(exc)) from exc
    if source.engine != "gguf" or source.kind != "chat":
        raise ModelFileError(f"'{source.id}' is not a GGUF chat model: only those convert to ONNX")
    model_id = model_id or f"{source.id}-onnx-{precision}"
    _new_id(paths, model_id)
    gguf_file = verify_model_file(paths, source, progress=progress)
    if importlib.util.find_spec("onnx") is None:  # imported only once the graph is written
        if getattr(sys, "frozen", False):
            raise ModelFileError(
                "this single executable leaves the converter out (the onnx package, 31 MB): convert with the "
                "pip-installed appliance, then copy the folder here and `appliance models import FOLDER`"
            )
        raise ModelFileError("the converter needs the onnx package: pip install onnx")
    bar: tqdm[Any] = tqdm(desc=f"converting {source.id}", unit="step", disable=not progress, leave=False)

    def report(step: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(step)
        bar.n = done
        bar.refresh()

    def write(partial: Path) -> OnnxModelConfig:
        with bar:
            return convert(gguf_file, partial, precision=precision, progress=report)

    try:
        target, config = _into_store(paths, model_id, write)
    except ConversionError as exc:
        raise ModelFileError(f"cannot convert '{source.id}': {exc}") from exc
    description = f"{source.id} converted to ONNX ({precision}, from {config.quantization})"
    return _register(
        paths,
        target,
        config,
        progress,
        description=description,
        license=source.license,
        chat_template=source.chat_template,
        sampling=source.sampling,  # the same default answers as the GGUF it came from
        speculative=source.speculative,
        draft_max=source.draft_max,
    )


def import_folder(
    paths: Paths, source: Path, model_id: str | None, *, link: bool = False, progress: bool = True
) -> ModelSpec:
    """Copy a converted ONNX folder into the store (or, with ``link``, record where it lies) and register it."""
    if (source / "genai_config.json").is_file() and not (source / "tokenizer.gguf").is_file():
        raise ModelFileError(
            f"{source} is an onnxruntime-genai model folder: the ONNX engine serves folders written by "
            "`appliance models convert` (it tokenizes with the GGUF's own vocabulary); import the GGUF "
            "and convert it instead"
        )
    try:
        formats.check_model(source, "onnx")
        config = OnnxModelConfig.read(source)
    except ModelLoadError as exc:
        raise ModelFileError(str(exc)) from exc
    model_id = model_id or suggest_id(source.resolve())
    description = f"{config.source} as ONNX ({config.precision})"
    if link:
        check_new_id(paths, model_id)
        return _register(paths, source.resolve(), config, progress, model_id=model_id, description=description)
    _new_id(paths, model_id)
    refuse_duplicate(paths, sha256_path(source, progress=progress), source)

    def copy(partial: Path) -> OnnxModelConfig:
        for file in formats.folder_files(source):
            shutil.copy2(file, partial / file.name)
        return config

    target, _ = _into_store(paths, model_id, copy)
    return _register(paths, target, config, progress, description=description)


def _into_store(paths: Paths, model_id: str, write: Callable[[Path], OnnxModelConfig]) -> tuple[Path, OnnxModelConfig]:
    """Write the folder under a private temporary name, then move it into place whole."""
    paths.models_dir.mkdir(parents=True, exist_ok=True)
    target = paths.models_dir / model_id
    partial = Path(tempfile.mkdtemp(dir=paths.models_dir, prefix=f".{model_id}.", suffix=".partial"))
    try:
        config = write(partial)
        try:
            partial.rename(target)
        except OSError as exc:  # another import or conversion took the name meanwhile
            raise ModelFileError(f"cannot move the model into {target}: {exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, config


def _register(
    paths: Paths, folder: Path, config: OnnxModelConfig, progress: bool, model_id: str | None = None, **fields: Any
) -> ModelSpec:
    """Hash the folder (in the store, or linked where it lies) and add it to the user's models.toml."""
    digest = sha256_path(folder, progress=progress)
    if model_id is not None:  # linked: a folder outside the store, by its absolute path
        refuse_duplicate(paths, digest, folder)
    spec = ModelSpec(
        id=model_id or folder.name,
        engine="onnx",
        path=str(folder) if model_id is not None else folder.name,
        sha256=digest,
        size_bytes=path_size(folder),
        context_length=config.n_ctx_train,
        quantization=f"onnx-{config.precision}",
        architecture=config.architecture,
        source=str(paths.models_file),
        **fields,
    )
    add_to_user_registry(paths, spec)
    remember_verified(paths, folder, digest)
    return spec
