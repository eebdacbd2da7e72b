"""One exchange as the API hands it to the log: plain data, turned into a row by the writer.

A row must always be storable, whatever the client sent: SQLite keeps text as UTF-8, which cannot
hold the lone surrogates a JSON ``\\udfff`` escape decodes to, and ``json.dumps`` gives up on values
nested too deep. ``to_row`` therefore never raises on the record's content: such values are
stored repaired or cut short, and the row's ``log_note`` says what was changed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "client_error", "cancelled", "server_error"]

# how much of a refused request is kept (refusals are stored compactly: see ``compact``)
REFUSAL_MAX_STRING = 1024
REFUSAL_MAX_ITEMS = 32
REFUSAL_MAX_DEPTH = 8
# beyond this depth a value cannot be serialised (the JSON encoder's recursion limit is near 1000)
STORABLE_MAX_DEPTH = 200
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(value: str) -> tuple[str, bool]:
    """``value`` with lone surrogates replaced by U+FFFD, and whether anything was replaced."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value), True
    return value, False


def bounded(
    value: Any, *, max_depth: int, max_string: int | None = None, max_items: int | None = None
) -> tuple[Any, bool]:
    """A copy of ``value`` cut to the given depth, string length and container size; and whether it was cut.

    Iterative, so no input is too deep for it. What is cut is replaced by a marker string that
    says how much was left out, so a stored record never looks complete when it is not.
    """
    cut = False

    def leaf(item: Any) -> Any:
        nonlocal cut
        if isinstance(item, str) and max_string is not None and len(item) > max_string:
            cut = True
            return item[:max_string] + f"…[{len(item) - max_string} more characters not stored]"
        return item

    root: list[Any] = [None]
    # (source container, destination, key in destination, depth)
    stack: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 0)]
    while stack:
        source, dest, key, depth = stack.pop()
        if not isinstance(source, dict | list | tuple):
            dest[key] = leaf(source)
            continue
        if depth >= max_depth:
            cut = True
            dest[key] = f"[{type(source).__name__} nested deeper than {max_depth} levels not stored]"
            continue
        if isinstance(source, dict):
            items = list(source.items())
            copy: Any = {}
        else:
            items = list(enumerate(source))
            copy = [None] * len(items)
        if max_items is not None and len(items) > max_items:
            cut = True
            more = len(items) - max_items
            items = items[:max_items]
            if isinstance(copy, dict):
                copy["…"] = f"{more} more keys not stored"
            else:
                copy = [None] * max_items + [f"…[{more} more items not stored]"]
        dest[key] = copy
        for k, v in items:
            if isinstance(copy, dict):
                k, _ = storable_text(str(k))
            stack.append((v, copy, k, depth + 1))
    return root[0], cut


@dataclass
class ExchangeRecord:
    """A request and what became of it. ``id`` is the response id the client saw."""

    id: str
    created_at: float  # unix seconds when the request arrived
    finished_at: float
    client: str  # "api-key", "unix-socket" or "local"
    endpoint: str  # "chat.completions", "completions", "responses" or "embeddings" (whose vectors are not recorded)
    model: str
    stream: bool
    request: dict[str, Any]  # the body as the client sent it: messages or prompt, and parameters
    status: Status
    choices: list[dict[str, Any]] = field(default_factory=list)  # index, text, finish_reason
    prompt_text: str | None = None
    model_sha256: str | None = None
    quantization: str | None = None
    adapters: list[dict[str, Any]] = field(default_factory=list)  # name, scale
    engine: str | None = None
    backend: str | None = None
    device: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_ms: float | None = None
    http_status: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # what was not stored as sent, and why

    @property
    def is_refusal(self) -> bool:
        """Refused before anything was generated (invalid, overloaded...): stored compactly and rate-limited."""
        return self.status in ("client_error", "server_error") and not self.choices

    def compact(self) -> None:
        """Keep only the head of a refused request: a 7 MB body refused with 400 is not worth 7 MB of log."""
        self.request, cut = bounded(
            self.request, max_depth=REFUSAL_MAX_DEPTH, max_string=REFUSAL_MAX_STRING, max_items=REFUSAL_MAX_ITEMS
        )
        if self.prompt_text is not None and len(self.prompt_text) > REFUSAL_MAX_STRING:
            self.prompt_text, _ = bounded(self.prompt_text, max_depth=1, max_string=REFUSAL_MAX_STRING)
            cut = True
        if cut:
            self.notes.append("refused request stored in short form")

    def to_row(self) -> dict[str, Any]:
        """The database row; never raises on what the client sent (see the module docstring)."""
        latency = max(0.0, self.finished_at - self.created_at)
        first = self.choices[0] if self.choices else {}
        rate = (self.completion_tokens / latency) if self.completion_tokens and latency > 0 else None
        notes = list(self.notes)
        row = {
            "id": self.id,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "client": self.client,
            "endpoint": self.endpoint,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "quantization": self.quantization,
            "adapters": _json(self.adapters, "adapters", notes),
            "engine": self.engine,
            "backend": self.backend,
            "device": self.device,
            "stream": int(self.stream),
            "request": _json(self.request, "request", notes),
            "response": _json({"choices": self.choices}, "response", notes) if self.choices else None,
            "prompt_text": self.prompt_text,
            "response_text": first.get("text"),
            "finish_reason": first.get("finish_reason"),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_ms": self.ttft_ms,
            "latency_ms": latency * 1000,
            "tokens_per_s": rate,
            "status": self.status,
            "http_status": self.http_status,
            "error": self.error,
        }
        for key, value in row.items():
            if isinstance(value, str):
                row[key], replaced = storable_text(value)
                if replaced:
                    notes.append(f"{key}: invalid Unicode (lone surrogates) replaced by U+FFFD")
        row["log_note"] = "; ".join(dict.fromkeys(notes)) or None
        return row


def _json(value: Any, name: str, notes: list[str]) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError, TypeError):
        pass
    cut, _ = bounded(value, max_depth=STORABLE_MAX_DEPTH)
    try:
        text = json.dumps(cut, ensure_ascii=False, default=repr)
    except (RecursionError, ValueError, TypeError) as exc:
        notes.append(f"{name}: could not be stored ({type(exc).__name__})")
        return json.dumps({"not_stored": f"{type(exc).__name__}"})
    notes.append(f"{name}: nested deeper than {STORABLE_MAX_DEPTH} levels, stored cut short")
    return text
