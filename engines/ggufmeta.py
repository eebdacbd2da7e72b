"""Read a GGUF file's header with the ``gguf`` package, without loading the model.

Importing a model must reject a wrong or damaged file *before* it is copied into the store and
long before llama.cpp tries to map it; the header also gives the facts we record in the
registry (architecture, trained context, quantisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import ModelLoadError
from engines.gguf import check_gguf_file


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    name: str | None
    file_type: str | None
    context_length: int | None
    has_chat_template: bool
    general_type: str | None
    tensor_count: int


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def open_reader(path: Path) -> Any:
    """A ``GGUFReader`` of a sound, complete GGUF file; ``ModelLoadError`` says what is wrong."""
    check_gguf_file(path)
    import gguf  # lazy: only the import path of the CLI needs it

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on damage
        raise ModelLoadError(path, f"corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelLoadError(path, f"truncated: tensor {tensor.name} needs bytes up to {end}, file has {size}")
    return reader


def read_gguf_info(path: Path) -> GgufInfo:
    """Parse the header and tensor table; raise ``ModelLoadError`` saying what is wrong."""
    import gguf

    reader = open_reader(path)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(path, "no general.architecture in its metadata")
    file_type = _field(reader, "general.file_type")
    try:
        ftype = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        ftype = str(file_type)
    ctx = _field(reader, f"{arch}.context_length")
    return GgufInfo(
        architecture=arch,
        name=_field(reader, "general.name"),
        file_type=ftype,
        context_length=int(ctx) if ctx is not None else None,
        has_chat_template="tokenizer.chat_template" in reader.fields,
        general_type=_field(reader, "general.type"),
        tensor_count=len(reader.tensors),
    )
