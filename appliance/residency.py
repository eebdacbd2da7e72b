"""Which registered chat models are in memory, and for how long: loaded on demand, unloaded when idle.

Ollama and LM Studio users expect a request naming a model to load it, an idle model to go after
a while (``keep_alive``), and load/unload by hand. ``Residency`` does that around the scheduler.
A load goes through the loader the composition root hands in: it plans the model against the
memory the loaded ones leave, and refuses (``ModelUnavailableError``, a 503 with the reason)
what would not fit, so a request can never get the server killed for memory. An unload detaches
the model from routing, lets its queued and running requests end, then frees it.

Each load and unload runs on a thread of its own, one load at a time (each is planned against
what the previous ones took). The loaded models go on decoding on their own threads, and the
event loop only awaits a future: requests to other models never wait behind a load. Requests
naming a model that is loading all wait for that one load; a request naming a model that is
being unloaded waits for the unload, then loads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from appliance.generation import ModelUnavailableError
from appliance.memory import return_freed_memory
from appliance.scheduler import Scheduler

if TYPE_CHECKING:
    from appliance.hardware.planner import ModelPlan
    from appliance.scheduler import ModelRunner

log = logging.getLogger(__name__)

State = Literal["loaded", "loading", "unloading", "not_loaded"]
DEFAULT_ON_DEMAND_KEEP_ALIVE = 300.0  # Ollama's default: a model loaded by a request goes after 5 idle minutes


@dataclass(frozen=True)
class Resident:
    """A model the loader brought into memory, as the scheduler runs it."""

    runner: ModelRunner
    plan: ModelPlan | None
    aliases: tuple[str, ...] = ()
    keep_alive: float | None = None  # seconds idle before it is unloaded; None: it stays


# registered model id -> the loaded model, planned beside the plans given; raises ModelUnavailableError
Loader = Callable[[str, Sequence["ModelPlan"]], Resident]
# a request's model name (id or alias) -> the registered chat model's id; None: no such chat model
Lookup = Callable[[str], str | None]
# starts (or finds) a model's load or unload: its future and kind; (None, ...) when there is nothing to do
_Begin = Callable[[str], tuple["Future[ModelStatus] | None", str]]


@dataclass(frozen=True)
class ModelStatus:
    """One model's state, as ``/v1/models`` and the load/unload routes show it."""

    model: str
    state: State
    keep_alive: float | None = None  # while loaded: the idle time that unloads it (None: never)
    loaded_at: float | None = None  # wall clock
    load_seconds: float | None = None  # the last load, from the request to a runner taking requests
    idle_seconds: float | None = None
    last_error: str | None = None  # why the last load failed, until one succeeds
    plan: ModelPlan | None = None


@dataclass
class _Op:
    kind: Literal["loading", "unloading"]
    future: Future[ModelStatus]


@dataclass
class _History:
    loaded_at: float | None = None
    load_seconds: float | None = None
    last_error: str | None = None


