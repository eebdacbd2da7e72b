"""LoRA adapters applied per row of a batch, so requests on different adapters decode together.

llama.cpp applies adapters to a whole context: every row of a ``llama_decode`` call gets the same
set (``build_lora_mm`` adds ``scale * B(Ax)`` to each adapted matmul, for all tokens). Serving a
base model and several adapters then costs a decode call per adapter set and step, plus a graph
re-reserve (~7 ms) whenever the set changes: mixed traffic ran at about 0.6x of all-base traffic
here, and below llama-server (issue 19).

This module moves the low-rank update out of llama.cpp's graph. The context is created with a
ggml scheduler eval callback (``cparams.cb_eval``). While a decode call holds rows with adapters,
the callback asks to see every ``MUL_MAT`` node whose weight (``src[0]``) an adapter of the call
adapts; ggml computes the graph up to that node, and the callback adds ``scale * (x A^T) B^T``
to the rows of the sequences using that adapter, reading ``x`` from the node's ``src[1]``, before
the rest of the graph reads the result. One decode call serves the base and every adapter.

Exactness: base rows are never touched, so a base answer is the same with or without adapters in
the batch. An adapter row gets its update from per-row contractions (``einsum``'s own loops, which
sum each element in the same order whatever the other rows), so an adapter answer is the same
alone and batched. (llama.cpp's own adapter path does not have that property on the
CPU: its f32 matmul rounds differently for one row and for several.)

Costs: with no adapter row in a call the callback answers "no" at once (~0.3 us a node, not
measurable); with adapter rows, ggml computes the graph in pieces between the adapted matmuls and
the updates run in numpy. It needs activations in host memory, so only CPU models mix (a model
with GPU layers keeps llama.cpp's mechanism). ``ggml_tensor`` is read with ctypes at fixed
offsets, checked at start against tensors ggml itself makes (``check_layout``).

Rows: llama.cpp cuts a batch into micro-batches (``llama_batch_allocr::split_equal`` with
``sequential``, as it does for separate KV streams): consecutive sequence ids with equal token
counts each. ``micro_batches`` repeats that rule, and every node seen is checked against the
micro-batch predicted, so a different rule in another llama.cpp fails loudly instead of
updating the wrong rows.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import BatchItem, DecodeError

log = logging.getLogger(__name__)

GGML_TYPE_F32 = 0
EVAL_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


class _Tensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h: GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64). Only offsets are used: reading fields one by one is cheaper than a struct."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_TYPE = _Tensor.type.offset
_NE = _Tensor.ne.offset
_NB = _Tensor.nb.offset
_OP = _Tensor.op.offset
_SRC0 = _Tensor.src.offset
_SRC1 = _SRC0 + ctypes.sizeof(ctypes.c_void_p)
_DATA = _Tensor.data.offset
_NAME = _Tensor.name.offset
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def _ptr(address: int) -> int:
    """The pointer stored at ``address`` (NULL is an error here: every tensor read has one)."""
    value = _PTR.from_address(address).value
    if not value:
        raise RuntimeError(f"NULL pointer at {address:#x}")
    return value


def _floats(address: int, rows: int, width: int) -> np.ndarray:
    """A writable numpy view of a tensor's float32 data."""
    return np.frombuffer(memoryview((ctypes.c_float * (rows * width)).from_address(address)), np.float32).reshape(
        rows, width
    )


class LayoutError(Exception):
    """This libggml's ``ggml_tensor`` is not the layout this module reads."""


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _op_number(lib: Any, name: bytes) -> int:
    lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
    for op in range(128):  # GGML_OP_NONE = 0; MUL_MAT and GET_ROWS come early
        if lib.ggml_op_name(op) == name:
            return op
    raise LayoutError(f"libggml has no op named {name.decode()}")


