"""GGUF -> ONNX, offline, with no PyTorch: the GGUF's own quantized blocks become onnxruntime's.

Needs only ``gguf``, ``numpy`` and ``onnx`` (the ``convert`` extra). The graph is written with
``onnx.helper`` node by node, for llama-family models (llama, mistral, smollm, ...; rotary
position embeddings, RMS norms, gated SiLU MLP, grouped-query attention):

- **Weights stay as the GGUF has them where onnxruntime has the same layout.** Q4_0 blocks are
  exactly ``MatMulNBits`` 4-bit blocks (scale ``d``, zero point 8); Q8_0 exactly 8-bit ones (zero
  point 128); Q4_1 blocks (``d * q + m``) are ``MatMulNBits`` with the default zero point 8 plus a
  small ``MatMul`` of each input block's sum by ``m + 8d``: the same numbers, no re-quantization.
  Other types (K-quants, F16, F32) are dequantized and quantized again to 4-bit blocks of 32 with a
  minimum, as Q4_1 does. ``precision="fp32"`` dequantizes everything instead.
- **Attention** is onnxruntime's ``GroupQueryAttention`` with its rotary embedding built in
  (interleaved pairs: llama.cpp's converter permuted Q and K for that) and a KV cache the caller
  binds as past and present alike, so it is updated in place (see ``engines.onnx.model``).
- Inputs and outputs follow onnxruntime-genai's names (``input_ids``, ``attention_mask``,
  ``past_key_values.N.key``, ``present.N.key``, ``logits``), plus ``logits_to_keep``: logits of the
  last N positions only, so a long prompt does not pay the vocabulary projection per token.

The folder gets ``model.onnx`` (+ ``model.onnx.data``), ``tokenizer.gguf`` (the GGUF's metadata
and vocabulary, no tensors: the ONNX engine tokenizes and renders chats with llama.cpp's code,
exactly as the GGUF engine does) and ``appliance-onnx.json`` (shapes the engine needs).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "appliance-onnx/1"
CONFIG_FILE = "appliance-onnx.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.gguf"
MODEL_FILES = (CONFIG_FILE, MODEL_FILE, MODEL_FILE + ".data", TOKENIZER_FILE)  # what a converted folder holds
PRECISIONS = ("int4", "fp32")
ARCHITECTURES = ("llama",)
BLOCK = 32


def weight_bytes(folder: Path) -> int:
    """The size of a converted model's graph and weights (what one call reads)."""
    return sum(p.stat().st_size for p in (folder / MODEL_FILE, folder / (MODEL_FILE + ".data")) if p.is_file())


class ConversionError(Exception):
    """The GGUF cannot be converted; the message says why."""


