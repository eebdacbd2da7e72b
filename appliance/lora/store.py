"""The adapter store: validated LoRA files in the app's home and a manifest that lists them.

``add`` refuses a wrong file before anything is written (see ``engines/gguflora.py``), then
copies it in while hashing it, and records it in ``loras/loras.json``. The manifest is rewritten
atomically under a file lock, so the CLI and a running server may both change the store; the
server notices a changed manifest and loads or drops adapters to match (``appliance/lora/sync.py``).
Adapter names are unique in the store; a request selects one as ``<base model>:<name>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from appliance.config import Paths
from appliance.modelstore import hash_stream
from engines.base import AdapterLoadError
from engines.gguflora import check_lora_fits, read_lora_info

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "loras.json"


class AdapterStoreError(Exception):
    """An adapter cannot be added, found or removed; the message says why."""


class AdapterExistsError(AdapterStoreError):
    pass


class AdapterNotFoundError(AdapterStoreError):
    pass


class AdapterRecord(BaseModel):
    """One stored adapter, as listed by ``appliance lora list`` and ``GET /v1/appliance/loras``."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=NAME_RE.pattern)
    base: str
    file: str  # inside the store directory
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    rank: int
    alpha: float | None
    targets: tuple[str, ...]
    size: int
    created: int  # unix time

    @property
    def model_id(self) -> str:
        return f"{self.base}:{self.name}"


def suggest_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name.removesuffix(".gguf")).strip("-._") or "adapter"
    return stem[:64]


class AdapterStore:
    """The adapters under ``<home>/loras``."""

    def __init__(self, paths: Paths) -> None:
        self.dir = paths.loras_dir
        self.manifest = self.dir / MANIFEST

    def version(self) -> tuple[int, int]:
        """Changes whenever the manifest is rewritten: a cheap check for a running server."""
        try:
            st = self.manifest.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_ino, st.st_mtime_ns)  # each rewrite is a new file: a new inode

    def records(self) -> list[AdapterRecord]:
        if not self.manifest.exists():
            return []
        try:
            data = json.loads(self.manifest.read_text("utf-8"))
            return [AdapterRecord.model_validate(item) for item in data.get("adapters", [])]
        except (OSError, ValueError, AttributeError) as exc:  # pydantic's ValidationError is a ValueError
            raise AdapterStoreError(f"cannot read the adapter list {self.manifest}: {exc}") from exc

    def get(self, name: str) -> AdapterRecord:
        for record in self.records():
            if record.name == name:
                return record
        known = ", ".join(r.name for r in self.records()) or "none"
        raise AdapterNotFoundError(f"no adapter named '{name}' (stored adapters: {known})")

    def path(self, record: AdapterRecord) -> Path:
        return self.dir / record.file

    def add(
        self, source: Path, *, base: str, base_file: Path, name: str | None = None, progress: bool = False
    ) -> AdapterRecord:
        """Validate ``source`` against the base model's file, copy it in, hash it, record it."""
        source = source.expanduser()
        name = name or suggest_name(source)
        if not NAME_RE.match(name):
            raise AdapterStoreError(
                f"invalid adapter name '{name}': use up to 64 letters, digits, '.', '_' or '-' (no ':')"
            )
        try:
            info = read_lora_info(source)
            check_lora_fits(info, source, base_file)
        except AdapterLoadError as exc:
            raise AdapterStoreError(str(exc)) from exc
        with self._locked():
            records = self.records()
            if any(r.name == name for r in records):
                raise AdapterExistsError(
                    f"an adapter named '{name}' already exists on this server; remove it first or choose another name"
                )
            target = self.dir / f"{name}.gguf"
            partial = target.with_suffix(".gguf.partial")
            try:
                with source.open("rb") as src, partial.open("wb") as dst:
                    digest = hash_stream(src, info.size, f"adding {source.name}", dst=dst, progress=progress)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            record = AdapterRecord(
                name=name,
                base=base,
                file=target.name,
                sha256=digest,
                rank=info.rank,
                alpha=info.alpha,
                targets=tuple(info.targets),
                size=info.size,
                created=int(time.time()),
            )
            self._write([*records, record])
        return record

    def remove(self, name: str) -> AdapterRecord:
        with self._locked():
            records = self.records()
            record = next((r for r in records if r.name == name), None)
            if record is None:
                raise AdapterNotFoundError(f"no adapter named '{name}'")
            self._write([r for r in records if r.name != name])
            self.path(record).unlink(missing_ok=True)
        return record

    def _write(self, records: list[AdapterRecord]) -> None:
        data: dict[str, Any] = {"version": 1, "adapters": [r.model_dump(mode="json") for r in records]}
        tmp = self.manifest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2), "utf-8")
        os.replace(tmp, self.manifest)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time across processes (the CLI beside a running server)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("a") as fh:
            try:
                import fcntl
            except ImportError:  # Windows: one writer is the common case; the rename stays atomic
                yield
                return
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
