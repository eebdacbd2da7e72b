"""The embedding models behind ``/v1/embeddings``: found at start-up, loaded on first use, run off the event loop.

What the scheduler is to chat models, this is to embedding models, only simpler: an embedding is
one forward pass with no decode loop, so there are no slots. Every embedding model in the registry
is offered (the built-in all-MiniLM-L6-v2 and any GGUF embedding model the user imported); each is
loaded the first time a request names it, so a server that never embeds pays nothing.

All embedding work runs in one worker thread, one request at a time, with few threads of its own
(``embedding_threads``, default 1): a burst of embedding requests queues here instead of taking the
cores that chat decoding needs. At most ``max_queue`` requests wait; more get 503, as chat does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.generation import ApplianceError, InvalidParameterError, QueueFullError
from appliance.registry import ModelSpec
from engines import formats
from engines.base import EngineError
from engines.embeddings import Embedder, EmbedderFacts, EmbeddingInputError, Vectors

log = logging.getLogger(__name__)

MAX_REQUEST_TOKENS = 300_000  # OpenAI's own cap on the tokens of one embeddings request

# (spec, its file) -> a loaded embedder; bootstrap picks the engine, tests may pass a fake
EmbedderLoader = Callable[[ModelSpec, Path], Embedder]


class EmbeddingModelError(ApplianceError):
    """An embedding model cannot be loaded or failed while running (a 500: the request was fine)."""


class RequestTooLargeError(InvalidParameterError):
    """The inputs of one request add up to more tokens than a request may hold (a 400 naming ``input``)."""

    def __init__(self, tokens: int) -> None:
        super().__init__(
            "input",
            f"The inputs add up to {tokens} tokens; one request may hold at most {MAX_REQUEST_TOKENS}. "
            "Send them in several requests.",
        )


@dataclass
class EmbeddingEntry:
    """One registered embedding model: its file, or why it cannot be served here."""

    spec: ModelSpec
    path: Path | None
    problem: str | None = None
    embedder: Embedder | None = field(default=None, repr=False)

    @property
    def provenance(self) -> dict[str, Any]:
        """What the request log records about the model, as for chat models."""
        return {
            "model_sha256": self.spec.sha256,
            "quantization": self.spec.quantization,
            "engine": self.spec.engine,
            "backend": formats.RUNTIMES.get(self.spec.engine, self.spec.engine),
            "device": "cpu",
        }


@dataclass(frozen=True)
class Embedded:
    vectors: Vectors
    tokens: list[int]  # per input


class EmbeddingModels:
    """The embedding models this server answers with, by id and alias."""

    def __init__(self, entries: Sequence[EmbeddingEntry], load: EmbedderLoader, *, max_queue: int = 64) -> None:
        self._entries = {e.spec.id: e for e in entries}
        self._names = {alias: e.spec.id for e in entries for alias in e.spec.aliases} | {
            e.spec.id: e.spec.id for e in entries
        }
        self._load = load
        self._max_queue = max_queue
        self._waiting = 0
        self._load_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings")

    @property
    def model_ids(self) -> list[str]:
        """The ids of the models a request may name (those whose files are here)."""
        return [i for i, e in self._entries.items() if e.problem is None]

    def find(self, name: str) -> EmbeddingEntry | None:
        model_id = self._names.get(name)
        return self._entries[model_id] if model_id is not None else None

    def _loaded(self, entry: EmbeddingEntry) -> Embedder:
        with self._load_lock:
            if entry.embedder is None:
                assert entry.path is not None, "an unavailable model is never loaded"
                try:
                    entry.embedder = self._load(entry.spec, entry.path)
                except (EngineError, OSError) as exc:
                    raise EmbeddingModelError(f"The embedding model '{entry.spec.id}' cannot be loaded: {exc}") from exc
                log.info("loaded embedding model %s: %s", entry.spec.id, entry.embedder.facts.description)
            return entry.embedder

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def facts(self, entry: EmbeddingEntry) -> EmbedderFacts:
        """The model's facts, loading it first if this is its first request."""
        if entry.embedder is not None:
            return entry.embedder.facts
        embedder: Embedder = await self._run(lambda: self._loaded(entry))
        return embedder.facts

    async def embed(
        self, entry: EmbeddingEntry, texts: Sequence[str] = (), tokens: Sequence[Sequence[int]] = ()
    ) -> Embedded:
        """Embed texts (tokenised first) or token lists, in the worker.

        The engine's ``EmbeddingInputError`` (``InputTooLongError``) names the input at fault; the
        route turns it into a 400.
        """
        if self._waiting >= self._max_queue + 1:  # the one running plus max_queue waiting
            raise QueueFullError(entry.spec.id, self._waiting - 1, retry_after=1)

        def work() -> Embedded:
            embedder = self._loaded(entry)
            ids = embedder.tokenize(texts) if texts else tokens
            total = sum(len(t) for t in ids)
            if total > MAX_REQUEST_TOKENS:
                raise RequestTooLargeError(total)
            try:
                vectors = embedder.embed(ids)
            except EmbeddingInputError:
                raise
            except EngineError as exc:
                raise EmbeddingModelError(f"The embedding model '{entry.spec.id}' failed: {exc}") from exc
            return Embedded(vectors, [len(t) for t in ids])

        self._waiting += 1
        try:
            result: Embedded = await self._run(work)
        finally:
            self._waiting -= 1
        return result

    def close(self) -> None:
        """Free every loaded model once the work in hand is done."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for entry in self._entries.values():
            if entry.embedder is not None:
                entry.embedder.close()
                entry.embedder = None
