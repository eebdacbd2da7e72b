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
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance import constraints, tools
from appliance.generation import (
    ContextLengthError,
    Event,
    FinishEvent,
    FinishReason,
    Generation,
    GenerationRequest,
    InvalidParameterError,
    InvalidPromptError,
    ModelUnavailableError,
    Prepared,
    QueueFullError,
    ShuttingDownError,
    TextEvent,
    TokenInfo,
    UnknownAdapterError,
    UnknownModelError,
    thread_safe_emitter,
)
from appliance.speculative import NgramIndex
from engines.base import AdapterSet, BatchItem, EngineError, LoadedAdapter, LoadedModel, Sampler, SamplingParams
from engines.chat_template import takes_system_role
from engines.textstream import TextStream

log = logging.getLogger(__name__)


ADAPTIVE_MAX_STREAMS = 2  # adaptive drafting: beyond this many decoding sequences, none drafts
PREFILL_SHARE_WHILE_DECODING = 4  # while streams decode, a step prefills at most n_batch / this
RATE_WINDOW_S = 10.0
FINISHED_KEPT = 100  # finished requests each runner remembers for ``requests()``

# Who sent the requests submitted from the current task ("local", "api-key", "unix-socket"). The
# API sets it once per HTTP request, so no route has to pass it along; it is only ever shown.
submitted_by: ContextVar[str] = ContextVar("submitted_by", default="")


@dataclass
class RunnerConfig:
    """How a runner schedules: queue bounds, prefill chunking, caching and drafting."""

    n_batch: int = 512
    max_queue: int = 64
    queue_timeout: float = 60.0
    prefix_cache: bool = True
    speculative: bool = False
    draft_max: int = 8
    # "adaptive": a sequence drafts only while its drafts pay (see ``_draft``); "always": whenever
    # its n-gram index has a guess
    draft_policy: Literal["always", "adaptive"] = "always"
    # Decode each LoRA sequence in its own call. llama.cpp's CPU matmul takes llamafile's sgemm
    # for >= 2 tokens and ggml's vec_dot for one, which round the f32/f16 adapter factors
    # differently: batched, an adapter's answer can differ (near ties) from its answer alone.
    exact_adapters: bool = True


@dataclass(eq=False)
class _Adapter:
    """A LoRA adapter loaded on a runner's model, and the requests using it.

    Requests hold the object itself, not its name: an adapter removed while in use stays loaded
    until its last request ends, even if another one is added under the same name meanwhile.
    """

    name: str
    handle: LoadedAdapter
    sha256: str | None
    created: int
    users: int = 0
    removing: bool = False
    gone: threading.Event = field(default_factory=threading.Event)


# A request's adapters with their scales, sorted by name: the key sequences are grouped by.
AdapterKey = tuple[tuple[_Adapter, float], ...]


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
    enqueued: float = field(default_factory=time.monotonic)
    adapters: AdapterKey = ()
    client: str = ""
    cancelled_by: str | None = None  # why the server cancelled it; None: its client went away
    grammar: str | None = None  # the constraint, compiled for this model's tokenizer
    # more choices of the same request (``n``): admitted with this job, they take a copy of its
    # prompt's KV instead of computing it again
    followers: list[_Job] = field(default_factory=list)


@dataclass
class _Slot:
    """A sequence slot and what its KV cache still holds from the last request it served.

    Only prompt tokens are remembered: their KV was computed in prompt chunks exactly as a fresh
    prefill computes it (see ``reusable_prefix``), so reusing it leaves answers bit-identical.
    Generated tokens were decoded one by one, maybe on another kernel path: not reused.
    """

    index: int
    cached: list[int] = field(default_factory=list)
    cached_adapters: AdapterKey = ()  # the KV of another adapter set is not this one's
    last_used: float = 0.0


@dataclass
class _Sequence:
    """A job in a slot: its prompt progress, sampler and text stream."""

    job: _Job
    slot: _Slot
    sampler: Sampler
    text: TextStream
    n_cached: int = 0
    n_prompt_done: int = 0
    n_past: int = 0
    pending: int | None = None
    completion_tokens: int = 0
    ngrams: NgramIndex | None = None
    # the adaptive drafting policy (``_draft``): how many tokens the next draft may have, how many
    # drafts in a row were mostly rejected, and the completion length before which it drafts no more
    draft_len: int = 2
    draft_misses: int = 0
    draft_resume_at: int = 0
    started: float = 0.0  # admitted to its slot
    first_token_at: float | None = None  # prefill done: the first token is being sampled
    matcher: Any = None  # the constraint's parser state (llguidance), if the request has one
    leader: _Sequence | None = None  # a choice waiting for its leader's prompt KV
    # another request's sequence computing the same leading prompt tokens: this one waits for them
    # and takes a copy of their KV instead of computing them again (``source_n`` tokens)
    source: _Sequence | None = None
    source_n: int = 0
    # its adapters as its decode calls carry them (``_place``): its own rows' (the model mixes
    # them), or the whole call's
    own_adapters: AdapterSet = ()
    call_adapters: AdapterKey = ()
    followers: list[_Sequence] = field(default_factory=list)
    logprobs: list[TokenInfo] = field(default_factory=list)  # of tokens whose text is not yet sent

    @property
    def prefilling(self) -> bool:
        return self.n_prompt_done < len(self.job.tokens)

    @property
    def computes_prompt(self) -> bool:
        return self.prefilling and self.leader is None and self.source is None


