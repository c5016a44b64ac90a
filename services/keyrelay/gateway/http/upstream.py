"""The upstream HTTP client: HTTP/1.1 on asyncio + httptools, pooled per upstream.

Why not a general client: this is the gateway's hot path, and it needs one
thing, a ``POST`` with a body already serialised, answered by a JSON body or an
event stream. Measured on this kind of machine (``bench/gateway.py``), aiohttp's
client was the largest single cost of a proxied call (``ClientSession._request``
alone about a third of the gateway's CPU); this client is a protocol object,
the same C parser uvicorn uses (httptools / llhttp), and a future per wait.

What it does, and what a caller can rely on:

- **Pooling**: keep-alive connections per upstream, at most ``max_connections``
  open (callers beyond that wait for one); an idle connection is reused most
  recently used first and dropped after ``IDLE_SECONDS`` or when the upstream
  closes it. A ``POST`` is never re-sent on another connection (it is not
  idempotent: a retried Messages call may be billed twice).
- **Timeouts**: ``connect_timeout_seconds`` for connecting (TLS handshake
  included); ``read_timeout_seconds`` is the longest silence while waiting for
  the upstream (one timer per request, moved on lazily, not one per read); a
  reader paused by back-pressure is not the upstream's silence.
- **Back-pressure**: reading pauses while more than ``HIGH_WATER_BYTES`` of body
  wait for the caller, and resumes as the caller takes them.
- **Cancellation**: a response released before its end closes the connection
  (so the upstream stops sending); a cancelled caller releases it.
- **Bodies**: ``Content-Length``, chunked, or until the connection closes;
  ``gzip`` / ``deflate`` decoded (the only encodings asked for); interim 1xx
  answers skipped.
- **Errors**: every failure is a ``GatewayError`` (``UPSTREAM_TIMEOUT`` or
  ``UPSTREAM_UNREACHABLE``) that names the upstream and never a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final, cast
from urllib.parse import urlencode, urlsplit

import httptools

from keyrelay.config import UpstreamConfig
from keyrelay.gateway.core.errors import UPSTREAM_TIMEOUT, UPSTREAM_UNREACHABLE, GatewayError

# A non-streaming answer larger than this is not a Messages API response.
MAX_RESPONSE_BYTES: Final = 64 << 20
# Body bytes waiting for the caller before the connection stops being read.
HIGH_WATER_BYTES: Final = 256 << 10
# An idle keep-alive connection older than this is closed rather than reused
# (servers commonly close theirs after 15-75 s; reusing one they are closing
# would fail the request).
IDLE_SECONDS: Final = 15.0
ACCEPT_ENCODING: Final = "gzip, deflate"


def _unreachable(upstream: str, why: str) -> GatewayError:
    return GatewayError(
        UPSTREAM_UNREACHABLE,
        f"the upstream {upstream!r} is unreachable or broke the connection ({why})",
    )


def _timed_out(upstream: str) -> GatewayError:
    return GatewayError(UPSTREAM_TIMEOUT, f"the upstream {upstream!r} did not answer in time")


class UpstreamResponse:
    """One answer: ``status`` and ``headers`` (lower-case names, bytes) once
    ``Upstreams.post`` returns; the body through ``read_all`` or ``chunks``.
    ``release()`` must be called when done (it is idempotent)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_connection",
        "_decoder",
        "_encoding",
        "_error",
        "_framed",
        "_keep_alive",
        "_last_read",
        "_parser",
        "_paused",
        "_pool",
        "_released",
        "_timer",
        "_waiter",
        "content_type",
        "headers",
        "status",
    )

    def __init__(self, pool: _Pool, connection: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self._pool = pool
        self._connection = connection
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: GatewayError | None = None
        self._complete = False
        self._framed = False  # Content-Length or Transfer-Encoding: else the body ends at EOF
        self._encoding = b""
        self._decoder: zlib._Decompress | None = None
        self._keep_alive = False
        self._paused = False
        self._released = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- the caller's side ----------------------------------------------------

    async def read_all(self) -> bytes:
        """The whole body (at most ``MAX_RESPONSE_BYTES``)."""
        parts: list[bytes] = []
        size = 0
        while True:
            if self._chunks:
                for chunk in self._take():
                    parts.append(chunk)
                    size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    self.release()  # the connection goes: the rest is not read
                    raise _unreachable(self._pool.name, f"more than {MAX_RESPONSE_BYTES} bytes")
            if self._error is not None:
                raise self._error
            if self._complete:
                # One read is the common case for a Messages API answer: no copy then.
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever is buffered, joined, per step."""
        while True:
            if self._chunks:
                taken = self._take()
                yield taken[0] if len(taken) == 1 else b"".join(taken)
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            await self._wait()

    def release(self) -> None:
        """Done with the answer: a connection still carrying its body is closed."""
        if self._released:
            return
        self._released = True
        self._stop_timer()
        self._drop_connection()

    # -- internals ------------------------------------------------------------

    def _take(self) -> list[bytes]:
        taken = self._chunks
        self._chunks = []
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._last_read = self._pool.loop.time()
            self._connection.resume_reading()
        return taken

    async def _headers(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def _wait(self) -> None:
        waiter = self._waiter = self._pool.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: GatewayError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._stop_timer()
        self._wake()
        self._drop_connection()

    def _drop_connection(self) -> None:
        """Close the connection if it still carries this answer (its rest is unread)."""
        connection = self._connection
        if connection.response is self:
            connection.response = None
            connection.close()

    def _start_timer(self) -> None:
        loop = self._pool.loop
        self._last_read = loop.time()
        self._timer = loop.call_at(self._last_read + self._pool.read_timeout, self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        loop = self._pool.loop
        timeout = self._pool.read_timeout
        now = loop.time()
        # A paused reader means the caller is slow, not the upstream.
        due = now + timeout if self._paused else self._last_read + timeout
        if due > now:
            self._timer = loop.call_at(due, self._on_timer)
        else:
            self._timer = None
            self._fail(_timed_out(self._pool.name))

    def _data(self, data: bytes) -> None:
        self._last_read = self._pool.loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # A callback's own error arrives wrapped, as the exception's context.
            error = exc.__context__
            self._fail(
                error
                if isinstance(error, GatewayError)
                else _unreachable(self._pool.name, "an invalid HTTP response")
            )
        if self._complete:
            self._finish()

    def _finish(self) -> None:
        """The answer is complete: the connection can serve another request now."""
        self._stop_timer()
        self._wake()
        connection = self._connection
        if connection.response is self:
            connection.response = None
            if self._paused:  # the end arrived in the read that filled the buffer
                self._paused = False
                connection.resume_reading()
            if self._keep_alive:
                self._pool.put(connection)
            else:
                connection.close()

    def _lost(self) -> None:
        if self._complete or self._error is not None:
            return
        if self.status and not self._framed:  # the body was "until the connection closes"
            self._flush_decoder()
            if self._error is None:
                self._complete = True
                self._stop_timer()
                self._wake()
            return
        self._fail(_unreachable(self._pool.name, "the connection closed before the answer ended"))

    def _flush_decoder(self) -> None:
        decoder = self._decoder
        if decoder is None:
            return
        try:
            tail = decoder.flush()
        except zlib.error:
            self._fail(_unreachable(self._pool.name, "invalid compressed body"))
            return
        if not decoder.eof:
            self._fail(_unreachable(self._pool.name, "truncated compressed body"))
            return
        if tail:
            self._chunks.append(tail)

    # -- httptools callbacks (inside feed_data) ------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # bytes after the answer: nothing was asked for them
            raise _unreachable(self._pool.name, "more than one answer to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value
        elif name in (b"content-length", b"transfer-encoding"):
            self._framed = True
        elif name == b"content-encoding":
            self._encoding = value.strip().lower()
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: its headers are not the answer's
            self.headers = []
            self.content_type = b""
            self._framed = False
            self._encoding = b""
            return
        self.status = status
        encoding = self._encoding
        if encoding and encoding != b"identity":
            if encoding in (b"gzip", b"x-gzip"):
                self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif encoding == b"deflate":
                self._decoder = zlib.decompressobj(zlib.MAX_WBITS)
            else:
                raise _unreachable(self._pool.name, "an encoding it was not asked for")
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            body = self._decompress(body)
            if not body:
                return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status:  # the end of an interim answer
            return
        self._flush_decoder()
        if self._error is not None:
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True

    def _decompress(self, data: bytes) -> bytes:
        assert self._decoder is not None
        parts: list[bytes] = []
        size = 0
        try:
            # Bounded steps: a small compressed chunk can inflate to gigabytes.
            while data:
                out = self._decoder.decompress(data, HIGH_WATER_BYTES)
                parts.append(out)
                size += len(out)
                if size > MAX_RESPONSE_BYTES:
                    raise _unreachable(self._pool.name, f"more than {MAX_RESPONSE_BYTES} bytes")
                data = self._decoder.unconsumed_tail
        except zlib.error:
            raise _unreachable(self._pool.name, "invalid compressed body") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``response`` is the answer it is carrying, if any."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.counted = False  # holds one of the pool's slots
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        response._data(data)

    @property
    def usable(self) -> bool:
        """Open, and not already closing (the upstream's FIN can arrive before
        ``connection_lost``)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.counted:
            self.pool.forget(self)
        response = self.response
        if response is not None:
            self.response = None
            response._lost()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        # Count the slot free now, not when the loop delivers connection_lost.
        self.connection_lost(None)


class _Pool:
    def __init__(self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> None:
        parts = urlsplit(config.url)
        assert parts.hostname, "the config parser checked the URL"
        self.name = config.name
        self.loop = loop
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl.create_default_context()
            self.ssl.set_alpn_protocols(["http/1.1"])  # the only protocol this client speaks
        default_port = parts.port is None or parts.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = config.connect_timeout_seconds
        self.read_timeout = config.read_timeout_seconds
        self.limit = config.max_connections
        self.open = 0  # connections open or being opened
        self.idle: list[_Connection] = []
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    async def post(
        self,
        path: str,
        headers: Sequence[tuple[str, str]],
        query: Sequence[tuple[str, str]],
        body: bytes,
    ) -> UpstreamResponse:
        head = self._head(path, headers, query, len(body))
        connection = await self._acquire()
        response = UpstreamResponse(self, connection)
        connection.response = response
        assert connection.transport is not None
        try:
            if len(body) < 16384:
                connection.transport.write(head + body)
            else:
                connection.transport.writelines((head, body))
        except (RuntimeError, OSError) as exc:  # closed under us (uvloop raises)
            response.release()
            raise _unreachable(self.name, type(exc).__name__) from None
        response._start_timer()
        try:
            await response._headers()
        except BaseException:
            response.release()
            raise
        return response

    def _head(
        self,
        path: str,
        headers: Sequence[tuple[str, str]],
        query: Sequence[tuple[str, str]],
        length: int,
    ) -> bytes:
        start = f"POST {self.base_path}{path}"
        lines = [
            f"{start}?{urlencode(query)}" if query else start,
            f" HTTP/1.1\r\nhost: {self.host_header}\r\ncontent-length: {length}\r\n"
            f"accept-encoding: {ACCEPT_ENCODING}\r\n",
        ]
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # Every line ends where one of ours does: a CR or LF inside a name or value
        # (a token from a provider, say) would otherwise inject headers.
        if text.count("\n") != len(headers) + 5 or text.count("\r") != len(headers) + 5:
            raise ValueError("an upstream request header contains a line break")
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("an upstream request header is not latin-1 text") from None

    def _idle_connection(self) -> _Connection | None:
        now = self.loop.time()
        while self.idle:
            connection = self.idle.pop()
            if not connection.usable:
                continue
            if now - connection.idle_since > IDLE_SECONDS:
                connection.close()
                continue
            return connection
        return None

    async def _acquire(self) -> _Connection:
        while self.open >= self.limit or self.idle:
            connection = self._idle_connection()
            if connection is not None:
                return connection
            if self.open < self.limit:
                break
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    handed_over = waiter.result()  # as we were cancelled: pass it on
                    if handed_over is not None:
                        self.put(handed_over)
                    else:
                        self._free_slot()
                raise
            if handed is not None and handed.usable:
                return handed
            # A free slot, or a connection that closed on its way here: look again.
        self.open += 1
        try:
            connection = await self._connect()
        except BaseException:
            self.open -= 1
            self._free_slot()
            raise
        connection.counted = True
        return connection

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                connection: _Connection
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise GatewayError(
                UPSTREAM_TIMEOUT, f"the upstream {self.name!r} did not accept a connection in time"
            ) from None
        except OSError as exc:  # refused, unknown host, TLS failure (ssl.SSLError)
            raise _unreachable(self.name, type(exc).__name__) from None
        if not connection.usable:  # lost (or closing) before this task resumed
            raise _unreachable(self.name, "the connection closed at once")
        return connection

    def put(self, connection: _Connection) -> None:
        """A connection free for the next request."""
        if not connection.usable:
            return
        if not self._hand_over(connection):
            connection.idle_since = self.loop.time()
            self.idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        """A connection closed: its slot is free."""
        self.open -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)
        self._free_slot()

    def _free_slot(self) -> None:
        self._hand_over(None)  # None: go and open one

    def _hand_over(self, handed: _Connection | None) -> bool:
        """Wake the first caller still waiting; False when none is."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(handed)
                return True
        return False

    def close(self) -> None:
        for connection in list(self.idle):
            connection.close()
        self.idle.clear()


class Upstreams:
    """The pools of all configured upstreams (made in ``start``, on the serving loop)."""

    def __init__(self, upstreams: Mapping[str, UpstreamConfig]) -> None:
        self._configs = dict(upstreams)
        self._pools: dict[str, _Pool] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._pools = {name: _Pool(config, loop) for name, config in self._configs.items()}

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        await asyncio.sleep(0)  # lets the closing transports' callbacks run

    async def post(
        self,
        upstream: UpstreamConfig,
        path: str,
        headers: Sequence[tuple[str, str]],
        query: Sequence[tuple[str, str]],
        body: bytes,
    ) -> UpstreamResponse:
        return await self._pools[upstream.name].post(path, headers, query, body)

    def open_connections(self, upstream: str) -> int:
        """Connections open or being opened to ``upstream``."""
        return self._pools[upstream].open
