"""The gateway worker's HTTP/1.1 protocol: uvicorn's httptools protocol with bounds.

uvicorn's ``HttpToolsProtocol`` accepts every connection, keeps one that never
sends a byte for ever, lets a request head grow without limit (httptools joins
a header's pieces in memory until the header ends), and after an answer that
came before the request body's end reads and drops the rest of the body,
however long. ``FrontDoorProtocol`` is that class with bounds, all from
``[gateway]`` (``FrontDoorConfig``) and ``max_request_bytes``::

    connection accepted
      ├─ max_connections open already     → 503 + retry-after, closed (linger)
      └─ no byte within first_byte_timeout_seconds → closed, no answer
    request head (request line and headers)
      ├─ over max_header_bytes            → 431, closed (linger)
      ├─ over max_header_count headers    → 431, closed (linger)
      ├─ not ended header_timeout_seconds after a read that began it → 408, closed
      └─ not HTTP/1.1 llhttp accepts (smuggling shapes: both lengths, two
         lengths, a bad chunk size, obs-fold…) → 400, closed (linger)
    request body
      └─ not ended body_timeout_seconds after the read its head ended in (a
         pipelined request's: after the answer before it) → 408, closed
         (linger); closed without an answer if the app's had begun
    an answer that went out before the request body ended (413, 401, …)
      ├─ Content-Length ≤ 2 * max_request_bytes: the rest is read and dropped,
      │  for at most header_timeout_seconds; the connection goes on
      └─ otherwise (chunked, or longer): closed (linger)

"Closed (linger)": the answer, a FIN, then what still arrives is read and
dropped for at most ``LINGER_SECONDS`` / ``LINGER_BYTES`` before the socket is
closed (``gateway.core.limits``): a close with unread data would reset the
connection, and clients that see the reset first never read the answer.
Between two requests of a connection uvicorn's keep-alive timeout applies.

The count of open connections is uvicorn's (its ``server_state.connections``);
the numbers go to ``FrontDoorCounts`` (the metrics) and a rejection is logged
at most once per reason per ``FRONT_DOOR_LOG_INTERVAL``. The checks on a
normal request cost a few attribute reads: the head's byte count is kept per
read, not per header, and no timer is set for a head that arrives in one read,
nor for a body that arrives in the read its head ended in.

The body's bound is a total, not a gap between two reads (nginx's
``client_body_timeout``): a client that sends a byte every few seconds never
leaves a gap, and would hold the connection, a request slot and an app task
for as long as it liked. It is one timer, set once per body, not reset per
read. Time the gateway itself makes the client wait is not the client's: a
pipelined request's bound starts when the app starts it (once the request
before it is answered), and a bound that ends while uvicorn has paused
reading (the app has not yet taken what came) is set again, whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar, Final

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from keyrelay.gateway.config import GatewayConfig
from keyrelay.gateway.core.limits import (
    LINGER_BYTES,
    LINGER_SECONDS,
    REFUSING_MAX,
    declared_length,
    drain_rest,
    error_response,
)
from keyrelay.gateway.http.metrics import FrontDoorCounts

__all__ = ["FrontDoor", "FrontDoorProtocol", "front_door_protocol", "note"]

log = logging.getLogger("keyrelay.gateway.front_door")

# What a connection's one timer is for.
_FIRST_BYTE: Final = 0  # a new connection's first byte
_HEAD: Final = 1  # the end of a request head
_DRAIN: Final = 2  # the end of a body answered before it ended
_LINGER: Final = 3  # the close after a last answer
_BODY: Final = 4  # the end of a request body

# The log line of each reason (``note``).
_LINES: Final = {
    "max_connections": "connection limit reached: a connection was answered 503 and closed",
    "header_bytes": "request head over max_header_bytes: answered 431, connection closed",
    "header_count": "request over max_header_count headers: answered 431, connection closed",
    "header_timeout": "request head not ended within header_timeout_seconds: 408, closed",
    "body_timeout": "request body not ended within body_timeout_seconds: 408, closed",
    "bad_request": "invalid HTTP/1.1 request: answered 400, connection closed",
    "body_too_large": "request body over max_request_bytes: answered 413",
    "idle": "connection sent nothing within first_byte_timeout_seconds: closed",
}


def note(counts: FrontDoorCounts, reason: str, **fields: object) -> None:
    """A limit was hit: its log line, at most once per reason per interval (the
    line says how many were left out since the last); ``idle`` at INFO, as a
    load balancer's pre-opened connections may well be."""
    left_out = counts.lines.admit(reason, time.monotonic())
    if left_out is not None:
        level = logging.INFO if reason == "idle" else logging.WARNING
        log.log(level, _LINES[reason], extra={"reason": reason, "suppressed": left_out, **fields})


