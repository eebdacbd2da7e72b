"""Keeping a running server's loaded adapters in step with the adapter store.

The store is the one source of truth: the HTTP routes and ``appliance lora add|remove`` both
change it, and ``AdapterSync`` makes the runners match. A route syncs at once, so an added
adapter answers its first request without a restart; a change made by the CLI in another process
is picked up by a poll of the manifest (every second). Removing an adapter refuses it to new
requests at once and frees it when the last request using it ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.generation import ModelUnavailableError, UnknownModelError
from appliance.lora.store import AdapterRecord, AdapterStore, AdapterStoreError
from appliance.scheduler import Scheduler
from engines.base import AdapterLoadError

log = logging.getLogger(__name__)

POLL_S = 1.0

# model id or alias -> (canonical model id, the model's file); raises for an unknown model
BaseResolver = Callable[[str], tuple[str, Path]]


@dataclass(frozen=True)
class AdapterState:
    """A stored adapter and what the running server makes of it."""

    record: AdapterRecord
    loaded: bool
    in_use: int
    error: str | None


class AdapterSync:
    def __init__(self, store: AdapterStore, scheduler: Scheduler, resolve_base: BaseResolver) -> None:
        self.store = store
        self._scheduler = scheduler
        self._resolve_base = resolve_base
        self._lock = threading.Lock()
        self._errors: dict[str, str] = {}
        self._seen: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="lora-sync", daemon=True)

    # ---- what the routes call ---------------------------------------------------------------
    def add(self, source: Path, *, base: str, name: str | None = None) -> AdapterState:
        """Validate and store an adapter, then load it on its base model if that one is served."""
        base_id, base_file = self._resolve_base(base)
        record = self.store.add(source, base=base_id, base_file=base_file, name=name)
        self.sync()
        error = self._errors.get(record.name)
        if error is not None:  # our checks passed but llama.cpp refused it: do not keep it
            self.store.remove(record.name)
            self.sync()
            raise AdapterStoreError(error)
        return self.state(record.name)

    def remove(self, name: str) -> list[threading.Event]:
        """Take an adapter out of the store; returns events set when each loaded copy is freed."""
        self.store.remove(name)
        return self.sync()

    def state(self, name: str) -> AdapterState:
        return self._state(self.store.get(name))

    def states(self) -> list[AdapterState]:
        return [self._state(r) for r in self.store.records()]

    def _state(self, record: AdapterRecord) -> AdapterState:
        try:
            loaded = self._scheduler.resolve(record.base).adapters().get(record.name)
        except (UnknownModelError, ModelUnavailableError):  # its base model is not loaded here
            loaded = None
        return AdapterState(record, loaded is not None, loaded[2] if loaded else 0, self._errors.get(record.name))

    # ---- reconciling ------------------------------------------------------------------------
    def sync(self) -> list[threading.Event]:
        """Load what the store adds, drop what it no longer has; returns the drops' events."""
        with self._lock:
            self._seen = self.store.version()
            try:
                records = self.store.records()
            except AdapterStoreError as exc:
                log.error("%s", exc)
                return []
            gone: list[threading.Event] = []
            for model_id in self._scheduler.model_ids:
                try:
                    runner = self._scheduler.resolve(model_id)
                except (UnknownModelError, ModelUnavailableError):  # unloaded meanwhile
                    continue
                wanted = {r.name: r for r in records if r.base == model_id}
                for name, (sha256, _, _) in runner.adapters().items():
                    if name not in wanted or wanted[name].sha256 != sha256:
                        gone.append(runner.remove_adapter(name))
                for name, record in wanted.items():
                    if runner.has_adapter(name) or name in self._errors:
                        continue
                    try:
                        runner.add_adapter(name, self.store.path(record), sha256=record.sha256, created=record.created)
                    except (AdapterLoadError, ValueError) as exc:
                        log.error("LoRA adapter %s not loaded: %s", name, exc)
                        self._errors[name] = str(exc)
            names = {r.name for r in records}
            self._errors = {n: e for n, e in self._errors.items() if n in names}
            return gone

    def start(self) -> None:
        self.sync()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            if self.store.version() != self._seen:
                self.sync()
