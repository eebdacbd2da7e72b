"""The user's model store: import GGUF files, register them, verify files before serving.

``import_model`` checks the file is a sound GGUF (header and tensor table, via the ``gguf``
package) *before* anything is copied, then copies and hashes in one pass with a progress bar and
adds an entry to the user's ``models.toml``. ``verify_model_file`` checks a file against its
registered sha256 once and remembers the result per (size, mtime), so a multi-GB model is not
re-hashed at every start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import tomli_w
from tqdm import tqdm

from appliance.config import Paths
from appliance.registry import MODEL_ID_RE, ModelSpec, RegistryError, load_registry
from engines import formats
from engines.base import ModelLoadError
from engines.ggufmeta import read_gguf_info

CHUNK = 1 << 20
Progress = Callable[[int], None]


class ModelFileError(Exception):
    """A model file is missing, damaged or not the registered one."""


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm[Any]:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled, leave=False)


def hash_stream(src: BinaryIO, total: int, desc: str, *, dst: BinaryIO | None = None, progress: bool = True) -> str:
    digest = hashlib.sha256()
    with _progress_bar(total, desc, progress) as bar:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            if dst is not None:
                dst.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def sha256_file(path: Path, *, progress: bool = True) -> str:
    with path.open("rb") as fh:
        return hash_stream(fh, path.stat().st_size, f"sha256 {path.name}", progress=progress)


def sha256_path(path: Path, *, progress: bool = True) -> str:
    """A file's sha256; a model folder's is that of its manifest, a "sha256  name" line per file."""
    if not path.is_dir():
        return sha256_file(path, progress=progress)
    lines = [f"{sha256_file(f, progress=progress)}  {f.name}\n" for f in formats.folder_files(path)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def path_size(path: Path) -> int:
    """A file's size, or the sum of a model folder's files."""
    if path.is_dir():
        return sum(f.stat().st_size for f in formats.folder_files(path))
    return path.stat().st_size


def suggest_id(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem.lower()).strip("-.") or "model"
    return stem[:128]


def import_model(paths: Paths, source: Path, model_id: str | None = None, *, progress: bool = True) -> ModelSpec:
    """Validate, copy into the store, hash, and register a GGUF file (as an embedding model if it is one)."""
    source = source.expanduser()
    if source.is_dir():  # a converted ONNX model is a folder
        from appliance.modelconvert import import_folder

        return import_folder(paths, source, model_id, progress=progress)
    try:
        info = read_gguf_info(source)
    except ModelLoadError as exc:
        raise ModelFileError(str(exc)) from exc
    if info.general_type == "adapter":
        raise ModelFileError(f"{source} is a LoRA adapter, not a model: it is added with `appliance lora add`")
    model_id = model_id or suggest_id(source)
    if not MODEL_ID_RE.match(model_id):
        raise ModelFileError(f"invalid model id '{model_id}': use letters, digits, '.', '_', ':' or '-'")
    registry = load_registry(paths)
    if model_id in registry:
        raise ModelFileError(f"a model named '{model_id}' already exists; choose another with --id")
    paths.models_dir.mkdir(parents=True, exist_ok=True)
    target = paths.models_dir / f"{model_id}.gguf"
    partial = target.with_suffix(".gguf.partial")
    try:
        with source.open("rb") as src, partial.open("wb") as dst:
            digest = hash_stream(src, source.stat().st_size, f"importing {source.name}", dst=dst, progress=progress)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    spec = ModelSpec(
        id=model_id,
        engine="gguf",
        kind="embedding" if info.is_embedding_model else "chat",
        path=target.name,
        sha256=digest,
        size_bytes=target.stat().st_size,
        context_length=info.context_length,
        quantization=info.file_type,
        architecture=info.architecture,
        description=info.name,
        source=str(paths.models_file),
    )
    add_to_user_registry(paths, spec)
    remember_verified(paths, target, digest)
    return spec


def add_to_user_registry(paths: Paths, spec: ModelSpec) -> None:
    data: dict[str, Any] = {}
    if paths.models_file.exists():
        data = tomllib.loads(paths.models_file.read_text("utf-8"))
    unset = {"matryoshka"} if not spec.matryoshka else set()  # only embedding models can say true
    entry = spec.model_dump(exclude_none=True, exclude={"id", "source", "sampling", "aliases", *unset})
    sampling = spec.sampling.model_dump(exclude_none=True)
    if sampling:  # a converted model keeps its source's defaults
        entry["sampling"] = sampling
    data.setdefault("models", {})[spec.id] = entry
    paths.home.mkdir(parents=True, exist_ok=True)
    tmp = paths.models_file.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(data), "utf-8")
    os.replace(tmp, paths.models_file)


def _verified_cache(paths: Paths) -> dict[str, Any]:
    try:
        data = json.loads(paths.verified_file.read_text("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _file_key(path: Path) -> str:
    if path.is_dir():
        return ";".join(f"{f.name}:{_file_key(f)}" for f in formats.folder_files(path))
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def remember_verified(paths: Paths, path: Path, digest: str) -> None:
    cache = _verified_cache(paths)
    cache[str(path.resolve())] = {"key": _file_key(path), "sha256": digest}
    paths.home.mkdir(parents=True, exist_ok=True)
    tmp = paths.verified_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cache, indent=1), "utf-8")
    os.replace(tmp, paths.verified_file)


def verify_model_file(paths: Paths, spec: ModelSpec, *, check_sha256: bool = True, progress: bool = True) -> Path:
    """Return the spec's file (or ONNX folder) after checking it exists, is sound and matches its sha256."""
    try:
        path = spec.resolve_file(paths.models_dir)
    except RegistryError as exc:
        raise ModelFileError(str(exc)) from exc
    if not path.exists():
        raise ModelFileError(f"model '{spec.id}': file {path} does not exist")
    if path.is_dir():
        try:
            formats.check_model(path, spec.engine)
        except ModelLoadError as exc:
            raise ModelFileError(f"model '{spec.id}': {exc}") from exc
    elif not path.is_file():
        raise ModelFileError(f"model '{spec.id}': {path} is not a regular file")
    if spec.size_bytes is not None and path_size(path) != spec.size_bytes:
        raise ModelFileError(
            f"model '{spec.id}': {'folder' if path.is_dir() else 'file'} {path} has {path_size(path)} bytes, "
            f"models.toml says "
            f"{spec.size_bytes}: the file is truncated or was replaced"
        )
    if check_sha256 and spec.sha256:
        cached = _verified_cache(paths).get(str(path.resolve()), {})
        if cached.get("key") == _file_key(path) and cached.get("sha256") == spec.sha256:
            return path
        digest = sha256_path(path, progress=progress)
        if digest != spec.sha256:
            raise ModelFileError(
                f"model '{spec.id}': {'folder' if path.is_dir() else 'file'} {path} is corrupt or was replaced "
                f"(sha256 {digest[:16]}…, expected {spec.sha256[:16]}…)"
            )
        remember_verified(paths, path, digest)
    return path