@dataclass
class RunnerStats:
    model: str
    slots: int
    active: int
    queued: int
    requests_total: int
    rejected_total: int
    timeouts_total: int
    prompt_tokens_total: int
    cached_prompt_tokens_total: int
    cache_hits_total: int
    completion_tokens_total: int
    draft_tokens_total: int
    draft_accepted_total: int
    tokens_per_second: float
    idle_seconds: float = 0.0  # since the model last had a request waiting or running (0 while busy)


@dataclass(frozen=True)
class RequestSnapshot:
    """One request as ``requests()`` shows it: where it is and how far it got. Times are unix seconds."""

    id: str
    model: str
    adapters: tuple[tuple[str, float], ...]
    client: str
    state: Literal["queued", "prefilling", "generating", "finished"]
    prompt_tokens: int
    prompt_tokens_done: int  # computed or taken from the prefix cache
    cached_tokens: int
    completion_tokens: int
    max_tokens: int
    enqueued_at: float
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_prefix(cached: list[int], tokens: list[int], exact: int) -> int:
    """How many leading prompt tokens may keep a slot's cached KV without changing the answer.

    The chunk size picks the kernel path of a prompt's rows (see ``ModelFacts.exact_chunk``): a
    prompt shorter than ``exact`` is computed in one chunk on the short path, a longer one in
    chunks of at least ``exact`` on the long path. Cached rows stand in only for rows of their own
    path, and the last chunk, which also yields the first logits, is computed again: at least
    ``exact`` tokens of a long prompt, at least one of a short one.
    """
    short = len(tokens) < exact
    if short != (len(cached) < exact):
        return 0
    keep = len(tokens) - (1 if short else exact)
    return max(0, min(common_prefix(cached, tokens), keep))


def prefill_chunk(remaining: int, budget: int, exact: int) -> int:
    """How many prompt tokens of one sequence to evaluate now (0: wait for a later step).

    Every chunk of a prompt of at least ``exact`` tokens holds at least ``exact`` tokens, and a
    shorter prompt goes in one chunk: then the KV cache does not depend on how the prompt was cut
    (see ``ModelFacts.exact_chunk``), so prefix-cached and fresh prompts give the same answer.
    """
    n = min(remaining, budget)
    if n < remaining and remaining - n < exact:
        n = remaining - exact
    return n if n >= min(exact, remaining) and n > 0 else 0


