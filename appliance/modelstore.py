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
import shutil
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


def import_model(
    paths: Paths, source: Path, model_id: str | None = None, *, link: bool = False, progress: bool = True
) -> ModelSpec:
    """Validate and register a GGUF file (as an embedding model if it is one) or a converted ONNX folder.

    The file is copied into the store and hashed in one pass; with ``link`` it is hashed where it
    lies and recorded by its absolute path (never copied, never deleted by the appliance). A file
    whose sha256 a registered model already has is not added again: ``DuplicateModelError`` names it.
    """
    source = source.expanduser()
    if source.is_dir():  # a converted ONNX model is a folder
        from appliance.modelconvert import import_folder

        return import_folder(paths, source, model_id, link=link, progress=progress)
    try:
        info = read_gguf_info(source)
    except ModelLoadError as exc:
        raise ModelFileError(str(exc)) from exc
    if info.general_type == "adapter":
        raise ModelFileError(f"{source} is a LoRA adapter, not a model: it is added with `appliance lora add`")
    model_id = model_id or suggest_id(source)
    check_new_id(paths, model_id)
    size = source.stat().st_size
    # only a model of the same size can hold the same bytes: otherwise copy and hash in one pass
    same_size = [s for s in _stored(paths) if s.size_bytes == size]
    digest: str | None = None
    if link or same_size:  # hash first: a duplicate is found before anything is copied
        digest = sha256_file(source, progress=progress)
        _refuse(same_size, digest, source)
    if link:
        target = source.resolve()
    else:
        paths.models_dir.mkdir(parents=True, exist_ok=True)
        target = paths.models_dir / f"{model_id}.gguf"
        partial = target.with_suffix(".gguf.partial")
        try:
            with source.open("rb") as src, partial.open("wb") as dst:
                copied = hash_stream(src, size, f"importing {source.name}", dst=dst, progress=progress)
            if digest is not None and copied != digest:
                raise ModelFileError(f"{source} changed while it was imported; import it again")
            digest = copied
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    assert digest is not None  # hashed before linking, or while copying
    spec = ModelSpec(
        id=model_id,
        engine="gguf",
        kind="embedding" if info.is_embedding_model else "chat",
        path=str(target) if link else target.name,
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


class DuplicateModelError(ModelFileError):
    """The file is already registered (same sha256) under another id."""

    def __init__(self, source: Path, existing: ModelSpec) -> None:
        super().__init__(
            f"{source} is already in the store as '{existing.id}' (same sha256): it was not added again; "
            f"serve it with --model {existing.id}"
        )
        self.existing = existing


def _stored(paths: Paths) -> list[ModelSpec]:
    """The user's own models (imported, linked, converted), which a new import must not repeat."""
    return [s for s in load_registry(paths) if s.source == str(paths.models_file) and s.sha256]


def refuse_duplicate(paths: Paths, digest: str, source: Path) -> None:
    _refuse(_stored(paths), digest, source)


def _refuse(candidates: list[ModelSpec], digest: str, source: Path) -> None:
    existing = next((s for s in candidates if s.sha256 == digest), None)
    if existing is not None:
        raise DuplicateModelError(source, existing)


def check_new_id(paths: Paths, model_id: str) -> None:
    if not MODEL_ID_RE.match(model_id):
        raise ModelFileError(f"invalid model id '{model_id}': use letters, digits, '.', '_', ':' or '-'")
    if model_id in load_registry(paths):
        raise ModelFileError(f"a model named '{model_id}' already exists; choose another with --id")


def link_folder(paths: Paths, folder: Path, *, progress: bool = True) -> tuple[list[ModelSpec], list[str]]:
    """Link every GGUF model under ``folder`` (and converted ONNX folders): (added, why others were not)."""
    added: list[ModelSpec] = []
    skipped: list[str] = []
    candidates = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".gguf" or (p / "model.onnx").is_file())
    for path in candidates:
        if any(parent in candidates for parent in path.parents):
            continue  # the tokenizer.gguf of a converted folder
        try:
            added.append(import_model(paths, path, link=True, progress=progress))
        except ModelFileError as exc:
            skipped.append(str(exc))
    return added, skipped


def remove_model(paths: Paths, name: str) -> tuple[ModelSpec, Path | None]:
    """Unregister a model of the user's models.toml; delete its file or folder if it is in the store.

    Returns the spec and what was deleted: nothing for a linked file, which stays where it lies.
    """
    try:
        spec = load_registry(paths).get(name)
    except RegistryError as exc:
        raise ModelFileError(str(exc)) from exc
    if spec.source != str(paths.models_file):
        raise ModelFileError(f"'{spec.id}' is defined in {spec.source}, not in your models.toml: it cannot be removed")
    path = spec.resolve_file(paths.models_dir)
    in_store = path.resolve().parent == paths.models_dir.resolve()
    data = _user_registry(paths)
    data.get("models", {}).pop(spec.id, None)
    if data.get("default_model") == spec.id:
        del data["default_model"]
    _write_user_registry(paths, data)
    cache = _verified_cache(paths)
    if cache.pop(str(path.resolve()), None) is not None:
        _write_verified(paths, cache)
    if not in_store or not path.exists():
        return spec, None
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return spec, path


def _user_registry(paths: Paths) -> dict[str, Any]:
    return tomllib.loads(paths.models_file.read_text("utf-8")) if paths.models_file.exists() else {}


def _write_user_registry(paths: Paths, data: dict[str, Any]) -> None:
    paths.home.mkdir(parents=True, exist_ok=True)
    tmp = paths.models_file.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(data), "utf-8")
    os.replace(tmp, paths.models_file)


def add_to_user_registry(paths: Paths, spec: ModelSpec) -> None:
    data = _user_registry(paths)
    unset = {"matryoshka"} if not spec.matryoshka else set()  # only embedding models can say true
    entry = spec.model_dump(exclude_none=True, exclude={"id", "source", "sampling", "aliases", *unset})
    sampling = spec.sampling.model_dump(exclude_none=True)
    if sampling:  # a converted model keeps its source's defaults
        entry["sampling"] = sampling
    data.setdefault("models", {})[spec.id] = entry
    _write_user_registry(paths, data)


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
    _write_verified(paths, cache)


def _write_verified(paths: Paths, cache: dict[str, Any]) -> None:
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
    linked = spec.path is not None and Path(spec.path).expanduser().is_absolute()
    relink = (
        f"; if it moved: appliance models remove {spec.id} && appliance models import NEW-PATH --link --id {spec.id}"
        if linked
        else ""
    )
    if not path.exists():
        if linked:
            raise ModelFileError(f"model '{spec.id}' is linked to {path}, which is gone (moved or deleted){relink}")
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
            f"models.toml says {spec.size_bytes}: the file is truncated or was replaced{relink}"
        )
    if check_sha256 and spec.sha256:
        cached = _verified_cache(paths).get(str(path.resolve()), {})
        if cached.get("key") == _file_key(path) and cached.get("sha256") == spec.sha256:
            return path
        digest = sha256_path(path, progress=progress)
        if digest != spec.sha256:
            raise ModelFileError(
                f"model '{spec.id}': {'folder' if path.is_dir() else 'file'} {path} is corrupt or was replaced "
                f"(sha256 {digest[:16]}…, expected {spec.sha256[:16]}…){relink}"
            )
        remember_verified(paths, path, digest)
    return path