class Residency:
    """Loads, unloads and expires the scheduler's models; see the module's docstring."""

    def __init__(
        self,
        scheduler: Scheduler,
        lookup: Lookup,
        loader: Loader,
        *,
        on_loaded: Callable[[str], object] | None = None,
        poll_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheduler = scheduler
        self._lookup = lookup
        self._loader = loader
        self._on_loaded = on_loaded
        self._poll = poll_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time: each is planned beside the last
        self._resident: dict[str, Resident] = {}
        self._ops: dict[str, _Op] = {}
        self._history: dict[str, _History] = {}
        self._stop = threading.Event()
        self._expiry = threading.Thread(target=self._expire_loop, name="keep-alive", daemon=True)

    # ---- state ------------------------------------------------------------------------------
    def adopt(self, resident: Resident) -> None:
        """A model loaded at start-up, already added to the scheduler."""
        with self._lock:
            self._resident[resident.runner.model_id] = resident
            self._history[resident.runner.model_id] = _History(time.time())

    def plans(self) -> list[ModelPlan]:
        with self._lock:
            return [r.plan for r in self._resident.values() if r.plan is not None]

    def status(self, model_id: str) -> ModelStatus:
        with self._lock:
            resident, op = self._resident.get(model_id), self._ops.get(model_id)
            history = self._history.get(model_id, _History())
        state: State = op.kind if op is not None else "loaded" if resident is not None else "not_loaded"
        if resident is None:
            return ModelStatus(model_id, state, last_error=history.last_error)
        stats = resident.runner.stats()
        return ModelStatus(
            model_id,
            state,
            keep_alive=resident.keep_alive,
            loaded_at=history.loaded_at,
            load_seconds=history.load_seconds,
            idle_seconds=stats.idle_seconds,
            last_error=history.last_error,
            plan=resident.plan,
        )

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def model_id(self, name: str) -> str | None:
        """The registered chat model a request's ``model`` names (an adapter's id names its base)."""
        found = self._lookup(name)
        if found is None and ":" in name:
            found = self._lookup(name.rpartition(":")[0])
        return found

    # ---- loading ----------------------------------------------------------------------------
    async def ensure(self, name: str) -> None:
        """Load the model a request names if it is registered and not loaded; return once it serves.

        A name the scheduler routes already costs nothing here; a name that is no registered chat
        model is left for the scheduler to refuse (404) with its usual message.
        """
        if self._scheduler.routes(name) or not self._scheduler.accepting:  # shutting down: never start a load
            return
        model_id = await asyncio.to_thread(self.model_id, name)  # it reads models.toml
        if model_id is not None:
            await self.load(model_id)

    async def load(self, model_id: str) -> ModelStatus:
        """Load a registered chat model (if not loaded) and return its state once it serves."""
        return await self._settled(self._begin_load, "loading", model_id)

    async def unload(self, model_id: str) -> ModelStatus:
        """Unload a model once its queued and running requests end; a model not loaded stays as it is."""
        return await self._settled(self._begin_unload, "unloading", model_id)

    async def _settled(self, begin: _Begin, mine: str, model_id: str) -> ModelStatus:
        """Start (or join) the operation, waiting first for one of the other kind under way."""
        while True:
            future, kind = begin(model_id)
            if future is None:
                return self.status(model_id)
            try:
                await asyncio.wrap_future(future)
            except ModelUnavailableError:
                if kind == mine == "loading":
                    raise  # a load that failed leaves nothing to unload: only a load reports it
            if kind == mine:
                return self.status(model_id)

    def _begin_load(self, model_id: str) -> tuple[Future[ModelStatus] | None, str]:
        """The load (or the unload to wait for first) under way for this model; None if it is loaded."""
        with self._lock:
            op = self._ops.get(model_id)
            if op is not None:
                return op.future, op.kind
            if model_id in self._resident:
                return None, "loaded"
            future: Future[ModelStatus] = Future()
            self._ops[model_id] = _Op("loading", future)
        threading.Thread(target=self._load, args=(model_id, future), name=f"load-{model_id}", daemon=True).start()
        return future, "loading"

    def _load(self, model_id: str, future: Future[ModelStatus]) -> None:
        started = self._clock()
        try:
            with self._load_lock:
                log.info("loading %s on demand", model_id)
                with short_gil_turns():
                    resident = self._loader(model_id, self.plans())
                self._scheduler.add(resident.runner, aliases=resident.aliases)
            seconds = round(self._clock() - started, 3)
            with self._lock:
                self._resident[model_id] = resident
                self._history[model_id] = _History(time.time(), seconds)
                del self._ops[model_id]
            log.info("%s loaded in %.2f s (%s)", model_id, seconds, _keep_alive_text(resident.keep_alive))
            if self._on_loaded is not None:
                self._on_loaded(model_id)
            future.set_result(self.status(model_id))
        except BaseException as exc:
            if not isinstance(exc, ModelUnavailableError):
                log.exception("loading %s failed", model_id)
                exc = ModelUnavailableError(model_id, f"loading '{model_id}' failed: {exc}")
            log.warning("%s not loaded: %s", model_id, exc)
            with self._lock:
                self._history.setdefault(model_id, _History()).last_error = str(exc)
                self._ops.pop(model_id, None)
            future.set_exception(exc)

    # ---- unloading ----------------------------------------------------------------------------
    def _begin_unload(self, model_id: str) -> tuple[Future[ModelStatus] | None, str]:
        with self._lock:
            op = self._ops.get(model_id)
            if op is not None:
                return op.future, op.kind
            if model_id not in self._resident:
                return None, "not_loaded"
            future: Future[ModelStatus] = Future()
            self._ops[model_id] = _Op("unloading", future)
        threading.Thread(target=self._unload, args=(model_id, future), name=f"unload-{model_id}", daemon=True).start()
        return future, "unloading"

    def _unload(self, model_id: str, future: Future[ModelStatus]) -> None:
        try:
            runner = self._scheduler.detach(model_id)
            runner.wait_idle()  # the requests it holds end as they would have
            runner.stop()
            del runner
            return_freed_memory()
            with self._lock:
                del self._resident[model_id]
                del self._ops[model_id]
            self._scheduler.forget(model_id)
            log.info("%s unloaded", model_id)
            future.set_result(self.status(model_id))
        except BaseException as exc:
            log.exception("unloading %s failed", model_id)
            with self._lock:
                self._ops.pop(model_id, None)
            future.set_exception(exc)

    # ---- keep_alive -------------------------------------------------------------------------
    def start(self) -> None:
        self._expiry.start()

    def close(self) -> None:
        self._stop.set()
        if self._expiry.is_alive():
            self._expiry.join(5)

    def expire(self) -> list[str]:
        """Unload every model idle for longer than its keep_alive; the ones unloaded."""
        with self._lock:
            candidates = [(m, r) for m, r in self._resident.items() if r.keep_alive is not None and m not in self._ops]
        gone = []
        for model_id, resident in candidates:
            stats = resident.runner.stats()
            if stats.active or stats.queued or stats.idle_seconds < resident.keep_alive:  # type: ignore[operator]
                continue
            log.info("%s: idle %.0f s, past its keep_alive: unloading", model_id, stats.idle_seconds)
            future, _ = self._begin_unload(model_id)  # or the load or unload that started meanwhile
            if future is not None:
                with contextlib.suppress(ModelUnavailableError):
                    future.result()
            gone.append(model_id)
        return gone

    def _expire_loop(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self.expire()
            except Exception:  # the next poll tries again; serving goes on
                log.exception("keep_alive check failed")


@contextlib.contextmanager
def short_gil_turns(seconds: float = 0.0005) -> Iterator[None]:
    """While a model loads, threads take turns at the GIL every 0.5 ms instead of Python's 5 ms.

    A load runs stretches of pure Python (reading a 262k-token vocabulary and the file's header),
    and a decode step of a serving model needs the GIL a dozen times between its native calls:
    at 5 ms a wait, its tokens stalled 60-110 ms while a load parsed (2 cores). Loads run one at
    a time, so the setting is restored when the one that set it ends.
    """
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _keep_alive_text(seconds: float | None) -> str:
    return "stays loaded" if seconds is None else f"unloaded after {seconds:g} s idle"
