"""One exchange as the API hands it to the log: plain data, turned into a row by the writer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "client_error", "cancelled", "server_error"]


@dataclass
class ExchangeRecord:
    """A request and what became of it. ``id`` is the response id the client saw."""

    id: str
    created_at: float  # unix seconds when the request arrived
    finished_at: float
    client: str  # "api-key", "unix-socket" or "local"
    endpoint: str  # "chat.completions" or "completions"
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

    def to_row(self) -> dict[str, Any]:
        latency = max(0.0, self.finished_at - self.created_at)
        first = self.choices[0] if self.choices else {}
        rate = (self.completion_tokens / latency) if self.completion_tokens and latency > 0 else None
        return {
            "id": self.id,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "client": self.client,
            "endpoint": self.endpoint,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "quantization": self.quantization,
            "adapters": json.dumps(self.adapters),
            "engine": self.engine,
            "backend": self.backend,
            "device": self.device,
            "stream": int(self.stream),
            "request": json.dumps(self.request, ensure_ascii=False),
            "response": json.dumps({"choices": self.choices}, ensure_ascii=False) if self.choices else None,
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