class ModelRunner:
    """The decode loop of one loaded model."""

    def __init__(
        self,
        model_id: str,
        model: LoadedModel,
        config: RunnerConfig | None = None,
        *,
        sampling_defaults: SamplingParams | None = None,
        clock: Callable[[], float] = time.monotonic,
        provenance: dict[str, str | None] | None = None,
    ) -> None:
        self.model_id = model_id
        self.model = model
        # what the request log records about the model: file sha256, quantisation, engine, backend
        self.provenance = provenance or {}
        self.config = config or RunnerConfig()
        self.sampling_defaults = sampling_defaults or SamplingParams()
        self._clock = clock
        self._busy_until = clock()  # when the decode loop last ran out of work
        self._waiting: deque[_Job] = deque()
        self._active: dict[int, _Sequence] = {}
        self._free: list[_Slot] = [_Slot(i) for i in range(model.facts.n_slots)]
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False  # being unloaded: what is queued and running ends, nothing new comes in
        self._counters = dict.fromkeys(
            (
                "requests",
                "rejected",
                "timeouts",
                "prompt_tokens",
                "cached_prompt_tokens",
                "cache_hits",
                "completion_tokens",
                "draft_tokens",
                "draft_accepted",
            ),
            0,
        )
        self._rate: deque[tuple[float, int]] = deque()
        self._finished: deque[RequestSnapshot] = deque(maxlen=FINISHED_KEPT)
        self._adapters: dict[str, _Adapter] = {}
        self._applied: AdapterKey = ()  # the adapter set of the last decode call
        self._thread = threading.Thread(target=self._run, name=f"decode-{model_id}", daemon=True)

    # ---- called from request threads -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job) -> None:
        """Queue a job (with its ``followers``, which are admitted with it, together)."""
        assert 1 + len(job.followers) <= self.model.facts.n_slots, "more choices than slots"
        with self._cond:
            if self._stopping:
                raise ShuttingDownError()
            if self._draining:
                raise unloading_error(self.model_id)
            # jobs not yet admitted will take the free slots first; beyond them, max_queue may wait
            if len(self._waiting) >= self.config.max_queue + len(self._free):
                self._counters["rejected"] += 1
                raise QueueFullError(self.model_id, len(self._waiting), retry_after=self._retry_after())
            job.enqueued = self._clock()
            for follower in job.followers:
                follower.enqueued = job.enqueued
            self._waiting.append(job)
            self._counters["requests"] += 1 + len(job.followers)
            self._cond.notify()

    def _retry_after(self) -> int:
        """A hint for clients: about one second per queued request per running one, 1..60 s."""
        return 1 if not self._active else max(1, min(60, len(self._waiting) // max(1, len(self._active))))

    def stats(self) -> RunnerStats:
        with self._cond:
            now = self._clock()
            while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
                self._rate.popleft()
            rate = sum(n for _, n in self._rate) / RATE_WINDOW_S
            return RunnerStats(
                model=self.model_id,
                slots=self.model.facts.n_slots,
                active=len(self._active),
                queued=len(self._waiting),
                **{f"{name}_total": value for name, value in self._counters.items()},
                tokens_per_second=round(rate, 2),
                idle_seconds=0.0 if self._active or self._waiting else round(now - self._busy_until, 1),
            )

    def requests(self) -> tuple[list[RequestSnapshot], list[RequestSnapshot]]:
        """The waiting and running requests, then the last finished ones (oldest first).

        Reads the counters the decode thread keeps anyway, under the lock, only when asked: the
        decode loop pays nothing per token for this.
        """
        with self._cond:
            live = [self._snapshot(each, None) for job in self._waiting for each in (job, *job.followers)]
            live += [self._snapshot(seq.job, seq) for seq in self._active.values()]
            return live, list(self._finished)

    def cancel(self, request_id: str, reason: str) -> bool:
        """End a waiting or running request as if its client went away; False if none has this id."""
        with self._cond:
            waiting = [each for job in self._waiting for each in (job, *job.followers)]
            for job in [*waiting, *(seq.job for seq in self._active.values())]:
                if job.id == request_id:
                    if not job.cancel.is_set():
                        job.cancelled_by = reason
                        job.cancel.set()
                    self._cond.notify()
                    return True
        return False

    def _snapshot(self, job: _Job, seq: _Sequence | None, finish: FinishEvent | None = None) -> RequestSnapshot:
        wall = time.time() - self._clock()
        state: Literal["queued", "prefilling", "generating", "finished"] = "queued"
        if finish is not None:
            state = "finished"
        elif seq is not None:
            state = "prefilling" if seq.prefilling else "generating"
        first = seq.first_token_at if seq is not None else None
        return RequestSnapshot(
            id=job.id,
            model=self.model_id,
            adapters=tuple((a.name, scale) for a, scale in job.adapters),
            client=job.client,
            state=state,
            prompt_tokens=len(job.tokens),
            prompt_tokens_done=seq.n_prompt_done if seq is not None else 0,
            cached_tokens=seq.n_cached if seq is not None else 0,
            completion_tokens=seq.completion_tokens if seq is not None else 0,
            max_tokens=job.max_tokens,
            enqueued_at=job.enqueued + wall,
            started_at=seq.started + wall if seq is not None else None,
            first_token_at=first + wall if first is not None else None,
            finished_at=time.time() if finish is not None else None,
            finish_reason=finish.finish_reason if finish is not None else None,
            error=finish.error if finish is not None else None,
        )

    # ---- LoRA adapters (called from request threads) ------------------------------------------
    def add_adapter(self, name: str, path: Path, *, sha256: str | None = None, created: int = 0) -> None:
        """Load an adapter beside the running model: usable by the next request, nothing reloads."""
        with self._cond:
            if name in self._adapters:
                raise ValueError(f"an adapter named '{name}' is already loaded on {self.model_id}")
        handle = self.model.load_adapter(path, name)  # the engine orders this against decoding
        with self._cond:
            self._adapters[name] = _Adapter(name, handle, sha256, created or int(time.time()))
        log.info("%s: LoRA adapter %s loaded", self.model_id, name)

    def remove_adapter(self, name: str) -> threading.Event:
        """Refuse the adapter to new requests; it is freed once the last one using it ends.

        Returns an event set when it is freed.
        """
        with self._cond:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise UnknownAdapterError(name, self.model_id, list(self._adapters))
            adapter.removing = True
            free_now = adapter.users == 0
        if free_now:
            self._free_adapter(adapter)
        else:
            log.info("%s: adapter %s removed; freed when its %d request(s) end", self.model_id, name, adapter.users)
        return adapter.gone

    def adapters(self) -> dict[str, tuple[str | None, int, int]]:
        """Loaded adapters: name -> (sha256, created, requests using it)."""
        with self._cond:
            return {a.name: (a.sha256, a.created, a.users) for a in self._adapters.values()}

    def has_adapter(self, name: str) -> bool:
        with self._cond:
            return name in self._adapters

    def acquire_adapters(self, choices: tuple[tuple[str, float], ...]) -> AdapterKey:
        """Hold the named adapters for one request (released when its ``FinishEvent`` is emitted)."""
        with self._cond:
            missing = [name for name, _ in choices if name not in self._adapters]
            if missing:
                raise UnknownAdapterError(missing[0], self.model_id, sorted(self._adapters))
            key = tuple((self._adapters[name], scale) for name, scale in sorted(choices))
            for adapter, _ in key:
                adapter.users += 1
        return key

    def release_adapters(self, key: AdapterKey) -> None:
        freed = []
        with self._cond:
            for adapter, _ in key:
                adapter.users -= 1
                if adapter.removing and adapter.users == 0:
                    freed.append(adapter)
        for adapter in freed:
            self._free_adapter(adapter)

    def _free_adapter(self, adapter: _Adapter) -> None:
        with self._cond:
            for slot in self._free:  # its KV rows are not reusable by anyone now
                if any(a is adapter for a, _ in slot.cached_adapters):
                    slot.cached, slot.cached_adapters = [], ()
        adapter.handle.close()
        adapter.gone.set()
        log.info("%s: LoRA adapter %s freed", self.model_id, adapter.name)

    def drain(self) -> None:
        """Take no new requests; those queued and running go on to their end (see ``wait_idle``)."""
        with self._cond:
            self._draining = True

    def wait_idle(self, poll: float = 0.05) -> None:
        """Wait until nothing is queued or running (the decode thread does not signal it: poll)."""
        with self._cond:
            while self._waiting or self._active:
                self._cond.wait(poll)

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
                    self._busy_until = self._clock()
                    self._cond.wait()
                if self._stopping:
                    break
                self._expire_locked()
                admitted = self._admit_locked()
            for seq in admitted:
                self.model.truncate_slot(seq.slot.index, seq.n_cached)
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

    def _expire_locked(self) -> None:
        if not self._waiting:
            return
        now = self._clock()
        keep: deque[_Job] = deque()
        for job in self._waiting:
            if job.cancel.is_set():
                event = FinishEvent("cancelled", len(job.tokens), 0, job.cancelled_by)
            elif now - job.enqueued > self.config.queue_timeout:
                self._counters["timeouts"] += 1
                message = f"no slot became free within the queue timeout of {self.config.queue_timeout:g} s"
                event = FinishEvent("timeout", len(job.tokens), 0, message)
            else:
                keep.append(job)
                continue
            for each in (job, *job.followers):
                each.emit(event)
                self._finished.append(self._snapshot(each, None, event))
        self._waiting = keep

    def _admit_locked(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        # first come first served: a request with n choices waits until n slots are free
        while self._waiting and len(self._free) > len(self._waiting[0].followers):
            job = self._waiting.popleft()
            slot, n_cached = self._pick_slot(job.tokens, job.adapters)
            seq = self._place(job, slot, n_cached)
            self._find_source(seq)
            admitted.append(seq)
            for follower in job.followers:
                other = self._place(follower, min(self._free, key=lambda s: (bool(s.cached), s.last_used)), 0)
                other.leader = seq
                seq.followers.append(other)
                admitted.append(other)
        return admitted

    def _place(self, job: _Job, slot: _Slot, n_cached: int) -> _Sequence:
        self._free.remove(slot)
        seq = _Sequence(job, slot, self.model.new_sampler(job.sampling), TextStream(job.request.stop))
        seq.n_cached = seq.n_prompt_done = seq.n_past = n_cached
        seq.started = self._clock()
        if self.model.facts.mixes_adapters and all(a.handle.mixable for a, _ in job.adapters):
            seq.own_adapters = tuple((a.handle, scale) for a, scale in job.adapters)
        else:
            seq.call_adapters = job.adapters
        if job.grammar is not None:
            seq.matcher = constraints.for_model(self.model).matcher(job.grammar)
        elif self.config.speculative:  # drafts are not checked against a constraint: none then
            seq.ngrams = NgramIndex(job.tokens)
        self._active[slot.index] = seq
        return seq

    def _find_source(self, seq: _Sequence) -> None:
        """Another running request whose prompt starts as this one's: take its KV once computed.

        Requests arriving together with one long system prompt would otherwise each compute it in
        their own slot. The rows taken are those the prefix cache would reuse (``reusable_prefix``):
        computed in chunks on the same kernel path, so the answer is bit-identical to a fresh one.
        """
        if not self.config.prefix_cache:
            return
        exact = self.model.facts.exact_chunk
        best, best_n = None, seq.n_cached
        for other in self._active.values():
            if other is seq or other.leader is not None or other.job.adapters != seq.job.adapters:
                continue
            n = reusable_prefix(other.job.tokens, seq.job.tokens, exact)
            if n > best_n:
                best, best_n = other, n
        if best is not None and best_n - seq.n_cached >= exact:  # worth waiting for
            seq.source, seq.source_n = best, best_n

    def _take_shared_prefixes(self) -> None:
        """Give each waiting sequence its source's prompt KV once computed (a copy of the slot, cut)."""
        for seq in list(self._active.values()):
            source = seq.source
            if source is None:
                continue
            if self._active.get(source.slot.index) is not source:  # it ended first: compute the prompt
                seq.source = None
            elif source.source is None and source.n_prompt_done >= seq.source_n:
                self.model.copy_slot(source.slot.index, seq.slot.index)
                self.model.truncate_slot(seq.slot.index, seq.source_n)
                seq.n_prompt_done = seq.n_past = seq.n_cached = seq.source_n  # counted as cached
                seq.source = None

    def _pick_slot(self, tokens: list[int], adapters: AdapterKey) -> tuple[_Slot, int]:
        """The free slot whose cache serves this prompt best, and how many tokens it saves.

        The longest reusable prefix wins when it covers at least half of that slot's cache or of
        the prompt (a system prompt, earlier chat turns). A mere chat-template header in common is
        not worth evicting another conversation's cache for: then an empty slot, or the one unused
        the longest, is taken. Only a cache computed with the same adapters counts.
        """
        exact = self.model.facts.exact_chunk
        fallback = min(self._free, key=lambda s: (bool(s.cached), s.last_used))
        if not self.config.prefix_cache:
            return fallback, 0

        def reusable(slot: _Slot) -> int:
            return reusable_prefix(slot.cached, tokens, exact) if slot.cached_adapters == adapters else 0

        best, best_n = max(((s, reusable(s)) for s in self._free), key=lambda p: p[1])
        if best_n and 2 * best_n >= min(len(best.cached), len(tokens)):
            return best, best_n
        return fallback, reusable(fallback)

    def _drop_cancelled(self) -> None:
        for seq in list(self._active.values()):
            if seq.job.cancel.is_set():
                self._finish(seq, "cancelled", seq.job.cancelled_by)

    def _by_adapters(self, seqs: list[_Sequence], *, split: bool = False) -> list[list[_Sequence]]:
        """Sequences grouped by the adapter set their call applies, the set applied last first;
        with ``split``, each sequence with such adapters alone (see ``RunnerConfig.exact_adapters``).

        Where the model mixes adapters (``ModelFacts.mixes_adapters``), the base and every mixable
        adapter share one group: each item carries its own adapters. Otherwise adapters apply to
        a whole llama.cpp context, so each set gets its own decode call, and switching sets makes
        llama.cpp re-reserve its compute graph (~7 ms here). Starting with the set the previous
        call left applied saves one switch per step: with base and one adapter in use, a step
        switches once instead of twice (benchmarks/lora_mixed.py).
        """
        groups: dict[AdapterKey, list[_Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.call_adapters, []).append(seq)
        calls: list[list[_Sequence]] = []
        for key, group in sorted(groups.items(), key=lambda kv: kv[0] != self._applied):
            calls.extend([[seq] for seq in group] if split and key else [group])
        return calls

    def _decode(self, items: list[BatchItem], adapters: AdapterKey) -> list[list[int]]:
        self._applied = adapters
        return self.model.decode(items, tuple((a.handle, scale) for a, scale in adapters))

    def _step(self) -> None:
        """One decode of every generating sequence, then prompt chunks, each in its own call.

        A prompt chunk gets a ``llama_decode`` call of its own: llama.cpp splits a batch into
        micro-batches with the same number of tokens per sequence, which would cut a chunk that
        shares a call with other sequences into pieces the caller does not choose. Sequences
        whose adapters apply to a whole call never share it with others (see ``_by_adapters``).
        """
        generated = 0
        budget = self.config.n_batch
        exact = self.model.facts.exact_chunk
        # in slot order: llama.cpp reuses the previous step's compute graph only when the batch
        # lists the same sequences in the same order (measured: 130 -> 168 tok/s at 32 clients)
        decoding = [seq for _, seq in sorted(self._active.items()) if seq.pending is not None]
        if decoding:
            budget -= len(decoding)
            for group in self._by_adapters(decoding, split=self.config.exact_adapters):
                items, drafts = [], []
                for seq in group:
                    assert seq.pending is not None
                    draft = self._draft(seq, budget, len(decoding))
                    budget -= len(draft)
                    drafts.append(draft)
                    items.append(
                        BatchItem(seq.slot.index, (seq.pending, *draft), seq.n_past, 1 + len(draft), seq.own_adapters)
                    )
                outputs = self._decode(items, group[0].call_adapters)
                masks = self._masks(group)
                for seq, indices, draft in zip(group, outputs, drafts, strict=True):
                    generated += self._accept(seq, indices, draft, masks.get(seq.slot.index))
            share = max(2 * exact, self.config.n_batch // PREFILL_SHARE_WHILE_DECODING)
            budget = min(self.config.n_batch, share)
        self._take_shared_prefixes()
        prefilling = [s for s in self._active.values() if s.computes_prompt]
        for seq in [s for group in self._by_adapters(prefilling) for s in group]:
            start = seq.n_prompt_done
            n = prefill_chunk(len(seq.job.tokens) - start, budget, exact)
            if n == 0:
                continue
            done = start + n == len(seq.job.tokens)
            chunk = BatchItem(
                seq.slot.index, seq.job.tokens[start : start + n], start, 1 if done else 0, seq.own_adapters
            )
            budget -= n
            (indices,) = self._decode([chunk], seq.call_adapters)
            seq.n_prompt_done += n
            seq.n_past += n
            if done:
                seq.first_token_at = self._clock()
                generated += self._share_prompt(seq, indices)
                generated += self._accept(seq, indices, [], self._masks([seq]).get(seq.slot.index))
        with self._cond:
            self._rate.append((self._clock(), generated))

    def _share_prompt(self, seq: _Sequence, indices: list[int]) -> int:
        """The other choices of a request take a copy of its prompt's KV and sample their first
        token from the same logits: bit-identical to computing the prompt again, at no cost."""
        generated = 0
        for other in seq.followers:
            if self._active.get(other.slot.index) is not other:
                continue  # cancelled meanwhile
            self.model.copy_slot(seq.slot.index, other.slot.index)
            other.leader = None
            other.n_prompt_done = other.n_past = other.n_cached = seq.n_prompt_done  # counted as cached
            other.first_token_at = seq.first_token_at
            # each its own mask (the buffer row is reused), before the leader's
            generated += self._accept(other, indices, [], self._masks([other]).get(other.slot.index))
        seq.followers = []
        return generated

    def _masks(self, seqs: list[_Sequence]) -> dict[int, Any]:
        """The allowed-token masks of the constrained sequences among ``seqs``, by slot (one call)."""
        constrained = [seq for seq in seqs if seq.matcher is not None]
        if not constrained:
            return {}
        masks = constraints.for_model(self.model).masks([seq.matcher for seq in constrained])
        return {seq.slot.index: mask for seq, mask in zip(constrained, masks, strict=True)}

    def _draft(self, seq: _Sequence, budget: int, streams: int = 1) -> list[int]:
        """The draft tokens to verify with this sequence's next token (none: decode one as usual).

        Under the adaptive policy a draft must pay for itself: verifying a draft token costs about a
        fifth of a step here whether it is kept or not. A sequence starts with drafts of 2 tokens and
        doubles the length (up to ``draft_max``) each time a whole draft is kept (copying, editing,
        quoting); a draft mostly rejected (open chat: few guesses hold) stops its drafting for 4, then
        8, ... up to 64 tokens, and the next draft is 2 tokens again. With more than
        ``ADAPTIVE_MAX_STREAMS`` sequences decoding, the step is already full of useful tokens and no
        sequence drafts.
        """
        if seq.ngrams is None or budget <= 0:
            return []
        adaptive = self.config.draft_policy == "adaptive"
        if adaptive and (streams > ADAPTIVE_MAX_STREAMS or seq.completion_tokens < seq.draft_resume_at):
            return []
        room = min(self.config.draft_max, budget, seq.job.max_tokens - seq.completion_tokens - 1)
        room = min(room, self.model.facts.n_ctx_per_slot - seq.n_past - 1)
        return seq.ngrams.draft(min(room, seq.draft_len) if adaptive else room)

    def _accept(self, seq: _Sequence, indices: list[int], draft: list[int], mask: Any = None) -> int:
        """Sample the outputs of one item in order, keeping drafts while the sampler agrees."""
        base = seq.n_past if seq.pending is None else seq.n_past + 1  # KV now holds pending too
        seq.pending = None
        kept = 0
        for i, index in enumerate(indices):
            token = seq.sampler.sample(index, mask)  # a constrained sequence has no drafts
            if not self._on_token(seq, token):
                break  # finished: its slot is already released
            if i < len(draft) and token == draft[i]:
                kept += 1
                continue
            break
        if draft:
            with self._cond:
                self._counters["draft_tokens"] += len(draft)
                self._counters["draft_accepted"] += kept
            if kept == len(draft):
                seq.draft_misses, seq.draft_len = 0, min(self.config.draft_max, 2 * seq.draft_len)
            elif 2 * kept >= len(draft):
                seq.draft_misses = 0
            else:
                seq.draft_misses += 1
                seq.draft_len = 2
                seq.draft_resume_at = seq.completion_tokens + min(64, 2 ** (seq.draft_misses + 1))
        if seq.slot.index in self._active:
            seq.n_past = base + kept
            if kept < len(draft):
                self.model.truncate_slot(seq.slot.index, seq.n_past)  # drop the rejected drafts' KV
        return kept + 1

    def _on_token(self, seq: _Sequence, token: int) -> bool:
        """Hand one sampled token to the request; False once the sequence has finished."""
        if self.model.is_end_of_generation(token):
            self._finish(seq, "stop")
            return False
        seq.completion_tokens += 1
        if seq.ngrams is not None:
            seq.ngrams.append(token)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            self._finish(seq, "error", f"the output constraint refused token {token}: {seq.matcher.get_error()}")
            return False
        data = self.model.token_bytes(token)
        logprob = seq.sampler.last_logprob
        if logprob is not None:
            top = tuple((self.model.token_bytes(t), p) for t, p in logprob.top)
            seq.logprobs.append(TokenInfo(data, logprob.logprob, top))
        delta = seq.text.feed(data)
        if delta.text:
            seq.job.emit(TextEvent(delta.text, self._take_logprobs(seq)))
        if delta.stopped or (seq.matcher is not None and seq.matcher.is_stopped()):
            self._finish(seq, "stop")
        elif seq.completion_tokens >= seq.job.max_tokens:
            self._finish(seq, "length")
        else:
            seq.pending = token
            return True
        return False

    @staticmethod
    def _take_logprobs(seq: _Sequence) -> tuple[TokenInfo, ...]:
        taken = tuple(seq.logprobs)
        seq.logprobs.clear()
        return taken

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        if reason in ("stop", "length"):
            tail = seq.text.finish()
            if tail.text:
                seq.job.emit(TextEvent(tail.text, self._take_logprobs(seq)))
        for other in seq.followers:  # ended before its prompt was done: they compute their own
            other.leader = None
        seq.followers = []
        job = seq.job
        event = FinishEvent(reason, len(job.tokens), seq.completion_tokens, error, seq.n_cached)
        seq.sampler.close()
        slot = seq.slot
        # rows of a long prompt are long-path rows: a shorter cache would pass for short-path rows
        exact = self.model.facts.exact_chunk
        usable = reason != "error" and (seq.n_prompt_done >= exact or len(job.tokens) < exact)
        slot.cached = job.tokens[: seq.n_prompt_done] if usable else []
        slot.cached_adapters = job.adapters
        slot.last_used = self._clock()
        if not slot.cached:
            self.model.truncate_slot(slot.index, 0)
        with self._cond:
            del self._active[slot.index]
            self._free.append(slot)
            c = self._counters
            c["prompt_tokens"] += len(job.tokens)
            c["cached_prompt_tokens"] += seq.n_cached
            c["cache_hits"] += 1 if seq.n_cached else 0
            c["completion_tokens"] += seq.completion_tokens
            self._finished.append(self._snapshot(job, seq, event))
        job.emit(event)  # last: a client that sees its answer end sees the counters and the free slot too

    def _fail_all(self, message: str) -> None:
        for seq in list(self._active.values()):
            self._finish(seq, "error", message)

    def _shutdown(self) -> None:
        message = "the server stopped before the generation ended"
        for seq in list(self._active.values()):
            self._finish(seq, "shutdown", message)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            for each in (job, *job.followers):
                each.emit(FinishEvent("shutdown", len(job.tokens), 0, message))


def unloading_error(model: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        model, f"The model '{model}' is being unloaded; retry in a moment.", code="model_unloading", retry_after=1
    )


class Scheduler:
    """Routes requests to the runner of their model; the API's only way to the engines.

    Models come and go while it serves (``add``, ``detach``): the routing tables are replaced,
    never changed in place, so a request thread reading them never sees one half-changed.
    """

    def __init__(self) -> None:
        self._runners: dict[str, ModelRunner] = {}
        self._aliases: dict[str, str] = {}
        self._leaving: dict[str, str] = {}  # ids and aliases of models being unloaded -> their id
        self._accepting = True

    def add(self, runner: ModelRunner, aliases: tuple[str, ...] = ()) -> None:
        model_id = runner.model_id
        self._runners = {**self._runners, model_id: runner}
        self._aliases = {**{alias: model_id for alias in aliases}, **self._aliases}
        self._leaving = {name: m for name, m in self._leaving.items() if m != model_id}
        runner.start()

    def detach(self, model_id: str) -> ModelRunner:
        """Stop routing requests to a model and drain its runner; the caller waits and stops it.

        A request naming it meanwhile gets a 503 to retry (``model_unloading``), not a 404.
        """
        runner = self._runners[model_id]
        runner.drain()
        names = [model_id, *(alias for alias, m in self._aliases.items() if m == model_id)]
        self._leaving = {**self._leaving, **dict.fromkeys(names, model_id)}
        self._runners = {m: r for m, r in self._runners.items() if m != model_id}
        self._aliases = {alias: m for alias, m in self._aliases.items() if m != model_id}
        return runner

    def forget(self, model_id: str) -> None:
        """A detached model is gone: its name is unknown again (or loadable on demand)."""
        self._leaving = {name: m for name, m in self._leaving.items() if m != model_id}

    @property
    def model_ids(self) -> list[str]:
        return list(self._runners)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def resolve(self, model: str) -> ModelRunner:
        """The runner of a model id or alias, also of an adapter's id ``<model>:<adapter>``."""
        return self.target(model)[0]

    def target(self, model: str) -> tuple[ModelRunner, str | None]:
        """The runner a model id selects, and the adapter its ``:<adapter>`` suffix names, if any."""
        runner = self._runner(model)
        if runner is not None:
            return runner, None
        base, _, adapter = model.rpartition(":")
        runner = self._runner(base)
        if runner is None and (model in self._leaving or base in self._leaving):
            raise unloading_error(self._leaving.get(model) or self._leaving[base])
        if runner is None or not runner.has_adapter(adapter):
            raise UnknownModelError(model, self.model_ids + [m for m, _, _ in self.adapter_models()])
        return runner, adapter

    def routes(self, model: str) -> bool:
        """Whether a request naming this model (or adapter) would reach a loaded runner now."""
        try:
            self.target(model)
        except (UnknownModelError, ModelUnavailableError):
            return False
        return True

    def _runner(self, model: str) -> ModelRunner | None:
        return self._runners.get(model if model in self._runners else self._aliases.get(model, ""))

    def adapter_models(self) -> list[tuple[str, str, int]]:
        """Every loaded adapter as a model of its own: (id, parent model, created)."""
        return [
            (f"{runner.model_id}:{name}", runner.model_id, created)
            for runner in self._runners.values()
            for name, (_, created, _) in runner.adapters().items()
        ]

    @staticmethod
    def adapter_choices(implied: str | None, explicit: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        """The adapter set of a request: the model id's adapter at scale 1, rescaled or joined by
        the ``lora`` field's; a zero scale removes an adapter, so it computes exactly the base."""
        chosen = {implied: 1.0} if implied else {}
        chosen.update(dict(explicit))
        return tuple(sorted((name, scale) for name, scale in chosen.items() if scale != 0.0))

    def stats(self) -> list[RunnerStats]:
        return [r.stats() for r in self._runners.values()]

    def requests(self) -> tuple[list[RequestSnapshot], list[RequestSnapshot]]:
        """Every model's waiting and running requests (first come first), then the finished ones (newest first)."""
        live: list[RequestSnapshot] = []
        finished: list[RequestSnapshot] = []
        for runner in self._runners.values():
            running, done = runner.requests()
            live += running
            finished += done
        live.sort(key=lambda r: r.enqueued_at)
        finished.sort(key=lambda r: r.finished_at or 0.0, reverse=True)
        return live, finished

    def cancel(self, request_id: str, reason: str) -> bool:
        """Cancel a waiting or running request by the id its client sees; False if there is none."""
        return any(runner.cancel(request_id, reason) for runner in self._runners.values())

    def capacity(self, model: str) -> int:
        """How many requests a model can hold at once: its slots plus its wait queue.

        One API request with more prompts than this could never be accepted, even on an idle
        server: that is the client's mistake (400), not an overload to retry (503).
        """
        runner = self.resolve(model)
        return runner.model.facts.n_slots + runner.config.max_queue

    @property
    def busy(self) -> bool:
        """Whether any model is generating or has requests waiting (shutdown waits for this)."""
        return any(s.active or s.queued for s in self.stats())

    def prepare(self, request: GenerationRequest) -> tuple[ModelRunner, Prepared]:
        """Resolve the model (and adapter) id, render and tokenize the prompt, bound the completion
        and compile its constraint (blocking: run it off the loop)."""
        runner, implied = self.target(request.model)
        model = runner.model
        field = "messages" if request.messages is not None else "prompt"  # what errors name
        tool_format = None
        grammar = request.grammar
        if request.messages is not None:
            messages, definitions = list(request.messages), list[dict[str, Any]]()
            if request.tools is not None or any(m.tool_calls or m.role == "tool" for m in messages):
                tool_format = tools.detect_format(model.chat_template)
                system_role = takes_system_role(model.chat_template)
                messages, definitions = tools.prompt_messages(
                    messages, request.tools, tool_format, system_role=system_role
                )
                if request.tools is not None:
                    specials = constraints.for_model(model).special_tokens(tools.markers(tool_format))
                    grammar = tools.grammar(request.tools, tool_format, request.grammar, specials)
            try:
                text = model.render_chat(messages, definitions)
            except EngineError as exc:
                raise InvalidPromptError(str(exc), field) from exc
            tokens = model.tokenize(text, add_special=True)
        elif request.prompt_tokens is not None:
            tokens = list(request.prompt_tokens)
            bad = [t for t in tokens if not 0 <= t < model.facts.n_vocab]
            if bad:
                message = f"Token id {bad[0]} is outside the vocabulary (0..{model.facts.n_vocab - 1})."
                raise InvalidPromptError(message, field)
        else:
            tokens = model.tokenize(request.prompt or "", add_special=True)
        outside = [t for t, _ in request.sampling.get("logit_bias", ()) if not 0 <= t < model.facts.n_vocab]
        if outside:
            raise InvalidParameterError(
                "logit_bias",
                f"Token id {outside[0]} in logit_bias is outside the vocabulary (0..{model.facts.n_vocab - 1}).",
            )
        n_ctx = model.facts.n_ctx_per_slot
        if not tokens:
            raise InvalidPromptError("The prompt is empty after tokenization.", field)
        if len(tokens) >= n_ctx or (request.max_tokens is not None and len(tokens) + request.max_tokens > n_ctx):
            raise ContextLengthError(n_ctx, len(tokens), request.max_tokens, field)
        max_tokens = request.max_tokens if request.max_tokens is not None else n_ctx - len(tokens)
        compiled = constraints.for_model(model).compile(grammar) if grammar is not None else None
        if request.tools is None or request.tools.choice == "none":
            tool_format = None  # no calls asked for (maybe some in the history): the answer is plain text
        return runner, Prepared(tokens, max_tokens, implied, compiled, tool_format)

    async def submit(
        self, request: GenerationRequest, request_id: str | None = None, client: str | None = None
    ) -> Generation:
        """Queue a request; ``client`` (who sent it, for ``requests()``) defaults to ``submitted_by``."""
        (generation,) = await self.submit_choices([request], request_id, client)
        return generation

    async def submit_choices(
        self, requests: list[GenerationRequest], request_id: str | None = None, client: str | None = None
    ) -> list[Generation]:
        """Queue the ``n`` choices of one request (the same prompt; their sampling may differ).

        Where the model has the slots for them, they are admitted together and the prompt is
        computed once: the others copy its KV. Ids: ``request_id``, then ``request_id-1``...
        """
        if not self._accepting:
            raise ShuttingDownError()
        runner, prepared = await asyncio.to_thread(self.prepare, requests[0])
        base = request_id or uuid.uuid4().hex
        made = [
            self._job(runner, prepared, r, base if i == 0 else f"{base}-{i}", client) for i, r in enumerate(requests)
        ]
        jobs = [job for job, _ in made]
        groups = [jobs] if len(jobs) <= runner.model.facts.n_slots else [[job] for job in jobs]
        submitted: list[_Job] = []
        try:
            for leader, *followers in groups:
                leader.followers = followers
                runner.submit(leader)
                submitted.append(leader)
        except BaseException:
            for job in jobs:
                if job in submitted:
                    job.cancel.set()
                else:
                    runner.release_adapters(job.adapters)
            raise
        return [generation for _, generation in made]

    def _job(
        self, runner: ModelRunner, prepared: Prepared, request: GenerationRequest, job_id: str, client: str | None
    ) -> tuple[_Job, Generation]:
        implied = prepared.implied_adapter
        choices = self.adapter_choices(implied, request.adapters)
        adapters = runner.acquire_adapters(choices)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        to_client = thread_safe_emitter(asyncio.get_running_loop(), queue)

        def emit(event: Event) -> None:
            if isinstance(event, FinishEvent):  # every job ends with exactly one
                runner.release_adapters(adapters)
            to_client(event)

        shown = f"{runner.model_id}:{implied}" if implied else runner.model_id
        generation = Generation(job_id, shown, len(prepared.tokens), queue)
        generation.base_model = runner.model_id
        generation.provenance = runner.provenance
        generation.adapters = tuple((a.name, scale, a.sha256) for a, scale in adapters)
        generation.tool_format = prepared.tool_format
        job = _Job(
            id=generation.id,
            tokens=prepared.tokens,
            request=request,
            sampling=dataclasses.replace(runner.sampling_defaults, **request.sampling),
            max_tokens=prepared.max_tokens,
            emit=emit,
            cancel=generation._cancel,
            adapters=adapters,
            client=submitted_by.get() if client is None else client,
            grammar=prepared.grammar,
        )
        return job, generation

    def begin_shutdown(self) -> None:
        """Stop accepting new requests; running ones go on until ``stop``."""
        self._accepting = False

    def stop(self) -> None:
        self._accepting = False
        for runner in self._runners.values():
            runner.stop()
