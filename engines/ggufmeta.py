"""Read a GGUF file's header with the ``gguf`` package, without loading the model.

Importing a model must reject a wrong or damaged file *before* it is copied into the store and
long before llama.cpp tries to map it; the header also gives the facts we record in the
registry (architecture, trained context, quantisation).
"""

from __future__ import annotations

import functools
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import ModelLoadError, ModelShape
from engines.gguf import GGUF_MAGIC, check_gguf_file

# GGUF value types -> struct format of a scalar (8: string, 9: array; see gguf.GGUFValueType)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SMALL_ARRAY = 4096  # numeric arrays up to this length are kept (per-layer head counts); longer ones skipped
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]  # GGUF's order: the input dimension first
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int  # up to the next tensor (alignment padding included)


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata (scalars, strings, short numeric arrays) and tensor table."""

    metadata: dict[str, Any]
    tensors: dict[str, TensorEntry]
    file_size: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else ""


def read_header(path: Path) -> GgufHeader:
    """The header of a GGUF v2+ file, read directly (cached per file version).

    ``GGUFReader`` maps every metadata array into numpy first: 2.6 s for the default model's
    tokenizer, paid at every start-up and by the first adapter added to a running server.
    Skipping the long arrays takes a few milliseconds. ``ModelLoadError`` says what is wrong.
    """
    check_gguf_file(path)
    try:
        stat = path.stat()
        return _read_header(str(path), stat.st_mtime_ns, stat.st_size)
    except ModelLoadError:
        raise
    except (OSError, struct.error, UnicodeError, KeyError, ValueError) as exc:
        raise ModelLoadError(path, f"cannot read its GGUF header ({type(exc).__name__}: {exc})") from exc


class _Cursor:
    """Reads little-endian GGUF values from a mapped file, skipping what is not kept."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def read(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, keep: bool = True) -> str | None:
        n = self.read("Q")
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos]).decode("utf-8", "replace") if keep else None

    def value(self, vtype: int, keep: bool = True) -> Any:
        if vtype == 8:
            return self.string(keep)
        if vtype != 9:
            return self.read(_SCALARS[vtype])
        etype, n = self.read("I"), self.read("Q")
        keep = keep and n <= _SMALL_ARRAY
        if etype in _SCALARS:
            fmt = f"<{n}{_SCALARS[etype]}"
            items = struct.unpack_from(fmt, self.data, self.pos) if keep else None
            self.pos += struct.calcsize(fmt)
            return items
        if etype == 8 and not keep:  # a vocabulary: ~100k strings to step over on every start, so inline
            data, pos, length = self.data, self.pos, struct.Struct("<Q").unpack_from
            for _ in range(n):
                pos += 8 + length(data, pos)[0]
            self.pos = pos
            return None
        values = [self.value(etype, keep) for _ in range(n)]
        return tuple(values) if keep else None


