"""A small asyncio Redis client for the limits store: one connection, auto-pipelined.

Why not redis-py's (docs/decisions.md, "Limits store client"): its asyncio client
costs the gateway ~150 us of CPU per call (argument encoding, pool bookkeeping,
a socket send per call, a timer per call); the gateway's budget for admit +
finish together is ~35 us. This client does only what the store needs:

- **One connection**, made on first use, ``AUTH user password`` and ``SELECT db``
  from the URL (``redis://user:pass@host:port/db``, ``rediss://`` for TLS,
  ``unix:///path?db=N``), written ahead of the first commands.
- **Auto-pipelining**: every command sent in one event-loop iteration goes out
  in one ``transport.write`` (a ``call_soon`` flush); replies are matched to
  calls first in, first out and parsed by ``hiredis.Reader``.
- **Commands are bytes** the caller encoded (``encode``, or pieces it keeps):
  the store prepares most of each call once per minute, not per call.
- **Deadlines, one timer per connection**: each call has a deadline
  (``timeout`` after it was sent); one timer watches the oldest call. No reply
  to it in time: every call on the connection fails with ``RedisUnavailable``
  and the connection is closed (its replies could no longer be matched).
- **Bounds**: at most ``max_pending`` calls waiting for replies; beyond,
  ``send`` raises ``RedisUnavailable`` at once (saying so), never queues.
- **The connection lost**: calls sent with ``resend=True`` (idempotent ones)
  are sent once more on a new connection within their deadline; the others
  fail with ``RedisUnavailable``. A connection that cannot be made fails its
  calls; the next attempt waits ``min(0.05 s * 2**n, 1 s)`` (backoff), and calls
  due before it fail at once.
- A reply that is not RESP, or one nobody asked for: the connection is closed
  and every call on it fails. Error replies are ``ReplyError`` (the message as
  Redis wrote it: ``NOPERM ...``, ``NOSCRIPT ...``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias, Union, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

__all__ = [
    "DEFAULT_MAX_PENDING",
    "Address",
    "RedisUnavailable",
    "Reply",
    "ReplyError",
    "RespClient",
    "Script",
    "bulk",
    "bulks",
    "encode",
    "parse_url",
]

DEFAULT_MAX_PENDING: Final = 10_000
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 1.0
FLUSH_CALLS: Final = 256  # calls held for one send at most (see _Connection.add)

Reply: TypeAlias = Union[int, bytes, "ReplyError", list["Reply"], None]


class ReplyError(Exception):
    """An error reply from Redis; ``str()`` is its message (``NOPERM ...``)."""


class RedisUnavailable(Exception):
    """No reply: the connection failed or was lost, the deadline passed, or too many
    calls were waiting."""


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def bulks(*values: str | int) -> bytes:
    """Bulk strings of ``values``, one after the other (parts of a command)."""
    return b"".join(bulk(str(value).encode()) for value in values)


def encode(*args: bytes | str | int) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(bulk(data))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Address:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0


def parse_url(url: str) -> Address:
    """``redis://[user[:password]@]host[:port][/db]``, ``rediss://`` (TLS, verified),
    ``unix://[user[:password]@]/path[?db=N]``. Raises ``ValueError`` naming the part."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, got {scheme!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ValueError(f"unsupported Redis URL parameter(s): {', '.join(unknown)} (known: db)")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    db_text = query["db"][-1] if "db" in query else ""
    if scheme != "unix":
        path_db = parts.path.lstrip("/")
        db_text = path_db or db_text
    try:
        db = int(db_text or 0)
    except ValueError:
        raise ValueError(f"the Redis database must be a number, got {db_text!r}") from None
    if db < 0:
        raise ValueError(f"the Redis database must be 0 or more, got {db}")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        return Address(path=parts.path, username=username, password=password, db=db)
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ValueError(f"bad port in the Redis URL: {exc}") from None
    return Address(
        host=parts.hostname or "127.0.0.1",
        port=port,
        tls=scheme == "rediss",
        username=username,
        password=password,
        db=db,
    )


def _handshake(address: Address) -> list[tuple[bytes, str]]:
    """The commands a new connection starts with, and what each is called in errors."""
    steps: list[tuple[bytes, str]] = []
    if address.password is not None:
        if address.username:
            steps.append((encode("AUTH", address.username, address.password), "AUTH"))
        else:
            steps.append((encode("AUTH", address.password), "AUTH"))
    if address.db:
        steps.append((encode("SELECT", address.db), "SELECT"))
    return steps


# A call waiting for its reply: its future (None for a handshake step), the command
# (to re-send it, or the step's name), its deadline (loop time), and whether it may
# be sent once more on a new connection.
_Call: TypeAlias = tuple["asyncio.Future[Reply] | None", bytes | str, float, bool]


