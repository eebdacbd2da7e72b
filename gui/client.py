"""The typed HTTP client of the server: the only code in the GUI that touches the network.

Synchronous on purpose: every call runs in a worker thread (``gui.tasks``), never on the GUI
thread, so a slow or gone server can never freeze the window. Failures become ``ApiError`` with
the server's own OpenAI-shaped message, or a plain-words one when the server cannot be reached.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
else:  # imported on first use, in a worker thread: it is a quarter of the app's start-up time
    from gui.lazy import lazy_module

    httpx = lazy_module("httpx")

# (total, connect) seconds of an ordinary call
TIMEOUT = (30.0, 5.0)


class ApiError(Exception):
    """A request failed: the server's message, status and code, or why it could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class StreamEvent:
    """One piece of a streamed answer: text, or the end with its finish reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


class ApiClient:
    """The server's routes as methods. Thread-safe: one httpx client, shared by the worker threads."""

    def __init__(self, base_url: str, api_key: str | None = None, *, transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._transport = transport
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    @property
    def _http(self) -> httpx.Client:
        """The httpx client, made by the first call (in a worker thread), then shared."""
        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                timeout = httpx.Timeout(TIMEOUT[0], connect=TIMEOUT[1])
                self._client = httpx.Client(
                    base_url=self.base_url, headers=headers, timeout=timeout, transport=self._transport
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def reconnect(self, base_url: str, api_key: str | None = None) -> None:
        """Point every later call at another address or key (the GUI restarted its server)."""
        with self._lock:
            old, self._client = self._client, None
            self.base_url, self._api_key, self._transport = base_url.rstrip("/"), api_key, None
        if old is not None:
            old.close()

    # -- plumbing -----------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(f"The server at {self.base_url} cannot be reached ({type(exc).__name__}).") from exc
        if resp.status_code >= 400:
            raise _error(resp)
        if not resp.content:
            return None
        return resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params={k: v for k, v in params.items() if v not in (None, "")})

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, json=body)

    # -- the routes ---------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/health")
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/v1/models")["data"]
        return result

    def hardware(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/v1/appliance/hardware")
        return result

    # -- logs screen --------------------------------------------------------------------

    def logs(self, *, limit: int = 50, offset: int = 0, **filters: Any) -> dict[str, Any]:
        """A page of the request log, newest first: ``{data, total, limit, offset, has_more}``."""
        result: dict[str, Any] = self.get("/v1/appliance/logs", limit=limit, offset=offset, **filters)
        return result

    def log(self, record_id: str) -> dict[str, Any]:
        """One logged exchange in full: request, response, timings and its feedback."""
        result: dict[str, Any] = self.get(self._log_path(record_id))
        return result

    def log_feedback(self, record_id: str, **feedback: Any) -> dict[str, Any]:
        """Merge ``rating``, ``correction``, ``tags`` or ``note`` into the record's feedback; the record after."""
        result: dict[str, Any] = self.post(self._log_path(record_id) + "/feedback", feedback)
        return result

    def export_logs(
        self, fmt: str, *, dedupe: bool = False, cancel: threading.Event | None = None, **filters: Any
    ) -> Iterator[tuple[bytes, int]]:
        """The log's fine-tuning export (JSONL) piece by piece, each with the export's number of records.

        That number is the server's ``X-Total-Records``: how many logged records the export reads,
        the measure of its progress (lines differ: some records give none). Stops early (closing the
        stream) when ``cancel`` is set. A stream cut short, because the server failed midway, ends in
        an ``ApiError``, so a caller never keeps a silently short file.
        """
        params = {k: v for k, v in {**filters, "format": fmt, "dedupe": dedupe}.items() if v not in (None, "")}
        # a dpo export reads every record before it makes its last pairs: long silences are normal
        timeout = httpx.Timeout(30.0, connect=5.0, read=600.0)
        tail = b"\n"
        try:
            with self._http.stream("GET", "/v1/appliance/logs/export", params=params, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _error(resp)
                total = int(resp.headers.get("x-total-records", 0))
                for chunk in resp.iter_bytes():
                    if cancel is not None and cancel.is_set():
                        return
                    tail = chunk[-1:] or tail
                    yield chunk, total
        except httpx.TransportError as exc:
            raise ApiError(f"The export from {self.base_url} broke off ({type(exc).__name__}).") from exc
        if tail != b"\n":
            raise ApiError("The export broke off in the middle of a line.")

    @staticmethod
    def _log_path(record_id: str) -> str:
        from urllib.parse import quote  # here, to keep this screen's additions in its own section

        return f"/v1/appliance/logs/{quote(record_id, safe='')}"

    # -- requests screen ----------------------------------------------------------------

    def requests(self, finished: int = 100) -> dict[str, Any]:
        """Queued, running and the last ``finished`` requests, and each model's load (``RequestList``)."""
        result: dict[str, Any] = self.get("/v1/appliance/requests", finished=finished)
        return result

    def cancel_request(self, request_id: str) -> dict[str, Any]:
        """Cancel a queued or running request; answers once it has ended. Ids are URL-safe (``chatcmpl-<hex>``)."""
        result: dict[str, Any] = self._request("DELETE", f"/v1/appliance/requests/{request_id}")
        return result

    # -- models, LoRA and hardware screens ---------------------------------------------

    UPLOAD_CHUNK = 1 << 20

    # imports and uploads copy and hash whole files (GBs) before answering; removing waits for requests to end
    @staticmethod
    def _slow() -> httpx.Timeout:
        return httpx.Timeout(900.0, connect=5.0)

    def hardware_live(self) -> dict[str, Any]:
        """The machine's load now (CPU per core, RAM, the server's RSS): ``GET /v1/appliance/hardware/live``."""
        result: dict[str, Any] = self.get("/v1/appliance/hardware/live")
        return result

    def registered_models(self) -> list[dict[str, Any]]:
        """Every model of the registry with ``loaded`` and ``default``, not only the loaded ones."""
        result: list[dict[str, Any]] = self.get("/v1/appliance/models")["data"]
        return result

    def import_model(self, path: str, model_id: str | None = None) -> dict[str, Any]:
        """Import a GGUF file lying on the server's machine; copying and hashing GBs takes minutes."""
        body = {"path": path, **({"id": model_id} if model_id else {})}
        result: dict[str, Any] = self._request("POST", "/v1/appliance/models", json=body, timeout=self._slow())
        return result

    def loras(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/v1/appliance/loras")["data"]
        return result

    def add_lora(
        self, path: str, base: str, name: str, on_progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Upload an adapter file, streamed from disk; ``on_progress(sent, total)`` after each chunk."""
        try:
            with open(path, "rb") as fh:
                total = fh.seek(0, 2)
        except OSError as exc:
            raise ApiError(f"Cannot read {path}: {exc.strerror or exc}.") from exc

        def chunks() -> Iterator[bytes]:
            sent = 0
            with open(path, "rb") as fh:
                while chunk := fh.read(self.UPLOAD_CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if on_progress is not None:
                        on_progress(sent, total)

        # an explicit length lets the server refuse a too-large file before we send it
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(total)}
        result: dict[str, Any] = self._request(
            "POST",
            "/v1/appliance/loras",
            params={"base": base, "name": name},
            content=chunks(),
            headers=headers,
            timeout=self._slow(),
        )
        return result

    def remove_lora(self, name: str) -> dict[str, Any]:
        """Remove an adapter; the server answers once the requests still using it have ended."""
        result: dict[str, Any] = self._request("DELETE", f"/v1/appliance/loras/{name}", timeout=self._slow())
        return result

    # -- settings screen ----------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Every setting described (``GET /v1/appliance/settings``): value, default, bounds, the file's value."""
        result: dict[str, Any] = self.get("/v1/appliance/settings")
        return result

    def save_settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """Write settings to the server's config.toml (None removes one); the server names what needs a restart."""
        result: dict[str, Any] = self._request("PUT", "/v1/appliance/settings", json={"values": values})
        return result

    # -- playground ----------------------------------------------------------------------

    def stream_chat(self, body: dict[str, Any], cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """A streamed chat completion, piece by piece; stops early (closing the stream) when ``cancel`` is set."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body, timeout=httpx.Timeout(None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _error(resp)
                for line in resp.iter_lines():
                    if cancel is not None and cancel.is_set():
                        return
                    event = _sse_event(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise ApiError(f"The stream from {self.base_url} broke off ({type(exc).__name__}).") from exc


def _sse_event(line: str) -> StreamEvent | None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    data = json.loads(line[len("data: ") :])
    if "error" in data:
        error = data["error"]
        raise ApiError(error.get("message") or "The stream failed.", code=error.get("code"))
    if data.get("usage") and not data.get("choices"):
        return StreamEvent(usage=data["usage"])
    choice = data["choices"][0]
    return StreamEvent(text=choice.get("delta", {}).get("content") or "", finish_reason=choice.get("finish_reason"))


def _error(resp: httpx.Response) -> ApiError:
    try:
        error = resp.json()["error"]
        return ApiError(error["message"], status=resp.status_code, code=error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiError(f"The server answered {resp.status_code}.", status=resp.status_code)