def check_layout(lib: Any) -> tuple[int, int]:
    """The op numbers of MUL_MAT and GET_ROWS, once tensors ggml makes read back right."""
    p = ctypes.c_void_p
    lib.ggml_init.argtypes, lib.ggml_init.restype = [_InitParams], p
    lib.ggml_free.argtypes, lib.ggml_free.restype = [p], None
    lib.ggml_new_tensor_2d.argtypes = [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_new_tensor_2d.restype = p
    lib.ggml_set_name.argtypes, lib.ggml_set_name.restype = [p, ctypes.c_char_p], p
    lib.ggml_mul_mat.argtypes, lib.ggml_mul_mat.restype = [p, p, p], p
    lib.ggml_get_data.argtypes, lib.ggml_get_data.restype = [p], p
    mul_mat, get_rows = _op_number(lib, b"MUL_MAT"), _op_number(lib, b"GET_ROWS")
    ctx = lib.ggml_init(_InitParams(1 << 20, None, False))
    if not ctx:
        raise LayoutError("ggml_init failed")
    try:
        a = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 64, 3)
        b = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 64, 5)
        lib.ggml_set_name(a, b"layout-probe")
        c = lib.ggml_mul_mat(ctx, a, b)
        ta, tc = _Tensor.from_address(a), _Tensor.from_address(c)
        found = {
            "ne": (list(ta.ne), [64, 3, 1, 1]),
            "nb[1]": (ta.nb[1], 256),
            "name": (ta.name, b"layout-probe"),
            "data": (ta.data, lib.ggml_get_data(a)),
            "op": (tc.op, mul_mat),
            "src": ((tc.src[0], tc.src[1]), (a, b)),
            "result ne": (list(tc.ne[:2]), [3, 5]),
        }
        wrong = [key for key, (got, want) in found.items() if got != want]
        if wrong:
            raise LayoutError(f"ggml_tensor fields read wrong: {', '.join(wrong)}")
    finally:
        lib.ggml_free(ctx)
    return mul_mat, get_rows


@dataclass(frozen=True)
class _Pair:
    """One adapted weight: ``a`` is (rank, n_in), ``bt`` is B transposed, (rank, n_out); float32
    as in the file (f16 and quantised factors are widened), so adapters cost what they do in llama.cpp."""

    a: np.ndarray
    bt: np.ndarray
    scale: float  # alpha / rank, or 1 without alpha (llama_adapter_lora_weight::get_scale)


@dataclass
class AdapterFactors:
    """An adapter's low-rank pairs by base weight name, read from its GGUF file."""

    pairs: dict[str, _Pair] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> AdapterFactors | None:
        """The factors, or None when the adapter adapts a weight that is not a matmul's (the token
        embeddings): such an adapter keeps llama.cpp's own mechanism."""
        import gguf

        # here: gguflora imports ggufmeta, which imports the engine that imports this module
        from engines.gguflora import SUFFIX_A, SUFFIX_B, open_adapter

        reader = open_adapter(path)
        alpha_field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
        alpha = float(alpha_field.contents()) if alpha_field is not None else 0.0
        tensors: dict[str, np.ndarray] = {}
        for tensor in reader.tensors:
            name = str(tensor.name)
            if name.endswith((SUFFIX_A, SUFFIX_B)):
                data = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy:
                tensors[name] = data.reshape([int(n) for n in reversed(tensor.shape)])  # the file may go
        factors = cls()
        for name, a in tensors.items():
            if not name.endswith(SUFFIX_A):
                continue
            target = name.removesuffix(SUFFIX_A)
            if target.endswith("token_embd.weight"):
                return None
            b = tensors[target + SUFFIX_B]  # (n_out, rank); read_lora_info checked the pairs
            rank = b.shape[1]
            scale = alpha / rank if alpha else 1.0
            factors.pairs[target] = _Pair(np.ascontiguousarray(a), np.ascontiguousarray(b.T), scale)
        return factors


@dataclass(frozen=True)
class MicroBatch:
    """The rows of one llama.cpp micro-batch: the batch row of each, in its order."""

    rows: tuple[int, ...]
    outputs: tuple[int, ...]  # the batch rows, among ``rows``, whose logits are kept


