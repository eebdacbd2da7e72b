"""The scheduler: owns loaded models, their sequence slots, the wait queue and the decode loop.

One ``ModelRunner`` per loaded model runs a single decode thread. Each step it admits waiting
requests into free slots, then builds one batch holding the next token of every generating
sequence plus prompt chunks of admitted ones (bounded by ``n_batch`` so a long prompt never
stalls running streams for long), decodes it once, and samples every sequence with its own
sampler. A request's events go to its own queue, so one client can never cut or corrupt
another's stream; a cancelled request leaves the batch at the next step and frees its slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from appliance.generation import (
    ContextLengthError,
    Event,
    FinishEvent,
    FinishReason,
    Generation,
    GenerationRequest,
    InvalidPromptError,
    QueueFullError,
    ShuttingDownError,
    TextEvent,
    UnknownModelError,
    thread_safe_emitter,
)
from engines.base import BatchItem, EngineError, LoadedModel, Sampler, SamplingParams
from engines.textstream import TextStream

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """A request accepted by a runner, waiting for or holding a slot."""

    id: str
    tokens: list[int]
    request: GenerationRequest
    sampling: SamplingParams
    max_tokens: int
    emit: Callable[[Event], None]
    cancel: threading.Event


@dataclass
class _Sequence:
    """A job in a slot: its prompt progress, sampler and text stream."""

    job: _Job
    slot: int
    sampler: Sampler
    text: TextStream
    n_prompt_done: int = 0
    n_past: int = 0
    pending: int | None = None
    completion_tokens: int = 0

    @property
    def prefilling(self) -> bool:
        return self.n_prompt_done < len(self.job.tokens)


@dataclass
class RunnerStats:
    model: str
    slots: int
    active: int
    queued: int
    requests_total: int
    prompt_tokens_total: int
    completion_tokens_total: int


class ModelRunner:
    """The decode loop of one loaded model."""

    def __init__(
        self,
        model_id: str,
        model: LoadedModel,
        *,
        n_batch: int,
        max_queue: int,
        sampling_defaults: SamplingParams | None = None,
    ) -> None:
        self.model_id = model_id
        self.model = model
        self.sampling_defaults = sampling_defaults or SamplingParams()
        self.n_batch = n_batch
        self.max_queue = max_queue
        self._waiting: deque[_Job] = deque()
        self._active: dict[int, _Sequence] = {}
        self._free_slots = list(range(model.facts.n_slots))
        self._cond = threading.Condition()
        self._stopping = False
        self._requests_total = 0
        self._prompt_tokens_total = 0
        self._completion_tokens_total = 0
        self._thread = threading.Thread(target=self._run, name=f"decode-{model_id}", daemon=True)

    # ---- called from request threads -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError()
            # jobs not yet admitted will take the free slots first; beyond them, max_queue may wait
            if len(self._waiting) >= self.max_queue + len(self._free_slots):
                raise QueueFullError(self.model_id, len(self._waiting), retry_after=1)
            self._waiting.append(job)
            self._requests_total += 1
            self._cond.notify()

    def stats(self) -> RunnerStats:
        with self._cond:
            return RunnerStats(
                model=self.model_id,
                slots=self.model.facts.n_slots,
                active=len(self._active),
                queued=len(self._waiting),
                requests_total=self._requests_total,
                prompt_tokens_total=self._prompt_tokens_total,
                completion_tokens_total=self._completion_tokens_total,
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still running and wait for the decode thread to exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.model.close()

    # ---- the decode thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                self._admit_locked()
            self._drop_cancelled()
            if self._active:
                try:
                    self._step()
                except EngineError as exc:
                    log.error("decode step failed for %s: %s", self.model_id, exc)
                    self._fail_all(str(exc))
                except Exception:  # a bug must not kill the loop and hang every client
                    log.exception("unexpected error in the decode loop of %s", self.model_id)
                    self._fail_all("internal error in the decode loop")
        self._shutdown()

    def _admit_locked(self) -> None:
        while self._waiting and self._free_slots:
            job = self._waiting.popleft()
            if job.cancel.is_set():
                job.emit(FinishEvent("cancelled", len(job.tokens), 0))
                continue
            slot = self._free_slots.pop(0)
            self.model.clear_slot(slot)
            seq = _Sequence(job, slot, self.model.new_sampler(job.sampling), TextStream(job.request.stop))
            self._active[slot] = seq

    def _drop_cancelled(self) -> None:
        for seq in list(self._active.values()):
            if seq.job.cancel.is_set():
                self._finish(seq, "cancelled")

    def _step(self) -> None:
        items: list[BatchItem] = []
        budget = self.n_batch
        for seq in self._active.values():
            if seq.pending is not None:
                items.append(BatchItem(seq.slot, (seq.pending,), seq.n_past, True))
                budget -= 1
        for seq in self._active.values():
            if budget <= 0:
                break
            if seq.prefilling:
                start = seq.n_prompt_done
                chunk = seq.job.tokens[start : start + budget]
                done = start + len(chunk) == len(seq.job.tokens)
                items.append(BatchItem(seq.slot, chunk, start, done))
                budget -= len(chunk)
        outputs = self.model.decode(items)
        for item in items:
            seq = self._active[item.slot]
            if seq.prefilling:
                seq.n_prompt_done += len(item.tokens)
            seq.n_past += len(item.tokens)
            seq.pending = None
        for slot, index in outputs:
            seq = self._active[slot]
            self._on_token(seq, seq.sampler.sample(index))

    def _on_token(self, seq: _Sequence, token: int) -> None:
        if self.model.is_end_of_generation(token):
            self._finish(seq, "stop")
            return
        seq.completion_tokens += 1
        delta = seq.text.feed(self.model.token_bytes(token))
        if delta.text:
            seq.job.emit(TextEvent(delta.text))
        if delta.stopped:
            self._finish(seq, "stop")
        elif seq.completion_tokens >= seq.job.max_tokens:
            self._finish(seq, "length")
        else:
            seq.pending = token

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        if reason in ("stop", "length"):
            tail = seq.text.finish()
            if tail.text:
                seq.job.emit(TextEvent(tail.text))
        seq.job.emit(FinishEvent(reason, len(seq.job.tokens), seq.completion_tokens, error))
        seq.sampler.close()
        self.model.clear_slot(seq.slot)
        with self._cond:
            del self._active[seq.slot]
            self._free_slots.append(seq.slot)
            self._free_slots.sort()
            self._prompt_tokens_total += len(seq.job.tokens)
            self._completion_tokens_total += seq.completion_tokens

    def _fail_all(self, message: str) -> None:
        for seq in list(self._active.values()):
            self._finish(seq, "error", message)

    def _shutdown(self) -> None:
        for seq in list(self._active.values()):
            self._finish(seq, "cancelled", "server shutting down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit(FinishEvent("cancelled", len(job.tokens), 0, "server shutting down"))


class Scheduler:
    """Routes requests to the runner of their model; the API's only way to the engines."""

    def __init__(self) -> None:
        self._runners: dict[str, ModelRunner] = {}
        self._aliases: dict[str, str] = {}
        self._accepting = True

    def add(self, runner: ModelRunner, aliases: tuple[str, ...] = ()) -> None:
        self._runners[runner.model_id] = runner
        for alias in aliases:
            self._aliases.setdefault(alias, runner.model_id)
        runner.start()

    @property
    def model_ids(self) -> list[str]:
        return list(self._runners)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def resolve(self, model: str) -> ModelRunner:
        model_id = model if model in self._runners else self._aliases.get(model, "")
        runner = self._runners.get(model_id)
        if runner is None:
            raise UnknownModelError(model, self.model_ids)
        return runner

    def stats(self) -> list[RunnerStats]:
        return [r.stats() for r in self._runners.values()]

    def prepare(self, request: GenerationRequest) -> tuple[ModelRunner, list[int], int]:
        """Render and tokenize the prompt and bound the completion (blocking: run it off the loop)."""
        runner = self.resolve(request.model)
        model = runner.model
        if request.messages is not None:
            try:
                text = model.render_chat(request.messages)
            except EngineError as exc:
                raise InvalidPromptError(str(exc)) from exc
            tokens = model.tokenize(text, add_special=True)
        elif request.prompt_tokens is not None:
            tokens = list(request.prompt_tokens)
            bad = [t for t in tokens if not 0 <= t < model.facts.n_vocab]
            if bad:
                raise InvalidPromptError(f"Token id {bad[0]} is outside the vocabulary (0..{model.facts.n_vocab - 1}).")
        else:
            tokens = model.tokenize(request.prompt or "", add_special=True)
        n_ctx = model.facts.n_ctx_per_slot
        if not tokens:
            raise InvalidPromptError("The prompt is empty after tokenization.")
        if len(tokens) >= n_ctx or (request.max_tokens is not None and len(tokens) + request.max_tokens > n_ctx):
            raise ContextLengthError(n_ctx, len(tokens), request.max_tokens)
        max_tokens = request.max_tokens if request.max_tokens is not None else n_ctx - len(tokens)
        return runner, tokens, max_tokens

    async def submit(self, request: GenerationRequest, request_id: str | None = None) -> Generation:
        if not self._accepting:
            raise ShuttingDownError()
        runner, tokens, max_tokens = await asyncio.to_thread(self.prepare, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        generation = Generation(request_id or uuid.uuid4().hex, runner.model_id, len(tokens), queue)
        job = _Job(
            id=generation.id,
            tokens=tokens,
            request=request,
            sampling=dataclasses.replace(runner.sampling_defaults, **request.sampling),
            max_tokens=max_tokens,
            emit=thread_safe_emitter(loop, queue),
            cancel=generation._cancel,
        )
        runner.submit(job)
        return generation

    def begin_shutdown(self) -> None:
        """Stop accepting new requests; running ones go on until ``stop``."""
        self._accepting = False

    def stop(self) -> None:
        self._accepting = False
        for runner in self._runners.values():
            runner.stop()
