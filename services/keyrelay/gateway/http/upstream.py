"""The upstream HTTP client: HTTP/1.1 on asyncio + httptools, pooled per upstream.

Why not a general client: this is the gateway's hot path, and it needs one
thing, a ``POST`` with a body already serialised, answered by a JSON body or an
event stream. Measured on this kind of machine (``bench/gateway.py``), aiohttp's
client was the largest single cost of a proxied call (``ClientSession._request``
alone about a third of the gateway's CPU); this client is a protocol object,
the same C parser uvicorn uses (httptools / llhttp), and a future per wait.

What it does, and what a caller can rely on:

- **Pooling**: keep-alive connections per upstream, at most ``max_connections``
  open. Callers beyond that wait in a FIFO queue of at most ``max_waiting``,
  each for at most ``pool_timeout_seconds``; past either bound the answer is a
  503 ``overloaded_error`` with ``retry-after`` (``UPSTREAM_POOL_EXHAUSTED``).
  A freed connection, or a freed slot, goes to the first waiter. An idle
  connection is reused most recently used first; it is closed after
  ``idle_timeout_seconds`` (one pool timer, not one per connection), when the
  upstream closes it, and, checked just before reuse, when the socket has
  anything to read (a FIN, reset or TLS close_notify the loop has not
  delivered yet: one ``poll`` syscall per reuse). A ``POST`` is never re-sent on
  another connection (it is not idempotent: a retried Messages call may be
  billed twice).
- **Timeouts**: ``connect_timeout_seconds`` for connecting (egress proxy,
  ``CONNECT`` and TLS handshake included); ``read_timeout_seconds`` is the
  longest silence while waiting for the upstream (one timer per request, moved
  on lazily, not one per read); a reader paused by back-pressure is not the
  upstream's silence.
- **Back-pressure**: reading pauses while more than ``HIGH_WATER_BYTES`` of body
  wait for the caller, and resumes as the caller takes them; ``chunks`` also
  counts the steps its caller may still be sending (see there).
- **Cancellation**: a response released before its end closes the connection
  (so the upstream stops sending); a cancelled caller releases it.
- **Bodies**: ``Content-Length``, chunked, or until the connection closes;
  ``gzip`` / ``deflate`` decoded (the only encodings asked for); interim 1xx
  answers skipped.
- **Cuts**: an answer whose connection ends before its framing says it is
  complete raises ``UpstreamCut`` (a ``GatewayError``, 502) from ``post``,
  ``read_all`` or ``chunks``: a reset or any transport error at any point, or a
  FIN before the Content-Length or the last chunk. A FIN is a body's end only
  when the body is framed by the connection's end (neither length nor
  chunked). ``chunks`` yields everything that came before the cut first.
- **Networks**: HTTPS verified against the system trust store, or only the
  upstream's ``ca_file``; a client certificate (``cert_file``/``key_file``,
  mTLS); an explicit egress proxy (``proxy_url``, HTTP ``CONNECT``, ``Basic``
  credentials from the ``proxy_credentials`` secret). ``HTTPS_PROXY`` and the
  like are never read.
- **Errors**: every failure is a ``GatewayError`` (``UPSTREAM_TIMEOUT``,
  ``UPSTREAM_UNREACHABLE`` or ``UPSTREAM_POOL_EXHAUSTED``) that names the
  upstream and never a header value.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import select
import ssl
import zlib
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlencode, urlsplit

import httptools

from keyrelay.configfile import ConfigError
from keyrelay.gateway.config import UpstreamConfig
from keyrelay.gateway.core.errors import (
    UPSTREAM_POOL_EXHAUSTED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNREACHABLE,
    GatewayError,
)

# A non-streaming answer larger than this is not a Messages API response.
MAX_RESPONSE_BYTES: Final = 64 << 20
# Body bytes waiting for the caller before the connection stops being read.
HIGH_WATER_BYTES: Final = 256 << 10
# About the most ``chunks`` joins into one step (a single larger piece comes whole).
STEP_BYTES: Final = 64 << 10
ACCEPT_ENCODING: Final = "gzip, deflate"
# The retry-after of a 503 for an exhausted pool: soon, since connections free
# up all the time and a retry may reach another gateway worker.
RETRY_AFTER_SECONDS: Final = 1
# Bounds of the pool-wait histogram (seconds); a caller that found a connection
# free counts in the first bucket.
WAIT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0
)  # fmt: skip
# An egress proxy's answer to CONNECT longer than this is not one.
MAX_PROXY_HEAD_BYTES: Final = 16 << 10


def _unreachable(upstream: str, why: str) -> GatewayError:
    return GatewayError(
        UPSTREAM_UNREACHABLE,
        f"the upstream {upstream!r} is unreachable or broke the connection ({why})",
    )


def _timed_out(upstream: str) -> GatewayError:
    return GatewayError(UPSTREAM_TIMEOUT, f"the upstream {upstream!r} did not answer in time")


class UpstreamCut(GatewayError):
    """The connection ended before the answer did (a 502, ``UPSTREAM_UNREACHABLE``).

    A reset or any other transport error at any point, or a FIN where the
    framing promised more bytes. ``framing`` says where: ``"head"`` (before the
    response head was complete), ``"content-length"``, ``"chunked"`` or ``"eof"``
    (a body framed by the connection's end, which only a reset or an error cuts).
    Raised by ``Upstreams.post``, ``UpstreamResponse.read_all`` and
    ``UpstreamResponse.chunks`` (after the bytes that came before the cut).
    """

    def __init__(self, upstream: str, framing: str, error: BaseException | None) -> None:
        how = (
            "it closed the connection"
            if error is None
            else f"the connection failed ({type(error).__name__})"
        )
        where = "in the response head" if framing == "head" else f"{framing} framing"
        super().__init__(
            UPSTREAM_UNREACHABLE,
            f"the upstream {upstream!r} broke the connection: {how} "
            f"before the answer ended ({where})",
        )
        self.framing = framing


def tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The TLS settings of an https upstream (None for http): the system trust
    store, or only ``ca_file``; the client certificate, if any. A file that does
    not load is a ``ConfigError`` naming the key (raised at startup)."""
    if urlsplit(config.url).scheme != "https":
        return None
    key = f"upstreams.{config.name}"
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
    except OSError as exc:  # ssl.SSLError is one
        raise ConfigError(f"{key}.ca_file: cannot load {config.ca_file!r}: {_why(exc)}") from None
    if config.cert_file is not None:
        try:
            # An empty password: an encrypted key fails here instead of prompting
            # on the terminal (OpenSSL's default).
            context.load_cert_chain(config.cert_file, config.key_file, password=b"")
        except OSError as exc:
            raise ConfigError(
                f"{key}.cert_file: cannot load the client certificate and key "
                f"(an unencrypted PEM key, in key_file or with the certificate): {_why(exc)}"
            ) from None
    context.set_alpn_protocols(["http/1.1"])  # the only protocol this client speaks
    return context


def _why(exc: OSError) -> str:
    return exc.strerror or getattr(exc, "reason", None) or type(exc).__name__


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
        "_framing",
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
        # "content-length", "chunked", or "eof": the body ends with the connection.
        self._framing = "eof"
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

    @property
    def error(self) -> GatewayError | None:
        """Why the answer broke (a cut, a timeout), once it did; its reader meets it."""
        return self._error

    async def peek(self, limit: int, enough: Callable[[bytes], bool] | None = None) -> bytes:
        """The body's first bytes, left in place for ``read_all`` or ``chunks``: what
        has arrived once ``enough`` says so (None: never), the body is complete, it
        failed (the reader meets the error), or more than ``limit`` bytes are here.
        The bytes peeked count against the buffer as any unread bytes do; call it
        before reading, with a ``limit`` well under ``HIGH_WATER_BYTES``."""
        while True:
            head = b"".join(self._chunks)
            if (
                self._complete
                or self._error is not None
                or len(head) > limit
                or (head and enough is not None and enough(head))
            ):
                return head
            await self._wait()

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives, in steps of about ``STEP_BYTES`` at most (the
        pieces buffered, joined: as many as make that size at their mean size; a
        larger piece, one read, comes whole).

        Back-pressure reaches the upstream: a step counts as buffered until the
        caller has asked for two more (a caller that sends each step before
        asking for the next, through a server whose send waits while its write
        buffer is over its high-water mark, has written it out by then), and
        reading, paused above ``HIGH_WATER_BYTES``, resumes at half of it or
        when nothing is left to take. What one answer holds, from this buffer to
        the server's write buffer, stays within the high-water mark and one read
        however slowly the client reads.
        """
        # The sizes of the two steps before the current one, still counted.
        older = newer = 0
        while True:
            chunks = self._chunks
            if chunks:
                # As many pieces as make about STEP_BYTES at their mean size, and
                # at the first one's (no Python loop over the pieces: with one
                # HTTP chunk per event, a step holds hundreds).
                waiting = self._buffered - older - newer
                count = len(chunks)
                if waiting > STEP_BYTES and count > 1:
                    first = len(chunks[0]) or 1
                    count = max(1, min(count * STEP_BYTES // waiting, STEP_BYTES // first))
                step = chunks[0] if count == 1 else b"".join(chunks[:count])
                del chunks[:count]
                size = len(step)
                yield step
                del step
                self._buffered -= older
                if self._paused and self._buffered <= HIGH_WATER_BYTES // 2:
                    self._resume()
                older, newer = newer, size
                continue
            if self._paused:  # nothing left to take: read on, whatever is still counted
                self._resume()
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            await self._wait()

    def _resume(self) -> None:
        self._paused = False
        self._last_read = self._pool.loop.time()
        self._connection.resume_reading()

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

    def _lost(self, error: BaseException | None) -> None:
        """The connection ended (``error``: None for a FIN, else what broke it)."""
        if self._complete or self._error is not None:
            return
        if error is None and self.status and self._framing == "eof":
            # A FIN is the end of a body framed "until the connection closes".
            self._flush_decoder()
            if self._error is None:
                self._complete = True
                self._stop_timer()
                self._wake()
            return
        self._fail(UpstreamCut(self._pool.name, self._framing if self.status else "head", error))

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
        elif name == b"content-length":
            if self._framing == "eof":  # chunked wins over a length (RFC 9112, 6.3)
                self._framing = "content-length"
        elif name == b"transfer-encoding":
            if b"chunked" in value.lower():
                self._framing = "chunked"
        elif name == b"content-encoding":
            self._encoding = value.strip().lower()
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: its headers are not the answer's
            self.headers = []
            self.content_type = b""
            self._framing = "eof"
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
        self.tunnel: _TunnelAnswer | None = None  # waiting for the proxy's answer to CONNECT
        self.closed = False
        self.counted = False  # holds one of the pool's slots
        self.idle_since = 0.0
        self._poller: select.poll | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            if self.tunnel is not None:
                self.tunnel.feed(data)
                return
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        response._data(data)

    @property
    def usable(self) -> bool:
        """Open, and not already closing (the upstream's FIN can arrive before
        ``connection_lost``)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def stale(self) -> bool:
        """Whether the socket has something to read while nothing was asked: a FIN,
        a reset, a TLS close_notify or stray bytes that the loop has not delivered
        yet. Such a connection must not carry a request (one ``poll`` syscall)."""
        poller = self._poller
        if poller is None:
            transport = self.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is None:
                return False
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.counted:
            self.pool.forget(self)
        if self.tunnel is not None:
            self.tunnel.lost()
        response = self.response
        if response is not None:
            self.response = None
            response._lost(exc)

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


class _TunnelAnswer:
    """An egress proxy's answer to ``CONNECT``: the status of its head, read up to
    the blank line (at most ``MAX_PROXY_HEAD_BYTES``)."""

    __slots__ = ("_buffer", "_upstream", "extra", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: str) -> None:
        self.future: asyncio.Future[int] = loop.create_future()
        self.extra = False  # bytes after the head: nothing may come before the tunnel is used
        self._buffer = b""
        self._upstream = upstream

    def feed(self, data: bytes) -> None:
        if self.future.done():
            self.extra = True
            return
        buffer = self._buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_PROXY_HEAD_BYTES:
                self._fail("an answer to CONNECT that is too long")
            self._buffer = buffer
            return
        self.extra = len(buffer) > end + 4
        version, _, rest = buffer[: buffer.find(b"\r\n")].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            self._fail("an answer to CONNECT that is not HTTP")
            return
        self.future.set_result(int(code))

    def lost(self) -> None:
        self._fail("it closed the connection before answering CONNECT")

    def _fail(self, why: str) -> None:
        if not self.future.done():
            self.future.set_exception(_unreachable(self._upstream, f"egress proxy: {why}"))


class _Expired:
    """A waiter's deadline passed (the value its future gets)."""


_EXPIRED: Final = _Expired()


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One upstream's pool at one moment, for the metrics (read at scrape time)."""

    upstream: str
    open: int  # connections open or being opened
    idle: int
    waiting: int
    # Waits for a connection, per WAIT_BUCKETS bound and a last +Inf bucket (not
    # cumulative; a caller that waited not at all counts in the first), and their sum.
    wait_buckets: tuple[int, ...]
    wait_sum: float
    rejected_timeout: int
    rejected_queue_full: int

    @property
    def in_use(self) -> int:
        """Connections carrying a request, or being opened for one."""
        return self.open - self.idle


class _Pool:
    def __init__(
        self,
        config: UpstreamConfig,
        loop: asyncio.AbstractEventLoop,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(config.url)
        assert parts.hostname, "the config parser checked the URL"
        self.name = config.name
        self.loop = loop
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = tls if tls is not None else tls_context(config)
        default_port = parts.port is None or parts.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = config.connect_timeout_seconds
        self.read_timeout = config.read_timeout_seconds
        self.limit = config.max_connections
        self.pool_timeout = config.pool_timeout_seconds
        self.max_waiting = config.max_waiting
        self.idle_timeout = config.idle_timeout_seconds
        self.proxy: tuple[str, int] | None = None
        self.connect_request = b""
        if config.proxy_url is not None:
            proxy = urlsplit(config.proxy_url)
            assert proxy.hostname, "the config parser checked the URL"
            self.proxy = (proxy.hostname, proxy.port or 80)
            target = f"{host}:{self.port}"
            lines = [f"CONNECT {target} HTTP/1.1", f"host: {target}"]
            if config.proxy_credentials is not None:
                token = base64.b64encode(config.proxy_credentials.encode("utf-8")).decode("ascii")
                lines.append(f"proxy-authorization: Basic {token}")
            self.connect_request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.open = 0  # connections open or being opened (slots taken)
        self.idle: list[_Connection] = []  # oldest first
        self.waiters: deque[asyncio.Future[_Connection | _Expired | None]] = deque()
        self._sweep_timer: asyncio.TimerHandle | None = None
        # Counts for PoolStats.
        self.found_free = 0
        self.wait_counts = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.rejected_timeout = 0
        self.rejected_queue_full = 0

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

    # -- acquiring a connection ------------------------------------------------

    async def _acquire(self) -> _Connection:
        # Idle connections and free slots exist only while nobody waits (a freed
        # one goes to the first waiter): no caller overtakes the queue here.
        connection = self._idle_connection()
        if connection is not None:
            self.found_free += 1
            return connection
        if self.open < self.limit:
            self.found_free += 1
            self.open += 1
            return await self._open()
        return await self._wait()

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection that is still good, if any."""
        expired = self.loop.time() - self.idle_timeout
        while self.idle:
            connection = self.idle.pop()
            if not connection.usable:
                continue
            if connection.idle_since <= expired or connection.stale():
                connection.close()
                continue
            return connection
        return None

    async def _open(self) -> _Connection:
        """A new connection, in a slot already counted in ``open``."""
        try:
            connection = await self._connect()
        except BaseException:
            self.open -= 1
            self._free_slot()
            raise
        connection.counted = True
        return connection

    async def _wait(self) -> _Connection:
        if len(self.waiters) >= self.max_waiting:
            self.rejected_queue_full += 1
            raise self._exhausted(
                f"{len(self.waiters)} requests already wait for one "
                f"(upstreams.{self.name}.max_waiting)"
            )
        loop = self.loop
        started = loop.time()
        try:
            handed = await self._queue(started + self.pool_timeout)
        finally:
            waited = loop.time() - started
            self.wait_sum += waited
            self.wait_counts[_bucket(waited)] += 1
        if handed is None:  # a free slot, counted for this caller
            return await self._open()
        return handed

    async def _queue(self, deadline: float) -> _Connection | None:
        """Waits in line until handed a connection or a slot, or the deadline."""
        loop = self.loop
        first_in_line = False
        while True:
            waiter: asyncio.Future[_Connection | _Expired | None] = loop.create_future()
            if first_in_line:
                self.waiters.appendleft(waiter)
            else:
                self.waiters.append(waiter)
            timer = loop.call_at(deadline, self._expire, waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())  # handed over as we were cancelled
                raise
            finally:
                timer.cancel()
            if isinstance(handed, _Expired):
                self.rejected_timeout += 1
                raise self._exhausted(
                    f"none was free within {self.pool_timeout:g} s "
                    f"(upstreams.{self.name}.pool_timeout_seconds)"
                )
            if handed is None or handed.usable:
                return handed
            # A connection that closed on its way here: its slot went to the next
            # in line. Look again, and wait first in line if there is nothing.
            connection = self._idle_connection()
            if connection is not None:
                return connection
            if self.open < self.limit:
                self.open += 1
                return None
            first_in_line = True

    def _expire(self, waiter: asyncio.Future[_Connection | _Expired | None]) -> None:
        if not waiter.done():
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            waiter.set_result(_EXPIRED)

    def _pass_on(self, handed: _Connection | _Expired | None) -> None:
        """What a cancelled waiter was handed goes to the next one."""
        if handed is None:
            self.open -= 1
            self._free_slot()
        elif isinstance(handed, _Connection):
            self.put(handed)

    def _exhausted(self, why: str) -> GatewayError:
        return GatewayError(
            UPSTREAM_POOL_EXHAUSTED,
            f"the gateway has no connection free to the upstream {self.name!r}: all "
            f"{self.limit} (upstreams.{self.name}.max_connections) are in use and {why}; "
            f"retry in {RETRY_AFTER_SECONDS} s",
            retry_after=RETRY_AFTER_SECONDS,
        )

    # -- connecting --------------------------------------------------------------

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                connection: _Connection
                if self.proxy is not None:
                    connection = await self._tunnel(self.proxy)
                else:
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

    async def _tunnel(self, proxy: tuple[str, int]) -> _Connection:
        """A connection through the egress proxy: ``CONNECT``, then TLS inside."""
        try:
            transport, connection = await self.loop.create_connection(
                lambda: _Connection(self), *proxy
            )
        except OSError as exc:
            raise _unreachable(self.name, f"egress proxy: {type(exc).__name__}") from None
        try:
            await self._through(connection, transport)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _through(self, connection: _Connection, transport: asyncio.Transport) -> None:
        answer = connection.tunnel = _TunnelAnswer(self.loop, self.name)
        transport.write(self.connect_request)
        status = await answer.future
        connection.tunnel = None
        if status != 200:
            hint = f"; check upstreams.{self.name}.proxy_credentials" if status == 407 else ""
            raise _unreachable(self.name, f"egress proxy: CONNECT answered {status}{hint}")
        if answer.extra:
            raise _unreachable(self.name, "egress proxy: bytes before the tunnel was used")
        if self.ssl is not None:
            tls = await self.loop.start_tls(
                transport, connection, self.ssl, server_hostname=self.host
            )
            if tls is None:  # closed during the handshake
                raise _unreachable(self.name, "the connection closed during the TLS handshake")
            connection.transport = tls

    # -- giving connections back -------------------------------------------------

    def put(self, connection: _Connection) -> None:
        """A connection free for the next request."""
        if not connection.usable:
            return
        if self._hand_over(connection):
            return
        if self.idle_timeout <= 0:  # no keep-alive
            connection.close()
            return
        connection.idle_since = self.loop.time()
        self.idle.append(connection)
        if self._sweep_timer is None:
            self._sweep_timer = self.loop.call_at(
                connection.idle_since + self.idle_timeout, self._sweep
            )

    def _sweep(self) -> None:
        """Closes the connections idle for ``idle_timeout`` (oldest first in ``idle``)."""
        self._sweep_timer = None
        expired = self.loop.time() - self.idle_timeout
        while self.idle and self.idle[0].idle_since <= expired:
            self.idle.pop(0).close()
        if self.idle:
            self._sweep_timer = self.loop.call_at(
                self.idle[0].idle_since + self.idle_timeout, self._sweep
            )

    def forget(self, connection: _Connection) -> None:
        """A connection closed: its slot is free."""
        self.open -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)
        self._free_slot()

    def _free_slot(self) -> None:
        """A slot is free: the first waiter gets it (counted for it now, so nobody
        else takes it before it runs) and connects."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.open += 1
                waiter.set_result(None)
                return

    def _hand_over(self, connection: _Connection) -> bool:
        """Give ``connection`` to the first caller still waiting; False when none is."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    def stats(self) -> PoolStats:
        buckets = list(self.wait_counts)
        buckets[0] += self.found_free
        return PoolStats(
            upstream=self.name,
            open=self.open,
            idle=len(self.idle),
            waiting=len(self.waiters),
            wait_buckets=tuple(buckets),
            wait_sum=self.wait_sum,
            rejected_timeout=self.rejected_timeout,
            rejected_queue_full=self.rejected_queue_full,
        )

    def close(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for connection in list(self.idle):
            connection.close()
        self.idle.clear()


def _bucket(seconds: float) -> int:
    for index, bound in enumerate(WAIT_BUCKETS):
        if seconds <= bound:
            return index
    return len(WAIT_BUCKETS)


class Upstreams:
    """The pools of all configured upstreams (made in ``start``, on the serving loop)."""

    def __init__(self, upstreams: Mapping[str, UpstreamConfig]) -> None:
        self._configs = dict(upstreams)
        # Built now, not in start: a certificate that does not load stops the
        # worker at startup with a ConfigError naming the key.
        self._tls = {name: tls_context(config) for name, config in self._configs.items()}
        self._pools: dict[str, _Pool] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._pools = {
            name: _Pool(config, loop, self._tls[name]) for name, config in self._configs.items()
        }

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

    def stats(self) -> list[PoolStats]:
        """Every pool's state (none before ``start``)."""
        return [pool.stats() for pool in self._pools.values()]
