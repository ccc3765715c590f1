"""Bounds on what clients can make the service hold: connections, header reads, open files.

uvicorn holds a connection whose request head never completes forever (its keep-alive timer only
runs between requests), and accepts connections until the process runs out of file descriptors;
then every accept fails, `/status` and gRPC stop answering and asyncio logs "Too many open files"
per attempt. The HTTP protocol here adds what uvicorn lacks:

- a header-read timeout: a connection that has not sent a complete request head within
  `header_timeout` seconds (from its start, or from the end of its previous response) is answered
  408 and closed;
- a connection cap below the file limit: at the cap, a new connection evicts the oldest one that
  has no request in flight (half-open or idle keep-alive, answered 503), so a flood of half-open
  connections churns among itself while real clients, whose heads arrive at once, get through. Only
  when every connection has a request in flight is the new one refused (503).

Each kind of refusal is logged once per interval with how many happened, not once per event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a connection may take to send a request head (slowloris protection)."""
MAX_CONNECTIONS_CEILING = 10_000
FLOOD_LOG_INTERVAL = 10.0
# File descriptors kept for everything that is not an HTTP connection: gRPC connections, Redis,
# the limits file, logs.
_RESERVED_FILES = 1024
MAX_REQUEST_HEAD_BYTES = 64 * 1024
"""h11's buffer for an incomplete request head (its default is 16 KiB); a longer head is answered 400."""


class FloodLog:
    """A warning logged at most once per `interval`, saying how many events it stands for."""

    def __init__(self, message: str, interval: float = FLOOD_LOG_INTERVAL, log: logging.Logger = logger) -> None:
        self.message = message
        self.interval = interval
        self.log = log
        self.count = 0
        self.total = 0
        self._next_log = 0.0

    def event(self) -> None:
        self.count += 1
        self.total += 1
        now = time.monotonic()
        if now >= self._next_log:
            self.log.warning("%s (%d in the last %gs)", self.message, self.count, self.interval)
            self.count = 0
            self._next_log = now + self.interval


def raise_file_limit() -> int:
    """Raise this process's soft open-file limit to the hard one (as Go programs do at start), so
    the limit is the administrator's, not the shell's default of 1024. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.debug("cannot raise the open-file limit from %d: %s", soft, exc)
    return soft


def default_max_connections(file_limit: int) -> int:
    """HTTP connections allowed: what the file limit leaves after the reserve, at most the ceiling."""
    return max(64, min(MAX_CONNECTIONS_CEILING, file_limit - _RESERVED_FILES))


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


_TIMED_OUT = _raw_response("408 Request Timeout", "request head not received in time")
_EVICTED = _raw_response("503 Service Unavailable", "too many connections; this one was idle the longest")
_REFUSED = _raw_response("503 Service Unavailable", "too many connections")


def guarded_http_protocol(max_connections: int, header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header-read timeout and a connection cap (see the module doc).
    Each call makes a class with its own bookkeeping: pass it as `uvicorn.Config(http=...)`."""
    if max_connections < 1 or header_timeout <= 0:
        raise ValueError("the connection cap and the header timeout must be positive")
    # Connections with no request in flight, oldest first (dicts keep insertion order).
    awaiting_head: dict[GuardedH11Protocol, None] = {}
    timed_out = FloodLog(f"HTTP: closed connections that sent no complete request head within {header_timeout:g}s")
    evicted = FloodLog(f"HTTP: {max_connections} connections open (the cap): closed the longest-idle ones")
    refused = FloodLog(f"HTTP: {max_connections} connections open (the cap), all busy: refused new ones")

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _refused = False

        # The parameter is narrower than asyncio.Protocol's BaseTransport, as in uvicorn's own override.
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                if awaiting_head:
                    next(iter(awaiting_head))._close_with(_EVICTED)
                    evicted.event()
                else:
                    self._refused = True
                    transport.write(_REFUSED)
                    transport.close()
                    refused.event()
                    return
            super().connection_made(transport)
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_received()
            if not self._refused:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request head is complete: a request is in flight
                self._head_received()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_head()

        def _await_head(self) -> None:
            self._head_received()
            awaiting_head[self] = None
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _head_received(self) -> None:
            awaiting_head.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                timed_out.event()
                self._close_with(_TIMED_OUT)

        def _close_with(self, response: bytes) -> None:
            self._head_received()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return GuardedH11Protocol
