"""Sentence embeddings from a GGUF model through llama.cpp (nomic-embed, bge, e5, gte... or any model
given a pooling type).

llama.cpp computes the sentence vector itself: the context is made with ``embeddings = true`` and a
pooling type (the file's ``<arch>.pooling_type``, or the one models.toml gives), and
``llama_get_embeddings_seq`` returns the pooled vector of a sequence after it is evaluated.

Exactness: each input is evaluated on its own, in a context emptied first, so its vector is the one
it gets when sent alone, bit for bit. Several inputs in one llama.cpp batch would share the batch's
attention (masked, but summed over a longer row), which changes the last bits; an embedding model's
inputs are short, and one at a time costs little next to the matrix products.

llama_cpp is imported through ``engines.gguf``, which initialises its backend once for every model.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import EngineError, ModelLoadError
from engines.embeddings import EmbedderFacts, Vectors, check_inputs, l2_normalised
from engines.gguf import check_gguf_file, device_list, load_llama, use_extra_buffers

log = logging.getLogger(__name__)

# llama.cpp's enum llama_pooling_type
POOLING_TYPES = {"mean": 1, "cls": 2, "last": 3}
_POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
MAX_TOKENS = 8192  # per input, at most: the context (and llama.cpp's buffers) is sized to the limit


class GgufEmbedder:
    """One GGUF model loaded for embeddings, on the CPU, evaluating one input at a time."""

    def __init__(
        self, path: Path, *, threads: int = 1, pooling: str | None = None, max_tokens: int | None = None
    ) -> None:
        check_gguf_file(path)
        if pooling is not None and pooling not in POOLING_TYPES:
            raise ModelLoadError(path, f"unknown pooling '{pooling}' (use mean, cls or last)")
        lib = load_llama()
        self._lib = lib
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._devices = device_list((), path)  # an explicit empty list: the CPU, even in a GPU build
        mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        mparams.use_extra_bufts = use_extra_buffers(lib, None)
        model = lib.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not model:
            raise ModelLoadError(path, "llama.cpp could not load it (corrupt, truncated or unsupported)")
        self._model: Any = model
        self._ctx: Any = None
        self._batch: Any = None
        self._lock = threading.Lock()
        try:
            self._open_context(path, threads, pooling, max_tokens)
        except BaseException:
            self.close()
            raise

    def _open_context(self, path: Path, threads: int, pooling: str | None, max_tokens: int | None) -> None:
        lib, model = self._lib, self._model
        n_ctx_train = int(lib.llama_model_n_ctx_train(model)) or MAX_TOKENS
        limit = min(n_ctx_train, max_tokens or MAX_TOKENS, MAX_TOKENS)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = limit
        cparams.n_batch = limit  # a non-causal model must see a whole input in one micro-batch
        cparams.n_ubatch = limit
        cparams.n_seq_max = 1
        cparams.n_threads = max(1, threads)
        cparams.n_threads_batch = max(1, threads)
        cparams.embeddings = True
        cparams.pooling_type = POOLING_TYPES[pooling] if pooling else -1  # -1: the file's own
        cparams.no_perf = True
        cparams.op_offload = False
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(path, "llama.cpp could not create a context (out of memory?)")
        self._ctx = ctx
        kind = _POOLING_NAMES.get(int(lib.llama_pooling_type(ctx)), "unknown")
        if kind not in POOLING_TYPES:
            why = "it is a reranker" if kind == "rank" else "the file sets no pooling type"
            raise ModelLoadError(
                path,
                f'not an embedding model: {why}; to embed with it anyway, set pooling = "mean" (or cls, last) '
                "in its models.toml entry",
            )
        self._memory = lib.llama_get_memory(ctx)  # none for encoder-only models such as BERT
        self._encode = bool(lib.llama_model_has_encoder(model)) and not bool(lib.llama_model_has_decoder(model))
        self._batch = lib.llama_batch_init(limit, 0, 1)
        vocab = lib.llama_model_get_vocab(model)
        self._vocab = vocab
        from engines.ggufmeta import model_size  # here: ggufmeta imports engines.gguf

        n_embd = int(lib.llama_model_n_embd(model))
        self._facts = EmbedderFacts(
            dimensions=n_embd,
            max_tokens=min(limit, int(lib.llama_n_ctx(ctx))),  # llama.cpp rounds the context up; positions do not
            n_vocab=int(lib.llama_vocab_n_tokens(vocab)),
            pooling=kind,
            description=f"{model_size(path)}, {n_embd} dimensions, {kind} pooling (llama.cpp)",
        )

    @property
    def facts(self) -> EmbedderFacts:
        return self._facts

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # special-token text in an input is embedded as text, never parsed as control tokens
        return [self._tokenize(text) for text in texts]

    def _tokenize(self, text: str) -> list[int]:
        lib, data = self._lib, text.encode("utf-8")
        cap = len(data) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, True, False)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, True, False)
        return list(buf[:n])

    def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        check_inputs(inputs, self._facts)
        out = np.empty((len(inputs), self._facts.dimensions), dtype=np.float32)
        with self._lock:
            if self._ctx is None:
                raise EngineError("the embedding model was closed")
            for i, ids in enumerate(inputs):
                out[i] = l2_normalised(self._embed_one(ids)[None, :])[0]
        return out

    def _embed_one(self, ids: Sequence[int]) -> np.ndarray[Any, np.dtype[np.float32]]:
        lib, batch = self._lib, self._batch
        if self._memory:
            lib.llama_memory_clear(self._memory, True)
        for j, token in enumerate(ids):
            batch.token[j] = token
            batch.pos[j] = j
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = 1  # every token's state takes part in the pooling
        batch.n_tokens = len(ids)
        rc = lib.llama_encode(self._ctx, batch) if self._encode else lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama.cpp failed to evaluate the input (code {rc})")
        pointer = lib.llama_get_embeddings_seq(self._ctx, 0)
        if not pointer:
            raise EngineError("llama.cpp gave no pooled embedding for the input")
        return np.ctypeslib.as_array(pointer, shape=(self._facts.dimensions,)).astype(np.float32, copy=True)

    def close(self) -> None:
        lib = self._lib
        with self._lock:  # never while an input is being evaluated
            if self._batch is not None:
                lib.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                lib.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                lib.llama_model_free(self._model)
                self._model = None
