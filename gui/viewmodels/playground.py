"""The Playground: a streaming chat with one model, or the same prompt to two side by side.

Each column (a ``Lane``) keeps its own transcript, because two models answer differently and each
answer becomes that column's history. A turn streams in a worker thread; every piece arrives on
the GUI thread through ``tasks.run``'s progress signal; Stop sets the lane's cancel event, which
closes the stream (the server frees the slot at its next step).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import Signal

from gui import tasks
from gui.client import ApiClient, StreamEvent
from gui.viewmodels.base import ScreenViewModel


@dataclass
class Turn:
    role: str
    content: str
    # measured for assistant turns
    ttft_ms: float | None = None
    tokens: int | None = None
    prompt_tokens: int | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    done: bool = True


@dataclass
class Lane:
    model: str
    turns: list[Turn] = field(default_factory=list)
    cancel: threading.Event | None = None

    @property
    def streaming(self) -> bool:
        return self.cancel is not None


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256


class PlaygroundViewModel(ScreenViewModel):
    title = "Playground"
    lane_changed = Signal(int)  # a lane's transcript changed (a piece arrived)

    def __init__(self, client: ApiClient) -> None:
        super().__init__(client)
        self.models: list[str] = []
        self.lanes: list[Lane] = [Lane(model="")]
        self.system_prompt = ""
        self.sampling = Sampling()

    # -- loading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        self.call(self.client.models, self._got_models, notify_loaded=True)

    def _got_models(self, cards: list[dict[str, Any]]) -> None:
        self.models = [card["id"] for card in cards]
        for lane in self.lanes:
            if lane.model not in self.models and self.models:
                lane.model = self.models[0]

    # -- choices -----------------------------------------------------------------------------

    def set_model(self, lane: int, model: str) -> None:
        self.lanes[lane].model = model
        self.changed.emit()

    def set_compare(self, model: str | None) -> None:
        """A second column answering the same prompts (``None``: one column)."""
        if model is None:
            self.lanes = self.lanes[:1]
        elif len(self.lanes) == 1:
            self.lanes.append(Lane(model=model, turns=[Turn(t.role, t.content) for t in self.lanes[0].turns]))
        else:
            self.lanes[1].model = model
        self.changed.emit()

    @property
    def streaming(self) -> bool:
        return any(lane.streaming for lane in self.lanes)

    def clear(self) -> None:
        self.stop()
        for lane in self.lanes:
            lane.turns.clear()
        self.changed.emit()

    # -- a turn ------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        text = text.strip()
        if not text or self.streaming:
            return
        for index, lane in enumerate(self.lanes):
            lane.turns.append(Turn("user", text))
            self._answer(index)
        self.changed.emit()

    def regenerate(self) -> None:
        """Answer the last user message again, in every lane."""
        if self.streaming:
            return
        for index, lane in enumerate(self.lanes):
            while lane.turns and lane.turns[-1].role == "assistant":
                lane.turns.pop()
            if lane.turns:
                self._answer(index)
        self.changed.emit()

    def stop(self) -> None:
        for lane in self.lanes:
            if lane.cancel is not None:
                lane.cancel.set()

    def _answer(self, index: int) -> None:
        lane = self.lanes[index]
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        messages += [{"role": t.role, "content": t.content} for t in lane.turns if not t.error]
        body = {
            "model": lane.model,
            "messages": messages,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_tokens,
        }
        turn = Turn("assistant", "", done=False)
        lane.turns.append(turn)
        cancel = lane.cancel = threading.Event()
        started = time.monotonic()
        first: list[float] = []

        def stream(emit: Any) -> None:
            for event in self.client.stream_chat(body, cancel):
                emit(event)

        def piece(event: StreamEvent) -> None:
            if event.text:
                if not first:
                    first.append(time.monotonic())
                    turn.ttft_ms = (first[0] - started) * 1000
                turn.content += event.text
            if event.usage:
                turn.tokens = event.usage.get("completion_tokens")
                turn.prompt_tokens = event.usage.get("prompt_tokens")
            self.lane_changed.emit(index)

        def finished(_: Any = None, error: str | None = None) -> None:
            turn.done, turn.error, lane.cancel = True, error, None
            if first and turn.tokens:
                elapsed = time.monotonic() - first[0]
                turn.tokens_per_s = (turn.tokens - 1) / elapsed if elapsed > 0 and turn.tokens > 1 else None
            self.lane_changed.emit(index)
            self.changed.emit()

        tasks.run(stream, finished, lambda message: finished(error=message), on_progress=piece)
