"""A loopback TCP proxy in front of Redis that can lose a reply after the write succeeded.

``ReplyDroppingProxy`` listens on 127.0.0.1 (a free port) and relays every connection
to the target byte for byte, both ways, with back-pressure. ``drop_reply_after(needle)``
arms it: the next client chunk that contains ``needle`` is forwarded to Redis, the
proxy waits until Redis has answered, throws the answer away and closes both sides of
that connection. Redis ran the command; the client sees a connection error instead of
the reply, and a client that retries reconnects through the proxy and runs it again.

The reply that is dropped is the first data Redis sends after the matching chunk was
forwarded. That is exact for a client that waits for each reply before it sends the
next command (redis-py's plain commands, and a pipeline sent as one write); a client
that keeps several commands in flight across writes may lose an earlier reply instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from types import TracebackType

_CHUNK = 64 * 1024
# Client bytes kept from the previous read, so a needle split across two reads matches.
_TAIL = 1024


class _End(enum.Enum):
    EOF = enum.auto()  # the reading side closed; the EOF was passed on
    ERROR = enum.auto()  # a socket error on either side
    MATCHED = enum.auto()  # the requests side forwarded an armed chunk and stopped
    DROPPED = enum.auto()  # the replies side read and discarded the reply to it


class _Connection:
    """One client connection and its connection to the target."""

    def __init__(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        self.client_reader, self.client_writer = client_reader, client_writer
        self.server_reader, self.server_writer = server_reader, server_writer
        # Set before the matching chunk goes out: from then on nothing reaches the client.
        self.dropping = False
        # Set once it went out: the next bytes from Redis count as the reply to it.
        self.forwarded = False


class ReplyDroppingProxy:
    """A loopback proxy to ``target_host:target_port``; see the module docstring."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target_host = target_host
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._closing = False
        self._port: int | None = None
        self._armed: dict[bytes, int] = {}
        self._dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._closing = False
        # A plain callback (not a coroutine): the handler task and the client socket
        # are tracked before anything else can run, so close() always finds them.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_reply_after(self, needle: bytes, count: int = 1) -> None:
        """Lose the reply to the next ``count`` client chunks that contain ``needle``.

        Calls add up: arming the same needle twice drops two replies.
        """
        if not needle:
            raise ValueError("the needle must not be empty")
        if len(needle) > _TAIL + 1:
            raise ValueError(f"the needle must be at most {_TAIL + 1} bytes")
        if count < 1:
            raise ValueError("count must be at least 1")
        self._armed[needle] = self._armed.get(needle, 0) + count

    @property
    def dropped(self) -> int:
        """How many replies were dropped so far."""
        return self._dropped

    async def close(self) -> None:
        """Stop listening, close every open connection and wait for every task."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        # Shutting the sockets ends every relay by itself (reads see EOF, writes fail),
        # so each handler runs its own cleanup to the end. (Cancelling a handler that
        # awaits wait_closed() would cancel the future that every waiter shares.)
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ReplyDroppingProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _accept(self, client_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.create_task(self._handle(client_reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        server_writer: asyncio.StreamWriter | None = None
        pumps: set[asyncio.Task[_End]] = set()
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(
                    self._target_host, self._target_port
                )
            except OSError:
                return
            self._writers.add(server_writer)
            if self._closing:  # accepted just before close(), which missed this socket
                return
            conn = _Connection(client_reader, client_writer, server_reader, server_writer)
            requests = asyncio.create_task(self._relay_requests(conn))
            replies = asyncio.create_task(self._relay_replies(conn))
            pumps = {requests, replies}
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if requests.done() and requests.result() is not _End.ERROR:
                # The client half-closed (Redis then closes) or an armed chunk went
                # out: either way the connection ends when the replies side does.
                await asyncio.wait({replies})
            if replies.done() and replies.result() is _End.DROPPED:
                self._dropped += 1
        finally:
            for pump in pumps:
                pump.cancel()
            if pumps:
                await asyncio.wait(pumps)
            for writer in (client_writer, server_writer):
                if writer is not None:
                    await _close(writer)
                    self._writers.discard(writer)

    async def _relay_requests(self, conn: _Connection) -> _End:
        tail = b""
        try:
            while True:
                data = await conn.client_reader.read(_CHUNK)
                if not data:
                    if conn.server_writer.can_write_eof():
                        conn.server_writer.write_eof()
                    return _End.EOF
                matched = self._match(tail, data)
                tail = data[-_TAIL:] if len(data) >= _TAIL else (tail + data)[-_TAIL:]
                if matched:
                    conn.dropping = True
                conn.server_writer.write(data)
                await conn.server_writer.drain()
                if matched:
                    conn.forwarded = True
                    return _End.MATCHED
        except OSError:
            return _End.ERROR

    async def _relay_replies(self, conn: _Connection) -> _End:
        try:
            while True:
                data = await conn.server_reader.read(_CHUNK)
                if not data:
                    if not conn.dropping and conn.client_writer.can_write_eof():
                        conn.client_writer.write_eof()
                    return _End.EOF
                if conn.dropping:
                    if conn.forwarded:
                        return _End.DROPPED
                    continue  # replies to earlier commands: the client loses them too
                conn.client_writer.write(data)
                await conn.client_writer.drain()
        except OSError:
            return _End.ERROR

    def _match(self, tail: bytes, data: bytes) -> bool:
        """Whether ``data`` (with the end of the previous chunk) holds an armed needle.

        A match uses up one of that needle's drops.
        """
        for needle, remaining in self._armed.items():
            # Only the last len(needle) - 1 tail bytes: a needle wholly in the tail
            # was in the previous chunk already.
            keep = len(needle) - 1
            window = (tail[len(tail) - keep :] if keep else b"") + data
            if needle in window:
                if remaining > 1:
                    self._armed[needle] = remaining - 1
                else:
                    del self._armed[needle]
                return True
        return False


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
