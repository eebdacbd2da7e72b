"""Check a GGUF LoRA adapter against its base model from the two files' headers, without loading either.

llama.cpp checks the same things when it loads an adapter, but says only "incorrect shape (hint:
maybe wrong base model?)" in its log and returns NULL. Adding an adapter must refuse a wrong file
*before* it enters the store, naming the tensor and both shapes, so we read the tensor tables
with the ``gguf`` package and apply llama.cpp's rules (``llama_adapter_lora_init_impl``) here.

Shapes are in GGUF's order (``ne``: the input dimension first): a base weight is
``[n_in, n_out]``, its ``lora_a`` is ``[n_in, rank]`` and its ``lora_b`` ``[rank, n_out]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import AdapterLoadError, ModelLoadError
from engines.ggufmeta import open_reader, read_header

SUFFIX_A = ".lora_a"
SUFFIX_B = ".lora_b"


@dataclass(frozen=True)
class LoraTensor:
    """One adapted base weight: the shapes of its two low-rank factors."""

    target: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        # b's first dimension, also for token_embd, whose pair is stored the other way round
        return self.b_shape[0]


@dataclass(frozen=True)
class LoraInfo:
    """What an adapter file says about itself."""

    architecture: str
    alpha: float | None
    tensors: tuple[LoraTensor, ...]
    size: int

    @property
    def rank(self) -> int:
        return max(t.rank for t in self.tensors)

    @property
    def targets(self) -> list[str]:
        return [t.target for t in self.tensors]


def open_adapter(path: Path) -> Any:
    """A ``GGUFReader`` of a sound adapter file, or ``AdapterLoadError`` saying what is wrong with it."""
    try:
        return open_reader(path)
    except ModelLoadError as exc:
        raise AdapterLoadError(path, exc.reason) from exc


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)


def read_lora_info(path: Path) -> LoraInfo:
    """Parse an adapter's header; refuse anything llama.cpp would not load as a LoRA."""
    reader = open_adapter(path)
    general_type = _field(reader, "general.type")
    if general_type != "adapter":
        found = f"general.type is {general_type!r}" if general_type else "it has no general.type"
        raise AdapterLoadError(path, f"not a LoRA adapter: {found} (expected 'adapter'); is this a model file?")
    adapter_type = _field(reader, "adapter.type")
    if adapter_type != "lora":
        raise AdapterLoadError(path, f"adapter.type is {adapter_type!r}, only 'lora' adapters are supported")
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise AdapterLoadError(path, "no general.architecture in its metadata")
    if _field(reader, "adapter.alora.invocation_tokens") is not None:
        raise AdapterLoadError(path, "activated LoRA (aLoRA) adapters are not supported")
    alpha = _field(reader, "adapter.lora.alpha")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in reader.tensors:
        name = str(tensor.name)
        if name.endswith(SUFFIX_A):
            pairs.setdefault(name.removesuffix(SUFFIX_A), {})["a"] = _shape(tensor)
        elif name.endswith(SUFFIX_B):
            pairs.setdefault(name.removesuffix(SUFFIX_B), {})["b"] = _shape(tensor)
        elif not name.endswith("_norm.weight"):  # llama.cpp skips norm vectors too
            raise AdapterLoadError(path, f"tensor {name} is neither a .lora_a nor a .lora_b tensor")
    if not pairs:
        raise AdapterLoadError(path, "it holds no LoRA tensors")
    tensors = []
    for target, pair in sorted(pairs.items()):
        if "a" not in pair or "b" not in pair:
            missing = SUFFIX_A if "a" not in pair else SUFFIX_B
            raise AdapterLoadError(path, f"tensor {target}{missing} is missing (LoRA tensors come in a/b pairs)")
        if len(pair["a"]) != 2 or len(pair["b"]) != 2:
            raise AdapterLoadError(
                path, f"tensors of {target} are not matrices: a {list(pair['a'])}, b {list(pair['b'])}"
            )
        tensors.append(LoraTensor(target, pair["a"], pair["b"]))
    return LoraInfo(
        architecture=arch,
        alpha=float(alpha) if isinstance(alpha, int | float) else None,
        tensors=tuple(tensors),
        size=path.stat().st_size,
    )


def check_lora_fits(info: LoraInfo, adapter_path: Path, base_path: Path) -> None:
    """Refuse an adapter whose architecture or any tensor shape does not fit the base model."""
    try:
        header = read_header(base_path)
    except ModelLoadError as exc:
        raise AdapterLoadError(adapter_path, f"cannot read the base model: {exc.reason}") from exc
    arch = header.architecture
    shapes = {name: tensor.shape for name, tensor in header.tensors.items()}
    if info.architecture != arch:
        raise AdapterLoadError(
            adapter_path, f"it was made for architecture '{info.architecture}', the base model is '{arch}'"
        )
    for t in info.tensors:
        base = shapes.get(t.target)
        if base is None:
            raise AdapterLoadError(adapter_path, f"tensor {t.target} does not exist in the base model")
        if len(base) != 2:
            raise AdapterLoadError(adapter_path, f"base tensor {t.target} has shape {list(base)}, not a matrix")
        a, b = t.a_shape, t.b_shape
        if t.target.endswith("token_embd.weight"):  # stored transposed: see llm_build_inp_embd
            fits, expected = base[0] == b[1] and base[1] == a[1], f"a [rank, {base[1]}], b [rank, {base[0]}]"
        else:
            fits, expected = base[0] == a[0] and base[1] == b[1], f"a [{base[0]}, rank], b [rank, {base[1]}]"
        if not fits:
            raise AdapterLoadError(
                adapter_path,
                f"tensor {t.target}: lora_a {list(a)} and lora_b {list(b)} do not fit the base weight "
                f"{list(base)} (expected {expected}); was it made for another model?",
            )
        if not t.target.endswith("token_embd.weight") and a[1] != b[0]:
            raise AdapterLoadError(
                adapter_path, f"tensor {t.target}: lora_a rank {a[1]} differs from lora_b rank {b[0]}"
            )
