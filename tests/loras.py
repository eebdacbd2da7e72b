"""Real GGUF LoRA adapters for the default model, written with the ``gguf`` package as llama.cpp's
``convert_lora_to_gguf.py`` writes them, plus deliberately wrong ones.

Factors are random, large enough that the adapter measurably changes the answers and small enough
to stay in the range of trained adapters: with factors of std 0.05 on attn_q, attention scores get
so large that flash attention decodes a lone sequence differently from a batched one (measured).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

ATTN_FFN = ("attn_q", "attn_v", "ffn_up")


def targets(n_layers: int = 30, kinds: Sequence[str] = ATTN_FFN) -> list[str]:
    return [f"blk.{i}.{kind}.weight" for i in range(n_layers) for kind in kinds]


def base_shapes(base: Path) -> dict[str, list[int]]:
    return {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(base).tensors}


def write_lora(
    path: Path,
    base: Path,
    *,
    tensors: Sequence[str] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    std: float = 0.03,
    arch: str = "llama",
    general_type: str = "adapter",
    dtype: type = np.float32,
    wrong_shape: str | None = None,
) -> Path:
    """An adapter for ``base``; ``wrong_shape`` names a tensor given a shape that does not fit."""
    shapes = base_shapes(base)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_type(general_type)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name in tensors or targets():
        n_in, n_out = shapes[name]
        if name == wrong_shape:
            n_in += 64
        # numpy shapes are GGUF's reversed: a is [n_in, rank] in GGUF order, b is [rank, n_out]
        writer.add_tensor(f"{name}.lora_a", rng.normal(0, std, (rank, n_in)).astype(dtype))
        writer.add_tensor(f"{name}.lora_b", rng.normal(0, std, (n_out, rank)).astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
