"""The sentence-embedding contract: what ``/v1/embeddings`` needs of a model, whatever runs it.

Two engines implement it: ``engines.onnx_embed`` (a sentence-transformers encoder exported to ONNX,
the default model) and ``engines.gguf_embed`` (a GGUF model through llama.cpp). Nothing here imports
a runtime, so the serving layer can hold these types and catch these errors without paying for one.

Every embedder promises that an input's vector does not depend on what it is batched with: the
serving layer may group inputs from one request as it likes, and a client gets the vector it would
get by sending that input alone (bit for bit; each engine says how it keeps that promise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engines.base import EngineError

Vectors = np.ndarray[Any, np.dtype[np.float32]]


class EmbeddingInputError(EngineError):
    """One input cannot be embedded; ``index`` says which."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class InputTooLongError(EmbeddingInputError):
    """An input has more tokens than the model takes."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(index, f"input {index} has {tokens} tokens; this model takes at most {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True)
class EmbedderFacts:
    """What the serving layer needs to know about a loaded embedding model."""

    dimensions: int  # the length of each vector
    max_tokens: int  # per input, special tokens included
    n_vocab: int  # token ids a client sends must be below this
    pooling: str  # "mean", "cls" or "last": how token states become one vector
    description: str  # for the log line, e.g. "bert 22M int8 (onnxruntime)"


class Embedder(Protocol):
    """A loaded embedding model. Calls may come from any thread; the embedder serialises its own work."""

    @property
    def facts(self) -> EmbedderFacts: ...

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the model takes them, special tokens included (nothing is cut)."""
        ...

    def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        """One L2-normalised float32 vector per token list, each equal to the one computed alone.

        Raises ``InputTooLongError`` or ``EmbeddingInputError`` for the first input it cannot take.
        """
        ...

    def close(self) -> None: ...


def check_inputs(inputs: Sequence[Sequence[int]], facts: EmbedderFacts) -> None:
    """Raise the typed error for the first input the model cannot take (a bad id can crash a runtime)."""
    for i, ids in enumerate(inputs):
        if not ids:
            raise EmbeddingInputError(i, f"input {i} has no tokens")
        if len(ids) > facts.max_tokens:
            raise InputTooLongError(i, len(ids), facts.max_tokens)
        bad = next((t for t in ids if not 0 <= t < facts.n_vocab), None)
        if bad is not None:
            raise EmbeddingInputError(
                i, f"input {i} has token id {bad}, outside the vocabulary (0..{facts.n_vocab - 1})"
            )


def l2_normalised(vectors: Vectors) -> Vectors:
    """Each row divided by its length (rows of zeros stay zeros), in float32 as OpenAI sends them."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float32))
    result: Vectors = vectors / np.maximum(norms, np.float32(1e-12))[:, None]
    return result


def shortened(vectors: Vectors, dimensions: int) -> Vectors:
    """The first ``dimensions`` values of each vector, normalised again: how Matryoshka-trained models
    (nomic-embed-text v1.5, OpenAI's text-embedding-3) give shorter vectors. Wrong for other models."""
    return l2_normalised(np.ascontiguousarray(vectors[:, :dimensions]))