@dataclass(frozen=True)
class OnnxModelConfig:
    """What ``appliance-onnx.json`` holds: the shapes the engine sizes its KV cache by."""

    format: str  # "appliance-onnx/1"
    architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    precision: str
    source: str  # the GGUF's file name
    source_sha256: str
    quantization: str  # the GGUF's types, e.g. "Q4_1"
    accuracy_level: int

    @classmethod
    def read(cls, folder: Path) -> OnnxModelConfig:
        data = json.loads((folder / CONFIG_FILE).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


Progress = Callable[[str, int, int], None]  # (step, done, total)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def convert(
    gguf_path: Path,
    out_dir: Path,
    *,
    precision: str = "int4",
    accuracy_level: int = 4,
    progress: Progress | None = None,
) -> OnnxModelConfig:
    """Convert ``gguf_path`` into the folder ``out_dir`` (created; must not hold a model yet)."""
    import gguf

    if precision not in PRECISIONS:
        raise ConversionError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {gguf_path} as GGUF: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"{gguf_path.name} is a '{arch}' model; the converter knows {', '.join(ARCHITECTURES)} "
            "(serve it with the GGUF engine)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MODEL_FILE).exists():
        raise ConversionError(f"{out_dir} already holds a model")
    try:
        graph = _Graph(reader, arch, precision, accuracy_level, progress)
        model = graph.build()
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:  # a tensor of an unexpected shape or type
        raise ConversionError(f"{gguf_path.name} cannot be converted: {type(exc).__name__}: {exc}") from exc
    _report(progress, "writing", 0, 1)
    import onnx

    onnx.save_model(
        model,
        str(out_dir / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=MODEL_FILE + ".data",
        size_threshold=1024,
    )
    _write_tokenizer(reader, out_dir / TOKENIZER_FILE)
    config = OnnxModelConfig(
        format=FORMAT,
        architecture=arch,
        n_layer=graph.n_layer,
        n_head=graph.n_head,
        n_head_kv=graph.n_head_kv,
        head_dim=graph.head_dim,
        n_embd=graph.n_embd,
        n_vocab=graph.n_vocab,
        n_ctx_train=graph.n_ctx_train,
        precision=precision,
        source=gguf_path.name,
        source_sha256=_sha256(gguf_path),
        quantization="+".join(sorted(graph.types_seen)),
        accuracy_level=accuracy_level,
    )
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    _report(progress, "writing", 1, 1)
    return config


def _report(progress: Progress | None, step: str, done: int, total: int) -> None:
    if progress is not None:
        progress(step, done, total)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_tokenizer(reader: Any, path: Path) -> None:
    """A GGUF with every metadata key of the source and no tensors: llama.cpp loads its vocabulary."""
    import gguf

    arch = _field(reader, "general.architecture")
    writer = gguf.GGUFWriter(str(path), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- weights ------------------------------------------------------------------------------------


@dataclass
class _Blocks:
    """A weight [N, K] as ``MatMulNBits`` wants it, with the Q4_1 offsets where there are some."""

    data: np.ndarray  # uint8 [N, K/32, 32*bits/8]
    scales: np.ndarray  # float32 [N, K/32]
    bits: int
    offsets: np.ndarray | None  # float32 [N, K/32], added per input block sum (Q4_1's m + 8d)


def _q4_1_blocks(raw: np.ndarray, n: int, k: int) -> _Blocks:
    blocks = raw.reshape(n, k // BLOCK, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return _Blocks(_repack4(blocks[..., 4:]), d, 4, m + 8 * d)


def _q4_0_blocks(raw: np.ndarray, n: int, k: int) -> _Blocks:
    blocks = raw.reshape(n, k // BLOCK, 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    return _Blocks(_repack4(blocks[..., 2:]), d, 4, None)


def _q8_0_blocks(raw: np.ndarray, n: int, k: int) -> _Blocks:
    blocks = raw.reshape(n, k // BLOCK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8)
    return _Blocks((q.astype(np.int16) + 128).astype(np.uint8), d, 8, None)


def _repack4(qs: np.ndarray) -> np.ndarray:
    """ggml's nibbles (byte i: weights i and i+16) to MatMulNBits' (byte i: weights 2i and 2i+1)."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    packed: np.ndarray = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed


def _quantize4(w: np.ndarray) -> _Blocks:
    """Float weights [N, K] to 4-bit blocks of 32 with a minimum (Q4_1's scheme)."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    d = (hi - lo) / 15
    safe = np.where(d > 0, d, 1)
    q = np.clip(np.rint((b - lo[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return _Blocks(packed, d.astype(np.float32), 4, (lo + 8 * d).astype(np.float32))


_EXACT = {"Q4_1": _q4_1_blocks, "Q4_0": _q4_0_blocks, "Q8_0": _q8_0_blocks}


class _Graph:
    """Builds the ONNX graph of one GGUF model; ``build`` returns the ``ModelProto``."""

    def __init__(self, reader: Any, arch: str, precision: str, accuracy_level: int, progress: Progress | None) -> None:
        self.reader = reader
        self.precision = precision
        self.accuracy_level = accuracy_level
        self.progress = progress
        self.tensors = {t.name: t for t in reader.tensors}
        self.types_seen: set[str] = set()
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        p = arch + "."
        self.n_layer = self.required(p + "block_count")
        self.n_embd = self.required(p + "embedding_length")
        self.n_head = self.required(p + "attention.head_count")
        self.n_head_kv = int(_field(reader, p + "attention.head_count_kv", self.n_head))
        self.head_dim = int(_field(reader, p + "attention.key_length", self.n_embd // self.n_head))
        self.rope_dim = int(_field(reader, p + "rope.dimension_count", self.head_dim))
        self.rope_base = float(_field(reader, p + "rope.freq_base", 10000.0))
        self.eps = float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5))
        self.n_ctx_train = int(_field(reader, p + "context_length", 4096))
        self.n_vocab = int(self.tensor("token_embd.weight").shape[1])
        if self.rope_dim != self.head_dim:
            raise ConversionError(f"partial rotary embeddings ({self.rope_dim} of {self.head_dim}) are not supported")
        if _field(reader, p + "rope.scaling.type") not in (None, "none"):
            raise ConversionError("rope scaling is not supported by the converter yet")
        # what onnxruntime's GroupQueryAttention with its built-in rotary embedding accepts
        if self.head_dim % 16 or self.n_head % self.n_head_kv or self.n_embd % BLOCK:
            raise ConversionError(
                f"heads of {self.head_dim} values, {self.n_head} query and {self.n_head_kv} KV heads, "
                f"width {self.n_embd}: onnxruntime's attention needs head sizes in multiples of 16 and whole "
                "query groups per KV head"
            )
        extra = sorted(n for n in self.tensors if n.endswith(".bias"))
        if extra:  # a llama variant with biases: dropping them would quietly give another model
            raise ConversionError(
                f"it has bias tensors ({', '.join(extra[:3])}...), which the converter does not write"
            )

    # -- helpers

    def required(self, key: str) -> int:
        value = _field(self.reader, key)
        if not isinstance(value, int) or value <= 0:
            raise ConversionError(f"its metadata has no valid {key}")
        return value

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        from onnx import helper

        outs = [self.name(op) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op, list(inputs), outs, name=self.name(op + "_node"), domain=domain, **attrs)
        )
        return outs

    def tensor(self, name: str) -> Any:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ConversionError(f"the GGUF has no tensor {name}")
        return tensor

    def floats(self, name: str) -> np.ndarray:
        import gguf

        t = self.tensor(name)
        self.types_seen.add(t.tensor_type.name)
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        return values.reshape([int(x) for x in reversed(t.shape)])

    def blocks(self, name: str) -> _Blocks | None:
        """The weight's blocks as they are, where their type maps exactly."""
        t = self.tensor(name)
        kind = t.tensor_type.name
        self.types_seen.add(kind)
        n, k = int(t.shape[1]), int(t.shape[0])
        if kind in _EXACT and k % BLOCK == 0:
            return _EXACT[kind](np.asarray(t.data).reshape(n, -1), n, k)
        return None

    # -- layers

    def linear(self, x: str, names: Sequence[str], tag: str) -> str:
        """x @ W.T for the weights ``names`` stacked along N (one matmul for Q, K and V, say)."""
        k = int(self.tensor(names[0]).shape[0])
        if self.precision == "fp32":
            w = np.concatenate([self.floats(n) for n in names], axis=0)
            return self.node("MatMul", [x, self.init(tag + ".weight", w.T.copy())])[0]
        parts = [self.blocks(n) for n in names]
        if any(p is None for p in parts) or len({p.bits for p in parts if p is not None}) > 1:
            parts = [_quantize4(self.floats(n)) for n in names]
        blocks = [p for p in parts if p is not None]
        data = np.concatenate([p.data for p in blocks], axis=0)
        scales = np.concatenate([p.scales for p in blocks], axis=0)
        n = data.shape[0]
        y = self.node(
            "MatMulNBits",
            [x, self.init(tag + ".qweight", data), self.init(tag + ".scales", scales.reshape(-1))],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=blocks[0].bits,
            block_size=BLOCK,
            accuracy_level=self.accuracy_level,
        )[0]
        if all(p.offsets is None for p in blocks):
            return y
        offsets = np.concatenate(
            [p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in blocks], axis=0
        )
        sums = self.block_sums(x, k)
        shift = self.node("MatMul", [sums, self.init(tag + ".offsets", offsets.T.copy())])[0]
        return self.node("Add", [y, shift])[0]

    def block_sums(self, x: str, k: int) -> str:
        """Each input's sum over every block of 32 (what Q4_1's minimum multiplies), once per input."""
        cached = self._sums.get(x)
        if cached is None:
            shape = self.init(self.name("blockshape"), np.array([0, 0, k // BLOCK, BLOCK], dtype=np.int64))
            grouped = self.node("Reshape", [x, shape])[0]
            axes = self.init(self.name("axes"), np.array([-1], dtype=np.int64))
            cached = self.node("ReduceSum", [grouped, axes], keepdims=0)[0]
            self._sums[x] = cached
        return cached

    def build(self) -> Any:
        from onnx import TensorProto, helper

        self._sums: dict[str, str] = {}
        self.embed_blocks: _Blocks | None = None
        kv_shape: list[str | int] = ["batch", self.n_head_kv, "past_sequence_length", self.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
            helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", self.n_vocab])]
        for i in range(self.n_layer):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_shape))

        # sequence lengths as GroupQueryAttention takes them: per row, and the longest
        one = self.init("one", np.array(1, dtype=np.int64))
        axis1 = self.init("axis1", np.array([1], dtype=np.int64))
        lengths = self.node("ReduceSum", ["attention_mask", axis1], keepdims=0)[0]
        seqlens_k = self.node("Cast", [self.node("Sub", [lengths, one])[0]], to=TensorProto.INT32)[0]
        mask_shape = self.node("Shape", ["attention_mask"])[0]
        total = self.node("Gather", [mask_shape, one], axis=0)[0]
        total_len = self.node("Cast", [total], to=TensorProto.INT32)[0]
        cos, sin = self.rotary_caches()

        _report(self.progress, "embeddings", 0, self.n_layer + 2)
        h = self.embeddings()
        residual = None
        step = h
        for i in range(self.n_layer):
            _report(self.progress, "layers", i + 1, self.n_layer + 2)
            x, residual = self.norm(step, residual, f"blk.{i}.attn_norm.weight")
            qkv = self.linear(
                x, [f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight", f"blk.{i}.attn_v.weight"], f"blk.{i}.qkv"
            )
            self.nodes.append(
                helper.make_node(
                    "GroupQueryAttention",
                    [
                        qkv,
                        "",
                        "",
                        f"past_key_values.{i}.key",
                        f"past_key_values.{i}.value",
                        seqlens_k,
                        total_len,
                        cos,
                        sin,
                    ],
                    [f"attn_{i}", f"present.{i}.key", f"present.{i}.value"],
                    name=f"attention_{i}",
                    domain="com.microsoft",
                    num_heads=self.n_head,
                    kv_num_heads=self.n_head_kv,
                    do_rotary=1,
                    rotary_interleaved=1,
                    scale=1.0 / math.sqrt(self.head_dim),
                )
            )
            attn = self.linear(f"attn_{i}", [f"blk.{i}.attn_output.weight"], f"blk.{i}.attn_output")
            x, residual = self.norm(attn, residual, f"blk.{i}.ffn_norm.weight")
            inter = int(self.tensor(f"blk.{i}.ffn_gate.weight").shape[1])
            gate_up = self.linear(x, [f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"], f"blk.{i}.gate_up")
            split = self.init(self.name("split"), np.array([inter, inter], dtype=np.int64))
            gate, up = self.node("Split", [gate_up, split], n_out=2, axis=-1)
            silu = self.node("Mul", [gate, self.node("Sigmoid", [gate])[0]])[0]
            step = self.linear(self.node("Mul", [silu, up])[0], [f"blk.{i}.ffn_down.weight"], f"blk.{i}.ffn_down")
        x, _ = self.norm(step, residual, "output_norm.weight")
        # only the last ``logits_to_keep`` positions go through the vocabulary projection
        start = self.node("Neg", ["logits_to_keep"])[0]
        end = self.init("end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        kept = self.node("Slice", [x, start, end, axis1])[0]
        _report(self.progress, "output", self.n_layer + 1, self.n_layer + 2)
        if "output.weight" in self.tensors:
            logits = self.linear(kept, ["output.weight"], "lm_head")
        elif self.embed_blocks is not None:  # tied to the quantized embeddings: the same bytes
            logits = self.node(
                "MatMulNBits",
                [kept, "embed.qweight", self.init("lm_head.scales", self.embed_blocks.scales.reshape(-1))],
                domain="com.microsoft",
                K=self.n_embd,
                N=self.n_vocab,
                bits=8,
                block_size=BLOCK,
                accuracy_level=self.accuracy_level,
            )[0]
        else:
            logits = self.linear(kept, ["token_embd.weight"], "lm_head")
        self.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
        _report(self.progress, "output", self.n_layer + 2, self.n_layer + 2)
        graph = helper.make_graph(self.nodes, "appliance-onnx", inputs, outputs, self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
            producer_name="appliance",
        )
        model.ir_version = 10  # what onnxruntime 1.23+ reads (the minimum for GatherBlockQuantized's 8 bits)
        return model

    def embeddings(self) -> str:
        name = "token_embd.weight"
        blocks = self.blocks(name) if self.precision != "fp32" else None
        if blocks is not None and blocks.bits == 8:  # Q8_0: the table stays quantized
            # [V, E/32, 32] as MatMulNBits takes it too: a tied output layer shares these bytes
            self.embed_blocks = blocks
            zero = np.full((*blocks.scales.shape, 1), 128, dtype=np.uint8)
            rows = self.node(
                "GatherBlockQuantized",
                [
                    self.init("embed.qweight", blocks.data),
                    "input_ids",
                    self.init("embed.scales", blocks.scales[..., None]),
                    self.init("embed.zero_points", zero),
                ],
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=2,
                block_size=BLOCK,
                bits=8,
            )[0]
            shape = self.init("embed.shape", np.array([0, 0, self.n_embd], dtype=np.int64))
            return self.node("Reshape", [rows, shape])[0]
        table = self.floats(name)
        return self.node("Gather", [self.init("embed.weight", table), "input_ids"], axis=0)[0]

    def norm(self, x: str, residual: str | None, weight: str) -> tuple[str, str]:
        """RMS norm of ``x + residual``: (normed, the sum, which is the next residual)."""
        gamma = self.init(weight, self.floats(weight))
        if residual is None:
            return self.node("SimplifiedLayerNormalization", [x, gamma], epsilon=self.eps, axis=-1)[0], x
        out = self.node(
            "SkipSimplifiedLayerNormalization", [x, residual, gamma], n_out=4, domain="com.microsoft", epsilon=self.eps
        )
        return out[0], out[3]

    def rotary_caches(self) -> tuple[str, str]:
        half = self.head_dim // 2
        freqs = self.rope_base ** (-np.arange(0, half, dtype=np.float64) * 2 / self.head_dim)
        if "rope_freqs.weight" in self.tensors:  # llama 3.1's per-frequency factors
            freqs = freqs / self.floats("rope_freqs.weight").astype(np.float64)
        angles = np.outer(np.arange(self.n_ctx_train + 1, dtype=np.float64), freqs)
        return (
            self.init("cos_cache", np.cos(angles).astype(np.float32)),
            self.init("sin_cache", np.sin(angles).astype(np.float32)),
        )
