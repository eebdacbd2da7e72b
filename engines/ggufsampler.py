"""llama.cpp's sampler chain, per sequence: on a llama.cpp context's logits or on any logits array.

One chain for every engine (logit bias -> penalties -> top-k -> top-p -> min-p -> temperature ->
dist, or greedy), so a request's ``seed``, penalties and settings mean the same thing whichever
engine serves it. ``GgufSampler`` reads the logits llama.cpp's context holds; ``ArraySampler``
takes them from a numpy row (the ONNX engine's outputs) and runs the very same chain on them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from engines.base import SamplingParams, TokenLogprob, TokenMask

_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of the model's distribution (before temperature and the other settings)."""
    x = logits.astype(np.float64)
    finite = x[np.isfinite(x)]
    top = float(finite.max()) if finite.size else 0.0
    result: np.ndarray = x - (top + float(np.log(np.exp(finite - top).sum())))
    return result


def top_logprobs(logprobs: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    k = min(k, len(logprobs))
    best = np.argpartition(-logprobs, k - 1)[:k]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return tuple((int(t), float(logprobs[t])) for t in best)


def allowed_tokens(allowed: TokenMask, n_vocab: int) -> np.ndarray:
    """llguidance's packed bitmask as one bool per token."""
    return np.unpackbits(allowed.view(np.uint8), bitorder="little", count=n_vocab).view(bool)


def new_chain(lib: Any, n_vocab: int, params: SamplingParams) -> Any:
    """A ``llama_sampler`` chain for these settings; the caller frees it with ``llama_sampler_free``."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    add = lib.llama_sampler_chain_add
    if params.logit_bias:  # first: OpenAI's bias is added to the model's logits, before anything else
        biases = (lib.llama_logit_bias * len(params.logit_bias))(
            *(lib.llama_logit_bias(token, bias) for token, bias in params.logit_bias)
        )
        add(chain, lib.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
    if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        penalties = lib.llama_sampler_init_penalties(
            n_vocab, params.penalty_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
        )
        add(chain, penalties)
    if params.greedy:
        add(chain, lib.llama_sampler_init_greedy())
    else:
        if params.top_k > 0:
            add(chain, lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
        add(chain, lib.llama_sampler_init_temp(params.temperature))
        seed = _RANDOM_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        add(chain, lib.llama_sampler_init_dist(seed))
    return chain


class _ChainSampler:
    """What both samplers share: the chain, the log-probabilities asked for, freeing."""

    def __init__(self, lib: Any, n_vocab: int, params: SamplingParams) -> None:
        self._lib = lib
        self._n_vocab = n_vocab
        self._logprobs = params.logprobs
        self.last_logprob: TokenLogprob | None = None
        self._chain: Any = new_chain(lib, n_vocab, params)

    def _note(self, token: int, logprobs: np.ndarray | None) -> None:
        if self._logprobs is not None and logprobs is not None:
            self.last_logprob = TokenLogprob(token, float(logprobs[token]), top_logprobs(logprobs, self._logprobs))

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None


class GgufSampler(_ChainSampler):
    """The chain on a llama.cpp context's logits (``llama_get_logits_ith``)."""

    def __init__(self, lib: Any, ctx: Any, n_vocab: int, params: SamplingParams) -> None:
        super().__init__(lib, n_vocab, params)
        self._ctx = ctx

    def sample(self, output_index: int, allowed: TokenMask | None = None) -> int:
        logprobs = None
        if allowed is not None or self._logprobs is not None:
            pointer = self._lib.llama_get_logits_ith(self._ctx, output_index)
            logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
            if allowed is not None:
                # the context's own logits buffer: -inf here is what every sampler of the chain sees
                np.copyto(logits, -np.inf, where=~allowed_tokens(allowed, self._n_vocab))
            if self._logprobs is not None:
                logprobs = log_softmax(logits)
        # llama_sampler_sample also accepts the token into the chain (penalty history).
        token = int(self._lib.llama_sampler_sample(self._chain, self._ctx, output_index))
        self._note(token, logprobs)
        return token


# llama_token_data as numpy lays it out, so a logits row becomes the chain's input in one copy
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class ArraySampler(_ChainSampler):
    """The chain on logits an engine computed itself: ``logits(output_index)`` gives the row.

    It does what ``llama_sampler_sample`` does on a context (candidates from the logits, apply the
    chain, accept the pick), so a seed draws the same tokens from the same logits in both engines.
    The row is read, never written: several choices of one request may share it.
    """

    def __init__(self, lib: Any, n_vocab: int, params: SamplingParams, logits: Callable[[int], np.ndarray]) -> None:
        super().__init__(lib, n_vocab, params)
        self._logits = logits
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = lib.llama_token_data_array(
            data=self._data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )

    def sample(self, output_index: int, allowed: TokenMask | None = None) -> int:
        row = self._logits(output_index)[: self._n_vocab]
        data = self._data
        data["id"] = self._ids
        data["logit"] = row
        data["p"] = 0.0
        if allowed is not None:
            data["logit"][~allowed_tokens(allowed, self._n_vocab)] = -np.inf
        logprobs = log_softmax(data["logit"]) if self._logprobs is not None else None
        array = self._array
        array.size, array.selected, array.sorted = self._n_vocab, -1, False
        self._lib.llama_sampler_apply(self._chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        # the chain may have shrunk and reordered the candidates in place; data.ctypes is still their buffer
        token = int(array.data[array.selected].id)
        self._lib.llama_sampler_accept(self._chain, token)
        self._note(token, logprobs)
        return token