class _Connection(asyncio.Protocol):
    """One connection's calls in flight, in the order they were written."""

    def __init__(self, client: RespClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self.pending: collections.deque[_Call] = collections.deque()
        self.out: list[bytes] = []  # written at the next flush (or once connected)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.flush_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None
        self._reader = hiredis.Reader(replyError=ReplyError)

    # -- sending -------------------------------------------------------------------------

    def add(self, call: _Call, data: bytes, *, hold: bool = False) -> None:
        self.pending.append(call)
        self.out.append(data)
        # Written at the end of this loop iteration, with every other call of it: one
        # send for all (a send per call was the client's largest cost in the gateway).
        # A call that may ``hold`` waits, while written calls await their replies, for
        # the next call that may not or for those replies (at most FLUSH_CALLS held).
        if (
            not self.flush_scheduled
            and self.transport is not None
            and (not hold or len(self.pending) == len(self.out) or len(self.out) >= FLUSH_CALLS)
        ):
            self.flush_scheduled = True
            self._loop.call_soon(self.flush)
        if self.timer is None:
            self.timer = self._loop.call_at(call[2], self._sweep)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.closed:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.transport.write(data)

    def _sweep(self) -> None:
        """The one timer: fails everything when the oldest call is past its deadline."""
        self.timer = None
        if self.closed or not self.pending:
            return
        deadline = self.pending[0][2]
        if deadline <= self._loop.time():
            self.fail(RedisUnavailable(f"no reply within {self._client.timeout:g} s"), resend=False)
        else:
            self.timer = self._loop.call_at(deadline, self._sweep)

    # -- the protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: a cast, not a check)
        tcp = cast(asyncio.Transport, transport)
        if self.closed:  # failed (deadline) while connecting
            tcp.abort()
            return
        self.transport = tcp
        steps = _handshake(self._client.address)
        # The steps share the first call's deadline: it waits for them.
        deadline = self.pending[0][2] if self.pending else self._loop.time() + self._client.timeout
        for data, name in reversed(steps):
            self.pending.appendleft((None, name, deadline, False))
            self.out.insert(0, data)
        if self.timer is None and self.pending:
            self.timer = self._loop.call_at(self.pending[0][2], self._sweep)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
            self._dispatch()
        except hiredis.ProtocolError as exc:
            self.fail(RedisUnavailable(f"a reply that is not RESP: {exc}"), resend=False)
        except RedisUnavailable as exc:
            self.fail(exc, resend=False)

    def _dispatch(self) -> None:
        """Every complete reply to its call, in order."""
        reader, pending = self._reader, self.pending
        while (reply := reader.gets()) is not False:
            if not pending:
                raise RedisUnavailable(f"a reply nobody asked for: {reply!r:.80}")
            future, what, _, _ = pending.popleft()
            if future is None:  # a handshake step
                if isinstance(reply, ReplyError):
                    raise RedisUnavailable(f"{what!s} refused: {reply}")
            elif not future.done():
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        if self.out and len(pending) == len(self.out) and not self.flush_scheduled:
            self.flush_scheduled = True  # every written call answered: the held ones go
            self._loop.call_soon(self.flush)

    def eof_received(self) -> bool:
        return False  # closes the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self.fail(RedisUnavailable(reason), resend=True)

    def fail(self, error: RedisUnavailable, *, resend: bool) -> None:
        """Closes this connection; its calls fail with ``error``, or (``resend``, when
        allowed) go to the client's next connection."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connecting is not None:
            self.connecting.cancel()
        if self.transport is not None:
            self.transport.abort()
        calls, self.pending = self.pending, collections.deque()
        self.out.clear()
        self._client.lost(self, calls, error, resend=resend)


class RespClient:
    """Commands (RESP bytes) to one Redis, auto-pipelined; see the module docstring.

    Must be used from one event loop (the first that sends)."""

    def __init__(
        self,
        address: Address,
        *,
        timeout: float,
        max_pending: int = DEFAULT_MAX_PENDING,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be more than 0 s, got {timeout}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.address = address
        self.timeout = timeout
        self.max_pending = max_pending
        self._ssl = ssl_context or (ssl.create_default_context() if address.tls else None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: _Connection | None = None
        self._closed = False
        self._failures = 0  # connections that failed in a row (the backoff)
        self._retry_at = 0.0
        self._last_error = ""
        self.connections_made = 0  # tests and metrics: how often it (re)connected

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float, max_pending: int = DEFAULT_MAX_PENDING
    ) -> RespClient:
        return cls(parse_url(url), timeout=timeout, max_pending=max_pending)

    @property
    def pending(self) -> int:
        """Calls waiting for their replies."""
        conn = self._conn
        return 0 if conn is None or conn.closed else len(conn.pending)

    def send(
        self,
        data: bytes,
        *,
        resend: bool = False,
        deadline: float | None = None,
        hold: bool = False,
    ) -> asyncio.Future[Reply]:
        """Sends one command (``data``: RESP, from ``encode``); the future has the reply,
        a ``ReplyError``, or ``RedisUnavailable`` by ``deadline`` (loop time; default
        ``timeout`` from now). Raises ``RedisUnavailable`` at once when closed, backing
        off after a failed connection, or at ``max_pending``."""
        loop = self._loop or self._started()
        if deadline is None:
            deadline = loop.time() + self.timeout
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._connect(deadline)
        if len(conn.pending) >= self.max_pending:
            raise RedisUnavailable(
                f"{len(conn.pending)} calls are already waiting for replies "
                f"(max_pending = {self.max_pending}): the store is too slow for this load"
            )
        future: asyncio.Future[Reply] = loop.create_future()
        conn.add((future, data, deadline, resend), data, hold=hold)
        return future

    async def execute(self, *args: bytes | str | int) -> Reply:
        """One command; its reply (raises ``ReplyError``, ``RedisUnavailable``)."""
        return await self.send(encode(*args))

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RedisUnavailable("the client is closed")
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _connect(self, deadline: float) -> _Connection:
        """A new connection for a call due by ``deadline``: made now, or when the
        backoff after failed ones ends (``RedisUnavailable`` if that is too late)."""
        if self._closed:
            raise RedisUnavailable("the client is closed")
        loop = self._loop
        assert loop is not None
        delay = self._retry_at - loop.time()
        if delay > 0 and deadline < self._retry_at:
            raise RedisUnavailable(
                f"not connected ({self._last_error}); next attempt in {delay:.2f} s"
            )
        conn = self._conn = _Connection(self, loop)
        conn.connecting = loop.create_task(self._open(conn, delay))
        return conn

    async def _open(self, conn: _Connection, delay: float) -> None:
        loop = self._loop
        assert loop is not None
        address = self.address
        factory: Callable[[], _Connection] = lambda: conn  # noqa: E731
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            if address.path is not None:
                await loop.create_unix_connection(factory, address.path)
            else:
                await loop.create_connection(
                    factory,
                    address.host,
                    address.port,
                    ssl=self._ssl,
                    server_hostname=address.host if self._ssl else None,
                )
        except asyncio.CancelledError:
            return  # failed meanwhile (deadline, close): its calls are already answered
        except (OSError, ssl.SSLError) as exc:
            conn.fail(RedisUnavailable(f"cannot connect: {exc}"), resend=False)
            self._failures += 1
            self._retry_at = loop.time() + min(
                BACKOFF_FIRST * 2 ** (self._failures - 1), BACKOFF_MAX
            )
            self._last_error = f"cannot connect: {exc}"
            return
        finally:
            conn.connecting = None
        self.connections_made += 1
        self._failures = 0

    def lost(
        self,
        conn: _Connection,
        calls: collections.deque[_Call],
        error: RedisUnavailable,
        *,
        resend: bool,
    ) -> None:
        """A connection failed with ``calls`` in flight: each is re-sent once on a new
        connection (``resend``, allowed, in time) or fails with ``error``."""
        if self._conn is conn:
            self._conn = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        again: list[_Call] = []
        for call in calls:
            future, data, deadline, may_resend = call
            if future is None or future.done():
                continue
            if resend and may_resend and deadline > now and not self._closed:
                again.append(call)
            else:
                future.set_exception(RedisUnavailable(str(error)))
        if not again:
            return
        try:
            new = self._connect(max(call[2] for call in again))
        except RedisUnavailable as exc:
            for future, _, _, _ in again:
                if future is not None and not future.done():
                    future.set_exception(RedisUnavailable(f"{error}; then {exc}"))
            return
        for future, data, deadline, _ in again:
            assert isinstance(data, bytes)
            new.add((future, data, deadline, False), data)

    async def close(self) -> None:
        """Fails every call in flight and closes the connection."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(RedisUnavailable("the client is closed"), resend=False)
            await asyncio.sleep(0)  # the transport's close runs


class Script:
    """A Lua script by its SHA-1: the start of every EVALSHA of it, its SCRIPT LOAD,
    and ``run``, which loads it when Redis does not have it (restarted, flushed)."""

    def __init__(self, source: str) -> None:
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 -- Redis's name
        self.load = encode("SCRIPT", "LOAD", source)

    def head(self, keys: int, args: int) -> bytes:
        """``EVALSHA sha <keys>``, for a call of ``keys`` keys and ``args`` arguments."""
        return b"*%d\r\n" % (3 + keys + args) + bulks("EVALSHA", self.sha, keys)

    async def run(
        self,
        client: RespClient,
        command: bytes,
        *,
        resend: bool = True,
        hold: bool = False,
        sent: asyncio.Future[Reply] | None = None,
    ) -> Reply:
        """The reply to ``command`` (an EVALSHA of this script); after NOSCRIPT, SCRIPT
        LOAD and the call again, pipelined (``resend``, ``hold``: as ``send``'s;
        ``sent``: the call already sent, to wait for). Raises ``ReplyError``,
        ``RedisUnavailable``."""
        try:
            if sent is not None:
                return await sent
            return await client.send(command, resend=resend, hold=hold)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        loaded = client.send(self.load, resend=True)
        try:
            again = client.send(command, resend=resend)
        except RedisUnavailable:
            await asyncio.gather(loaded, return_exceptions=True)  # retrieved, not told
            raise
        # Both retrieved; a failed load (ACL) is the error to tell, not the NOSCRIPT after.
        outcomes = await asyncio.gather(loaded, again, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return cast(Reply, outcomes[1])
