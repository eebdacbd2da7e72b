"""The HTTP server around the app: uvicorn, with the two things its defaults lack, and a draining stop.

- **TCP_NODELAY.** asyncio sets it only on sockets whose protocol number is ``IPPROTO_TCP``; a
  listening socket made by ``socket.create_server`` has 0, so Nagle's algorithm held every small
  write back for a delayed ACK: ~40 ms on each response over TCP (``/health`` 44 ms against 0.7 ms
  over the Unix socket). The protocol sets it on every connection itself.
- **A header timeout.** uvicorn times out idle keep-alive connections but not a client that sends
  its request line and headers slowly (slowloris): 64 such connections stayed open for 45 s. A
  request's headers must now arrive within ``header_timeout`` of its first byte (or of the
  connection), else the answer is 408 and the connection is closed. Slow bodies are the edge
  middleware's business (``appliance.api.edge``).
- **Draining on SIGTERM / Ctrl-C.** uvicorn's own graceful stop closes the listeners at once and,
  after its timeout, cancels what still runs: a stream was then cut with no ``error`` event, and
  its exchange was lost from the request log. Here a stop signal first *drains*: the listeners
  stay open, ``/health`` answers 503 ``shutting_down`` (a load balancer takes the box out), new
  generations get 503 ``shutting_down``, and running ones may finish for ``shutdown_timeout``.
  Then ``stop_work`` ends whatever still runs (each stream gets its ``shutting_down`` error event
  and its exchange is recorded with that cause), and only then does uvicorn close the connections.
  A second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.api.errors import error_body
from appliance.scheduler import Scheduler

log = logging.getLogger("appliance")

# what uvicorn may still take, once the drain is over, to close connections whose answers are done
CLOSE_GRACE_S = 3


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY and a header timeout (see the module docstring)."""

    header_timeout: float = 10.0

    @classmethod
    def configured(cls, header_timeout: float) -> type[TimedH11Protocol]:
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the first bytes of a new request
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its request line and headers are in
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        message = f"The request headers did not arrive within {self.header_timeout:g} s."
        body = json.dumps(error_body(408, message, code="request_timeout")).encode()
        head = (
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        # h11 sends no response before a request, so the bytes are written as they are
        self.transport.write(head.encode() + body)
        self.transport.close()
        log.debug("closed a connection whose request headers were too slow (%s)", self.client)


class ApplianceServer(uvicorn.Server):
    """uvicorn's server with a draining stop (see the module docstring)."""

    def __init__(
        self, config: uvicorn.Config, scheduler: Scheduler, *, drain_timeout: float, stop_work: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._scheduler = scheduler
        self._drain_timeout = drain_timeout
        self._stop_work = stop_work
        self._drain_deadline: float | None = None
        self._drained = False

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Not super(): uvicorn re-raises the signal after its shutdown, which would kill the
        # process before our own cleanup (request log, socket file) runs.
        if self.draining or self.should_exit:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                log.warning("stopping at once: running generations are cut")
                self.should_exit = self.force_exit = True
            return
        self._scheduler.begin_shutdown()
        self._drain_deadline = time.monotonic() + self._drain_timeout
        log.info("stopping: new requests get 503; running ones have %g s to finish", self._drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if self.draining and not self._drained and not self.should_exit:
            assert self._drain_deadline is not None
            busy = self._scheduler.busy
            if not busy or time.monotonic() >= self._drain_deadline:
                if busy:
                    log.warning("shutdown timeout reached: ending the generations still running")
                await asyncio.to_thread(self._stop_work)  # their streams get the shutting_down event
                self._drained = True
                self.should_exit = True
        return await super().on_tick(counter)


def make_server(
    app: Any,
    scheduler: Scheduler,
    *,
    log_level: str,
    header_timeout: float,
    drain_timeout: float,
    stop_work: Callable[[], None],
) -> ApplianceServer:
    config = uvicorn.Config(
        app,
        http=TimedH11Protocol.configured(header_timeout),
        log_config=None,
        log_level=log_level,
        timeout_graceful_shutdown=CLOSE_GRACE_S,
        lifespan="off",
    )
    return ApplianceServer(config, scheduler, drain_timeout=drain_timeout, stop_work=stop_work)