@functools.lru_cache(maxsize=16)
def _read_header(path: str, _mtime_ns: int, size: int) -> GgufHeader:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cur = _Cursor(data)
        if data[:4] != GGUF_MAGIC or struct.unpack_from("<I", data, 4)[0] < 2:
            raise ModelLoadError(path, "not a GGUF v2+ file")
        cur.pos = 8
        n_tensors, n_kv = cur.read("Q"), cur.read("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.read("I")
            item = cur.value(vtype)
            if item is not None and key is not None:
                metadata[key] = item
        table = []
        for _ in range(n_tensors):
            name, n_dims = cur.string() or "", cur.read("I")
            shape = tuple(cur.read("Q") for _ in range(n_dims))
            table.append((name, shape, cur.read("I"), cur.read("Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
    ends = [*sorted({offset for *_, offset in table}), size - data_start]
    nxt = {offset: ends[i + 1] for i, offset in enumerate(ends[:-1])}
    tensors = {name: TensorEntry(shape, kind, offset, nxt[offset] - offset) for name, shape, kind, offset in table}
    return GgufHeader(metadata, tensors, size)


def _per_layer(value: Any, n_layer: int) -> tuple[int, ...]:
    if isinstance(value, tuple):
        return tuple(int(v) for v in value[:n_layer])
    return (int(value),) * n_layer


def model_shape(path: Path) -> ModelShape:
    """The sizes the hardware planner needs, from the header alone (no model load)."""
    header = read_header(path)
    md, arch = header.metadata, header.architecture
    n_layer = md.get(f"{arch}.block_count")
    n_embd = md.get(f"{arch}.embedding_length")
    if not arch or not isinstance(n_layer, int) or not isinstance(n_embd, int):
        raise ModelLoadError(path, "its metadata lacks the architecture, block count or embedding length")
    heads = _per_layer(md.get(f"{arch}.attention.head_count", 0), n_layer)
    kv_heads = _per_layer(md.get(f"{arch}.attention.head_count_kv", heads), n_layer)
    key_len = md.get(f"{arch}.attention.key_length")
    value_len = md.get(f"{arch}.attention.value_length", key_len)
    per_layer_kv = []
    for i in range(n_layer):
        k = int(key_len) if key_len else (n_embd // heads[i] if heads[i] else 0)
        v = int(value_len) if value_len else k
        per_layer_kv.append((k + v) * kv_heads[i] * 2)  # f16 K and V
    layers = [0] * n_layer
    output = other = 0
    for name, tensor in header.tensors.items():
        match = _LAYER.match(name)
        if match and int(match.group(1)) < n_layer:
            layers[int(match.group(1))] += tensor.n_bytes
        elif name.startswith("output"):
            output += tensor.n_bytes
        else:
            other += tensor.n_bytes
    embd = header.tensors.get("token_embd.weight")
    if "output.weight" not in header.tensors and embd is not None:
        output += embd.n_bytes  # tied embeddings: llama.cpp duplicates them for the output layer
    ctx = md.get(f"{arch}.context_length")
    return ModelShape(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=int(embd.shape[1]) if embd is not None and len(embd.shape) > 1 else 0,
        n_ctx_train=int(ctx) if isinstance(ctx, int) else None,
        layer_bytes=tuple(layers),
        output_bytes=output,
        tied_output="output.weight" not in header.tensors,
        input_bytes=other,
        kv_bytes_per_token=tuple(per_layer_kv),
        file_bytes=header.file_size,
    )


def parameter_count(header: GgufHeader) -> int:
    """The model's parameters: the elements of every tensor in the file (tied embeddings count once)."""
    return sum(math.prod(tensor.shape) for tensor in header.tensors.values())


def size_label(parameters: int) -> str:
    """A parameter count the way model names give it: ``135M``, ``1.5B``, ``72B``."""
    if parameters >= 10**10:
        return f"{parameters / 1e9:.0f}B"
    if parameters >= 10**9:
        return f"{parameters / 1e9:.1f}B".replace(".0B", "B")
    if parameters >= 10**6:
        return f"{parameters / 1e6:.0f}M"
    return f"{parameters / 1e3:.0f}K"


def model_size(path: Path) -> str:
    """The architecture and size of a model, e.g. ``llama 135M``, for the line logged when it loads.

    The count is computed from the tensor shapes, not taken from ``general.size_label`` (which
    the converter may leave out or round differently) nor from llama.cpp's model description,
    which guesses the size from the layer count and calls SmolLM2-135M (30 layers) "256M".
    """
    header = read_header(path)
    return f"{header.architecture or 'unknown'} {size_label(parameter_count(header))}"


# architectures that are text encoders: their GGUF files are embedding models even without a pooling type
ENCODER_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert", "t5encoder"}
)
_EMBEDDING_POOLING = (1, 2, 3)  # llama.cpp's mean, cls, last (0 is none, 4 a reranker's rank)


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    name: str | None
    file_type: str | None
    context_length: int | None
    has_chat_template: bool
    general_type: str | None
    tensor_count: int
    pooling_type: int | None = None  # ``<arch>.pooling_type``, which embedding-model conversions write

    @property
    def is_embedding_model(self) -> bool:
        """Whether the file is a sentence-embedding model (served at /v1/embeddings) rather than a chat one."""
        if self.pooling_type is not None:
            return self.pooling_type in _EMBEDDING_POOLING
        return self.architecture in ENCODER_ARCHITECTURES


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
    pooling = _field(reader, f"{arch}.pooling_type")
    return GgufInfo(
        architecture=arch,
        name=_field(reader, "general.name"),
        file_type=ftype,
        context_length=int(ctx) if ctx is not None else None,
        has_chat_template="tokenizer.chat_template" in reader.fields,
        general_type=_field(reader, "general.type"),
        tensor_count=len(reader.tensors),
        pooling_type=int(pooling) if pooling is not None else None,
    )