def micro_batches(items: Sequence[BatchItem], n_ubatch: int) -> list[MicroBatch]:
    """How llama.cpp's ``split_equal(n_ubatch, sequential=true)`` cuts a batch of one-slot items."""
    spans: list[list[int]] = []  # batch rows per item
    wants: set[int] = set()
    row = 0
    for item in items:
        spans.append(list(range(row, row + len(item.tokens))))
        wants.update(range(row + len(item.tokens) - item.n_outputs, row + len(item.tokens)))
        row += len(item.tokens)
    taken = [0] * len(items)
    result: list[MicroBatch] = []
    while any(taken[i] < len(spans[i]) for i in range(len(items))):
        chosen: list[int] = []
        last = -1
        for i, item in enumerate(items):  # batch order: each item's tokens are contiguous
            if taken[i] >= len(spans[i]):
                continue
            if not chosen or item.slot == last + 1:
                chosen.append(i)
                last = item.slot
                if len(chosen) > n_ubatch:
                    break
        per_seq: list[list[int]] = [[] for _ in chosen]
        while all(taken[i] < len(spans[i]) for i in chosen):
            for k, i in enumerate(chosen):
                per_seq[k].append(spans[i][taken[i]])
                taken[i] += 1
            if (len(per_seq[0]) + 1) * len(chosen) > n_ubatch:
                break
        rows = tuple(r for seq in per_seq for r in seq)
        result.append(MicroBatch(rows, tuple(r for r in rows if r in wants)))
    return result


_Chosen = tuple[tuple[AdapterFactors, float], ...]  # one item's adapters with their scales


@dataclass
class _Call:
    """What the callback needs during one ``llama_decode``."""

    batches: list[MicroBatch]
    row_adapters: list[_Chosen]  # per batch row
    wanted: frozenset[str]  # the weights some adapter of the call adapts
    index: int = -1  # the micro-batch being computed
    # per (micro-batch, outputs only): rows grouped by their whole adapter list, as indices
    groups: dict[tuple[int, bool], list[tuple[_Chosen, np.ndarray]]] = field(default_factory=dict)
    updated: int = 0
    error: str | None = None

    def row_groups(self, outputs: bool) -> list[tuple[_Chosen, np.ndarray]]:
        key = (self.index, outputs)
        found = self.groups.get(key)
        if found is None:
            batch = self.batches[self.index]
            by_key: dict[tuple[tuple[int, float], ...], tuple[_Chosen, list[int]]] = {}
            for local, row in enumerate(batch.outputs if outputs else batch.rows):
                chosen = self.row_adapters[row]
                if chosen:
                    by_key.setdefault(tuple((id(f), s) for f, s in chosen), (chosen, []))[1].append(local)
            found = self.groups[key] = [(chosen, np.asarray(rows)) for chosen, rows in by_key.values()]
        return found


