"""Scripted loopback upstreams that write exact bytes (the upstream client's tests,
and gateway tests that need framing, cuts or held answers on the wire).

Each server is a plain asyncio TCP server: it reads one request at a time and
answers with whatever the test scripts (``Answer``), so framing, keep-alive,
timeouts, back-pressure, cuts and broken answers are all on the wire, not
imagined. ``tests/integration/upstream_client/conftest.py``'s ``make`` fixture
starts one with an ``Upstreams`` aimed at it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from keyrelay.gateway.config import UpstreamConfig
from keyrelay.gateway.http.upstream import UpstreamResponse, Upstreams

Answer = Callable[["Request", asyncio.StreamWriter], Awaitable[None]]
Make = Callable[..., Awaitable[tuple["ScriptedServer", Upstreams]]]


@dataclass
class Request:
    head: bytes
    body: bytes
    connection: int  # which accepted connection it came on (0, 1, ...)
    reader: asyncio.StreamReader = field(repr=False)

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


@dataclass
class ScriptedServer:
    """Answers request ``n`` with ``answers[n]`` (the last one repeats)."""

    answers: list[Answer]
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    closed_by_client: int = 0
    server: asyncio.Server | None = None
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    alpn: list[str | None] = field(default_factory=list)  # per TLS connection
    client_names: list[str | None] = field(default_factory=list)  # client cert CN, per TLS conn

    async def start(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self.writers.add(writer)
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            self.alpn.append(tls.selected_alpn_protocol())
            cert = tls.getpeercert()
            subject = dict(pair[0] for pair in cert["subject"]) if cert else {}
            self.client_names.append(subject.get("commonName"))
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                request = Request(head, b"", number, reader)
                length = int(request.header(b"content-length") or 0)
                request.body = await reader.readexactly(length)
                self.requests.append(request)
                answer = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
                await answer(request, writer)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.open_now -= 1
            self.writers.discard(writer)
            writer.close()


def raw(data: bytes, *, close: bool = False) -> Answer:
    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return answer


def json_answer(body: bytes = b'{"ok":true}', *, extra: bytes = b"") -> Answer:
    return raw(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def chunked(parts: list[bytes], *, headers: bytes = b"") -> bytes:
    out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + headers
    out += b"transfer-encoding: chunked\r\n\r\n"
    for part in parts:
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


def stall() -> Answer:
    """Never answers; returns when the client closes the connection."""

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        await request.reader.read()

    return answer


def config(port: int, **overrides: object) -> UpstreamConfig:
    values: dict[str, object] = {"name": "up", "url": f"http://127.0.0.1:{port}"}
    values.update(overrides)
    return UpstreamConfig(**values)  # type: ignore[arg-type]


async def post(
    upstreams: Upstreams,
    *,
    path: str = "/v1/messages",
    headers: list[tuple[str, str]] | None = None,
    query: list[tuple[str, str]] | None = None,
    body: bytes = b'{"model":"m"}',
    port_config: UpstreamConfig | None = None,
) -> UpstreamResponse:
    upstream = port_config or next(iter(upstreams._configs.values()))
    return await upstreams.post(upstream, path, headers or [], query or [], body)


async def read(upstreams: Upstreams, **kwargs: object) -> tuple[int, bytes]:
    response = await post(upstreams, **kwargs)  # type: ignore[arg-type]
    try:
        return response.status, await response.read_all()
    finally:
        response.release()


async def settle(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER 0), as a crashed or
    impatient peer, or a middlebox, does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
