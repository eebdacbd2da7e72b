"""Internal request and event types between the API edge and the scheduler.

The API converts OpenAI wire models into a ``GenerationRequest`` once, at the edge; the
scheduler never sees HTTP or pydantic. Errors are typed so the API maps them to status codes by
class, never by matching message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from engines.base import ChatMessage

if TYPE_CHECKING:
    from appliance.constraints import Grammar
    from appliance.tools import ToolFormat, ToolRequest

# "cancelled": the client went away; "shutdown": the server stopped before the generation ended
FinishReason = Literal["stop", "length", "cancelled", "timeout", "error", "shutdown"]


class ApplianceError(Exception):
    """Base of errors the API turns into an OpenAI-shaped response."""


class UnknownModelError(ApplianceError):
    def __init__(self, model: str, available: list[str]) -> None:
        names = ", ".join(available) or "none"
        super().__init__(f"The model '{model}' does not exist or is not loaded. Loaded models: {names}.")
        self.model = model


class UnknownAdapterError(ApplianceError):
    """A request names a LoRA adapter the model does not have loaded."""

    def __init__(self, name: str, model: str, available: list[str]) -> None:
        names = ", ".join(available) or "none"
        super().__init__(f"The LoRA adapter '{name}' is not loaded on model '{model}'. Loaded adapters: {names}.")
        self.name = name


class ContextLengthError(ApplianceError):
    def __init__(self, n_ctx: int, prompt_tokens: int, max_tokens: int | None, param: str = "messages") -> None:
        if max_tokens is None:
            msg = (
                f"This model's maximum context length is {n_ctx} tokens. However, your {param} "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the {param}."
            )
        else:
            msg = (
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} "
                f"in the completion). Please reduce the length of the {param} or completion."
            )
        super().__init__(msg)
        self.param = param  # the request field that holds the prompt: "messages" or "prompt"


class InvalidPromptError(ApplianceError):
    """The prompt cannot be built (e.g. the chat template rejects the conversation)."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


class InvalidParameterError(ApplianceError):
    """A request parameter the model cannot take (e.g. a logit_bias token outside its vocabulary)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(ApplianceError):
    def __init__(self, model: str, depth: int, retry_after: int) -> None:
        super().__init__(f"The server is at capacity for model '{model}' ({depth} requests waiting). Retry later.")
        self.retry_after = retry_after


class ModelUnavailableError(ApplianceError):
    """A registered model cannot answer now: it does not fit beside the loaded ones, its file has a
    problem, or it is being unloaded. A 503: the server is fine, and the message says what would help."""

    def __init__(
        self, model: str, message: str, code: str = "model_unavailable", retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.code = code
        self.retry_after = retry_after


class ShuttingDownError(ApplianceError):
    def __init__(self) -> None:
        super().__init__("The server is shutting down.")


class GenerationFailedError(ApplianceError):
    """The engine failed while generating; the server keeps running."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete: either a conversation or raw text/tokens."""

    model: str
    # only the values the client set; the model's defaults fill the rest
    sampling: Mapping[str, Any] = field(default_factory=dict)
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_tokens: tuple[int, ...] | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    # LoRA adapters by name with their scales, on top of any the model id selects
    adapters: tuple[tuple[str, float], ...] = ()
    grammar: Grammar | None = None  # the answer's constraint (response_format)
    tools: ToolRequest | None = None


@dataclass(frozen=True)
class Prepared:
    """A request made ready for a runner: its prompt tokens, bound, constraint and tool format."""

    tokens: list[int]
    max_tokens: int
    implied_adapter: str | None = None  # the adapter the model id names
    grammar: str | None = None  # checked against the model's tokenizer (``ModelConstraints.compile``)
    tool_format: ToolFormat | None = None


@dataclass(frozen=True)
class TokenInfo:
    """A generated token's bytes and log-probability, with the likeliest alternatives (bytes, logprob)."""

    data: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TextEvent:
    text: str
    logprobs: tuple[TokenInfo, ...] = ()  # of the tokens this text came from, when asked for


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    # prompt tokens whose KV came from the slot's prefix cache instead of being computed
    cached_tokens: int = 0


Event = TextEvent | FinishEvent


@dataclass
class Generation:
    """A submitted request: an async stream of events, cancellable from any thread."""

    id: str
    model: str
    prompt_tokens: int
    _queue: asyncio.Queue[Event] = field(repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    finish: FinishEvent | None = None
    base_model: str = ""  # the loaded model under the id answered as ``model``
    # what the request log records of that model (file sha256, quantisation, engine, device): kept
    # here, as the model may be unloaded before the record is written
    provenance: dict[str, str | None] = field(default_factory=dict, repr=False)
    adapters: tuple[tuple[str, float, str | None], ...] = ()  # applied: name, scale, file sha256
    tool_format: ToolFormat | None = None  # how to read tool calls out of the text, when tools were offered
    # what was consumed so far, for the request log: the text and when its first piece came
    parts: list[str] = field(default_factory=list, repr=False)
    logprobs: list[TokenInfo] = field(default_factory=list, repr=False)
    first_text_at: float | None = None  # time.monotonic()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    async def events(self) -> AsyncIterator[Event]:
        """Yield text events, then exactly one ``FinishEvent``."""
        while True:
            event = await self._queue.get()
            if isinstance(event, TextEvent):
                if self.first_text_at is None:
                    self.first_text_at = time.monotonic()
                self.parts.append(event.text)
                self.logprobs.extend(event.logprobs)
            elif isinstance(event, FinishEvent):
                # before the yield: a consumer that stops at the finish event (an error event
                # ends the stream) closes this generator there, and the cause must stay known
                self.finish = event
            yield event
            if isinstance(event, FinishEvent):
                return

    async def collect(self) -> tuple[str, FinishEvent]:
        async for _ in self.events():
            pass
        assert self.finish is not None
        return self.text, self.finish


def thread_safe_emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A callable the decode thread uses to hand events to the event loop that awaits them."""

    def emit(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return emit