class _Rejected(Exception):
    """Raised in a parser callback to stop the parse (httptools wraps it in an
    ``HttpParserCallbackError``); the reason is on the protocol."""


class FrontDoor:
    """What every connection of one worker shares: the limits, the counts, the
    connections being refused right now, and the answers written as is."""

    __slots__ = (
        "answers",
        "body_timeout",
        "counts",
        "first_byte_timeout",
        "header_timeout",
        "limit_of",
        "max_connections",
        "max_header_bytes",
        "max_header_count",
        "max_request_bytes",
        "refused",
        "refusing",
    )

    def __init__(self, config: GatewayConfig, counts: FrontDoorCounts) -> None:
        limits = config.front_door
        self.max_connections = limits.max_connections
        self.max_header_bytes = limits.max_header_bytes
        self.max_header_count = limits.max_header_count
        self.header_timeout = limits.header_timeout_seconds
        self.body_timeout = limits.body_timeout_seconds
        self.first_byte_timeout = limits.first_byte_timeout_seconds
        self.max_request_bytes = config.max_request_bytes
        self.counts = counts
        self.refusing = 0
        self.refused = error_response(
            503,
            "overloaded_error",  # the gateway's own overload, as for its upstream pool
            f"this gateway worker has its limit of {limits.max_connections} connections "
            "open (gateway.max_connections); retry shortly",
            [("retry-after", "1")],
        )
        # The limit each reason's log line names.
        self.limit_of: dict[str, dict[str, float]] = {
            "header_bytes": {"max_header_bytes": limits.max_header_bytes},
            "header_count": {"max_header_count": limits.max_header_count},
            "header_timeout": {"header_timeout_seconds": limits.header_timeout_seconds},
            "body_timeout": {"body_timeout_seconds": limits.body_timeout_seconds},
        }
        self.answers: dict[str, bytes] = {
            "header_bytes": error_response(
                431,
                "invalid_request_error",
                "the request line and headers are larger than the gateway's limit of "
                f"{limits.max_header_bytes} bytes",
            ),
            "header_count": error_response(
                431,
                "invalid_request_error",
                f"the request has more than the gateway's limit of {limits.max_header_count} "
                "headers",
            ),
            "header_timeout": error_response(
                408,
                "invalid_request_error",
                f"the request headers did not arrive within {limits.header_timeout_seconds:g} s",
            ),
            "body_timeout": error_response(
                408,
                "invalid_request_error",
                f"the request body did not arrive within {limits.body_timeout_seconds:g} s "
                "of its headers",
            ),
            "bad_request": error_response(400, "invalid_request_error", "invalid HTTP/1.1 request"),
        }


