"""Connection guards under the ASGI app, where the app cannot see: a client that connects and
sends nothing, or trickles its headers or body, would otherwise hold a connection for ever.
uvicorn times out only idle keep-alive connections, and its ``limit_concurrency`` counts open
connections, so a few dozen silent sockets made every request (``/healthz`` included) a 503.

:func:`guarded_protocol` makes uvicorn's HTTP/1.1 (h11) protocol class with three rules:

* the request headers must arrive within ``header_timeout_s`` of connecting (or of the
  previous answer on a kept-alive connection), however slowly they trickle in;
* the body may not pause for more than ``body_timeout_s`` (only while the server is
  reading: a paused read is the server's doing, not the client's);
* past ``max_connections`` open connections, the one waiting longest for a request head
  is closed to make room, so a flood of silent sockets cannot lock real clients out.

Requests in progress are limited separately, in the app (:mod:`imgclf.serve.limits`).
"""

import asyncio
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from imgclf.serve.config import ServeConfig

log = logging.getLogger("imgclf")

WAITING_FOR_HEADERS, READING_BODY, HANDLING = "headers", "body", "handling"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body read timeouts and a connection cap
    (class attributes, set by :func:`guarded_protocol`)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase = WAITING_FOR_HEADERS
        self.phase_since = time.monotonic()
        self.watchdog: asyncio.TimerHandle | None = None

    # asyncio.Protocol / uvicorn hooks -------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._enter(WAITING_FOR_HEADERS)
        self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_client()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_client()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    # the rules ----------------------------------------------------------------------

    def _follow_client(self) -> None:
        """Set the phase from h11's view of the client after anything happened."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.cycle is None or self.cycle.response_complete:
                if self.phase != WAITING_FOR_HEADERS:  # a trickled head keeps its first deadline
                    self._enter(WAITING_FOR_HEADERS)
            else:
                self._enter(HANDLING)
        elif state is h11.SEND_BODY:
            self._enter(READING_BODY)  # every piece of body restarts the body timeout
        else:  # the whole request is in (or the connection is ending): the server's turn
            self._enter(HANDLING)

    def _enter(self, phase: str) -> None:
        self._disarm()
        self.phase, self.phase_since = phase, time.monotonic()
        timeout = {WAITING_FOR_HEADERS: self.header_timeout_s, READING_BODY: self.body_timeout_s}.get(phase)
        if timeout is not None:
            self.watchdog = self.loop.call_later(timeout, self._timed_out)

    def _disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    def _timed_out(self) -> None:
        self.watchdog = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.phase == READING_BODY and self.flow is not None and self.flow.read_paused:
            self._enter(READING_BODY)  # the app has not taken the body yet: not the client's delay
            return
        who = "%s:%d" % self.client if self.client else "a client"
        if self.phase == READING_BODY:
            log.info("closing the connection from %s: no request body data for %g s", who, self.body_timeout_s)
        else:
            log.debug("closing the connection from %s: no complete request headers within %g s", who, self.header_timeout_s)
        self.transport.close()

    def _make_room(self) -> None:
        """Past the cap, close the connection that has waited longest for a request head
        (this one, if every other is busy with a request)."""
        if len(self.connections) <= self.max_connections:
            return
        idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.phase == WAITING_FOR_HEADERS
                and c is not self and c.transport is not None and not c.transport.is_closing()]
        victim = min(idle, key=lambda c: c.phase_since) if idle else self
        log.debug("%d connections open (limit %d): closing one that sent no request", len(self.connections), self.max_connections)
        victim._disarm()
        victim.transport.close()


def guarded_protocol(config: ServeConfig) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with ``config``'s limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": config.header_timeout_s, "body_timeout_s": config.body_timeout_s, "max_connections": config.max_connections,
    })