class AdapterMixer:
    """The eval callback of one llama.cpp context, and the adapter rows of the call in progress."""

    def __init__(self, lib: Any) -> None:
        self._mul_mat, self._get_rows = check_layout(lib)
        self._call: _Call | None = None
        self._node: tuple[int, str] | None = None
        self._views: dict[tuple[int, int, int], np.ndarray] = {}
        self.callback = EVAL_CALLBACK(self._on_node)  # the context keeps the pointer: keep this alive

    def begin(self, items: Sequence[BatchItem], factors: Sequence[_Chosen], n_ubatch: int) -> None:
        """Arm the callback for a decode of ``items``; ``factors[i]`` are item i's adapters."""
        row_adapters: list[_Chosen] = []
        for item, chosen in zip(items, factors, strict=True):
            row_adapters.extend([chosen] * len(item.tokens))
        wanted = frozenset(name for chosen in factors for f, _ in chosen for name in f.pairs)
        self._call = _Call(micro_batches(items, n_ubatch), row_adapters, wanted)

    def end(self) -> None:
        """Disarm; raise if the decode did not go as predicted."""
        call, self._call = self._call, None
        if call is None:
            return
        if call.error is None and call.index != len(call.batches) - 1:
            call.error = f"llama.cpp computed {call.index + 1} micro-batches, {len(call.batches)} were predicted"
        if call.error is None and call.wanted and not call.updated:
            call.error = "no matmul of an adapted weight was seen (has llama.cpp renamed its weights?)"
        if call.error is not None:
            raise DecodeError(f"per-row LoRA update failed: {call.error}")

    def _on_node(self, t: int, ask: bool, _user: Any) -> bool:
        call = self._call
        if call is None or call.error is not None:
            return False
        try:
            if ask:
                op = _INT.from_address(t + _OP).value
                if op == self._get_rows:
                    self._maybe_next_batch(call, t)
                    return False
                if op != self._mul_mat:
                    return False
                name = ctypes.string_at(_ptr(t + _SRC0) + _NAME).decode("utf-8", "replace")
                if name not in call.wanted:
                    return False
                self._node = (t, name)
                return True
            if self._node is not None and self._node[0] == t:
                self._update(call, t, self._node[1])
            return True
        except Exception as exc:  # an exception must not cross into C: report it at end()
            call.error = f"{type(exc).__name__}: {exc}"
            return False

    def _maybe_next_batch(self, call: _Call, t: int) -> None:
        """The token-embedding lookup starts each micro-batch's graph."""
        weight = _ptr(t + _SRC0)
        if ctypes.string_at(weight + _NAME) == b"token_embd.weight":
            call.index += 1
            if call.index >= len(call.batches):
                raise RuntimeError(f"llama.cpp computed more micro-batches than the {len(call.batches)} predicted")
            n = _I64.from_address(_ptr(t + _SRC1) + _NE).value
            if n != len(call.batches[call.index].rows):
                raise RuntimeError(
                    f"micro-batch {call.index} has {n} rows, {len(call.batches[call.index].rows)} were predicted"
                )

    def _update(self, call: _Call, t: int, name: str) -> None:
        batch = call.batches[call.index]
        n_out, n_rows = _I64.from_address(t + _NE).value, _I64.from_address(t + _NE + 8).value
        src = _ptr(t + _SRC1)
        n_in, n_x = _I64.from_address(src + _NE).value, _I64.from_address(src + _NE + 8).value
        if n_rows not in (len(batch.rows), len(batch.outputs)):
            raise RuntimeError(f"{name}: {n_rows} rows, the micro-batch has {len(batch.rows)}")
        for tensor, width, height in ((t, n_out, n_rows), (src, n_in, n_x)):
            dtype = _INT.from_address(tensor + _TYPE).value
            nb0, nb1 = _I64.from_address(tensor + _NB).value, _I64.from_address(tensor + _NB + 8).value
            if dtype != GGML_TYPE_F32 or nb0 != 4 or nb1 != 4 * width or height != n_rows:
                raise RuntimeError(f"{name}: not a contiguous f32 matmul (type {dtype}, nb {nb0}/{nb1})")
        out = self._view(_ptr(t + _DATA), n_rows, n_out)
        x = self._view(_ptr(src + _DATA), n_rows, n_in)
        # the last layer's matmuls after llama.cpp kept only the output rows
        for chosen, index in call.row_groups(outputs=n_rows != len(batch.rows)):
            whole = len(index) == n_rows  # every row: views instead of copies (same values, same sums)
            xs, total = (x if whole else x[index]), None
            for factors, scale in chosen:  # summed in the request's order, added once
                pair = factors.pairs.get(name)
                if pair is not None:
                    delta = np.einsum("tr,ro->to", np.einsum("ti,ri->tr", xs, pair.a), pair.bt)
                    delta *= scale * pair.scale
                    total = delta if total is None else total + delta
            if total is not None:
                if whole:
                    out += total
                else:
                    out[index] += total
        call.updated += 1

    def _view(self, address: int, rows: int, width: int) -> np.ndarray:
        """A writable float32 view of tensor data; llama.cpp reuses its compute buffers from step
        to step, so the same few views recur (kept until there are too many)."""
        key = (address, rows, width)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= 1024:
                self._views.clear()
            view = self._views[key] = _floats(address, rows, width)
        return view