class FrontDoorProtocol(HttpToolsProtocol):
    """One client connection (see the module). ``front_door`` is set on the
    subclass ``front_door_protocol`` makes for a worker."""

    front_door: ClassVar[FrontDoor]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # of the current head, read so far
        self._timer: asyncio.TimerHandle | None = None
        self._timer_for = _FIRST_BYTE
        self._lingering = False
        self._linger_left = 0
        self._refused = False
        self._reason = "bad_request"  # why a callback stopped the parse

    # -- the connection ------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        door = self.front_door
        if len(self.connections) >= door.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        door.counts.open += 1
        self._arm(_FIRST_BYTE, door.first_byte_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            if self._lingering:
                self.front_door.refusing -= 1
            return
        self.front_door.counts.open -= 1
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        door = self.front_door
        self._refused = True
        self.transport = transport
        door.counts.refused += 1
        note(door.counts, "max_connections", max_connections=door.max_connections)
        transport.write(door.refused)
        if door.refusing >= REFUSING_MAX:
            transport.close()  # the answer still goes out first
            return
        door.refusing += 1
        self._linger()

    def _linger(self) -> None:
        """The last answer is written: a FIN after it, then what still arrives is
        dropped until LINGER_BYTES or LINGER_SECONDS, or the client's own FIN."""
        transport = self.transport
        self._lingering = True
        self._linger_left = LINGER_BYTES
        if transport.can_write_eof():
            transport.write_eof()
        if not self._refused:
            self.flow.resume_reading()  # uvicorn pauses reading under a large body
        self._arm(_LINGER, LINGER_SECONDS)

    def _reject(self, reason: str) -> None:
        """Answers ``reason``'s error and closes; no request of this connection
        reaches the app any more."""
        door = self.front_door
        door.counts.rejected[reason] += 1
        client = self.client[0] if self.client else None
        note(door.counts, reason, client=client, **door.limit_of.get(reason, {}))
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self._in_head or cycle.response_started or self.pipeline:
                # An answer is going out on this connection (an earlier request's,
                # or this one's): no room for another.
                self.transport.close()
                return
            # This request broke after its head (the framing of its body): the app
            # has it, has not answered, and gets nothing more of it.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(door.answers[reason])
        self._linger()

    # -- timers --------------------------------------------------------------

    def _arm(self, purpose: int, seconds: float) -> None:
        self._disarm()
        self._timer_for = purpose
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        purpose = self._timer_for
        counts = self.front_door.counts
        if purpose == _FIRST_BYTE:
            counts.closed["idle"] += 1
            note(
                counts,
                "idle",
                first_byte_timeout_seconds=self.front_door.first_byte_timeout,
            )
            self.transport.close()
        elif purpose == _HEAD:
            self._reject("header_timeout")
        elif purpose == _BODY:
            if self.flow.read_paused:  # the app has not taken what came: not the client's time
                self._arm(_BODY, self.front_door.body_timeout)
            else:
                self._reject("body_timeout")
        elif purpose == _DRAIN:
            counts.closed["unread_body"] += 1
            self._linger()
        else:
            self.transport.close()

    # -- reading -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_left -= len(data)
            if self._linger_left <= 0:
                self.transport.close()
            return
        if self._timer is not None and self._timer_for == _FIRST_BYTE:
            self._disarm()
        if self.timeout_keep_alive_task is not None:
            self._unset_keepalive_if_required()
        view: bytes | memoryview = data
        while self._in_head:
            room = self.front_door.max_header_bytes - self._head_bytes
            if len(view) <= room:
                self._head_bytes += len(view)
                break
            # More than the head may still take: it must end within room bytes.
            view = memoryview(view)
            self._head_bytes += room
            if not self._feed(view[:room]):
                return
            if self._in_head and self._head_bytes:  # the same head, still not ended
                self._reject("header_bytes")
                return
            view = view[room:]  # the body, or (pipelined) the next request
        if not self._feed(view):
            return
        if self._in_head:
            if self._head_bytes:
                # A head has begun and not ended: bound its header count and its time.
                if len(self.headers or ()) > self.front_door.max_header_count:
                    self._reject("header_count")
                elif self._timer is None:
                    self._arm(_HEAD, self.front_door.header_timeout)
        elif self._timer is None and not self.pipeline:
            # A head has ended and its body not, no answer came before it, and the
            # app has the request (a pipelined one waiting for the one before it
            # is bounded once it starts: on_response_complete).
            self._arm(_BODY, self.front_door.body_timeout)

    def _feed(self, data: bytes | memoryview) -> bool:
        """The parser takes ``data`` (its callbacks run meanwhile). False: the
        connection is being closed, stop."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch is served (uvicorn runs with ws="none"): the
            # request went to the app as a plain one (llhttp ends it at its head).
            # What follows it is not HTTP/1.1 to us: dropped, and the connection
            # ends with the answer, so nothing after it is read as a request.
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
            else:
                self.transport.close()
            self._lingering = True
            self._linger_left = LINGER_BYTES
            return False
        except httptools.HttpParserError:
            self._reject(self._reason)
            return False
        return True

    # -- parser callbacks ----------------------------------------------------

    def on_headers_complete(self) -> None:
        if len(self.headers) > self.front_door.max_header_count:
            self._reason = "header_count"
            raise _Rejected
        self._in_head = False
        if self._timer is not None:
            self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        if self._timer is not None:
            self._disarm()
            if self._timer_for == _BODY:
                return  # the body arrived in time; its answer is the app's
            # A body answered before its end was read to its end: the connection
            # goes on, idle under uvicorn's keep-alive timeout again.
            if self.timeout_keep_alive_task is None and not self.pipeline:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def on_response_complete(self) -> None:
        cycle = self.cycle
        # ``self.cycle`` may already be a later, pipelined request's: then this
        # answer's request was read whole.
        if not (cycle.response_complete and cycle.more_body) or self.transport.is_closing():
            super().on_response_complete()
            if not self._in_head and not self.pipeline and self._timer is None:
                # A pipelined request whose body has not ended has just started.
                self._arm(_BODY, self.front_door.body_timeout)
            return
        # Answered before the request body ended (a 413, a 401 before reading it…).
        door = self.front_door
        if drain_rest(declared_length(self.headers), door.max_request_bytes):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm(_DRAIN, door.header_timeout)
            return
        self.server_state.total_requests += 1  # as uvicorn counts it
        door.counts.closed["unread_body"] += 1
        self._linger()


def front_door_protocol(config: GatewayConfig, counts: FrontDoorCounts) -> type[FrontDoorProtocol]:
    """The protocol class of one worker (uvicorn's ``http=``): ``FrontDoorProtocol``
    bound to ``config``'s limits and ``counts``."""
    door = FrontDoor(config, counts)

    class WorkerFrontDoorProtocol(FrontDoorProtocol):
        front_door = door

    return WorkerFrontDoorProtocol
