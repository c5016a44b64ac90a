"""A loopback egress proxy (HTTP ``CONNECT``) and a TLS front end, for the upstream
client's production-network tests.

``EgressProxy`` is what a corporate egress gateway or Squid does for HTTPS: it
reads ``CONNECT host:port``, checks ``Proxy-Authorization`` (``Basic``, when
it was given credentials: 407 with ``Proxy-Authenticate`` otherwise), opens the
connection and relays bytes both ways until either side closes. It records each
tunnel (target, and the credentials it was shown) and each refusal.

``TlsFront`` stands in front of a plain-HTTP server the way an API's TLS load
balancer does: it terminates TLS with a server certificate, optionally demands
a client certificate signed by a given CA (mTLS), records the client
certificate's common name, and relays the plain bytes to the server behind it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.certs import Pki

_CHUNK = 64 * 1024


@dataclass
class Tunnel:
    target: str  # host:port as the CONNECT line named it
    credentials: str | None  # "user:password" from Proxy-Authorization, if any


@dataclass
class _Relays:
    """Open sockets and relay tasks, so that ``stop`` leaves nothing behind."""

    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()
        if self.tasks:
            await asyncio.wait(set(self.tasks))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, RuntimeError):  # RuntimeError: writing on a closed SSL transport
        writer.transport.abort()


async def relay(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Both directions until both ended; then both sockets are closed."""
    try:
        await asyncio.gather(_pump(a[0], b[1]), _pump(b[0], a[1]))
    finally:
        for writer in (a[1], b[1]):
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


class EgressProxy:
    """A ``CONNECT`` proxy on 127.0.0.1; ``credentials`` ("user:password") required
    when given."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.tunnels: list[Tunnel] = []
        self.refused: list[int] = []  # statuses of the refusals (407, 400, 502)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._relays = _Relays()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> EgressProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._relays.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._relays.writers.add(writer)
        self._relays.spawn(self._serve(reader, writer))

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, extra: str = "") -> None:
        self.refused.append(status)
        reasons = {400: "Bad Request", 407: "Proxy Authentication Required", 502: "Bad Gateway"}
        writer.write(
            f"HTTP/1.1 {status} {reasons[status]}\r\n{extra}content-length: 0\r\n"
            "connection: close\r\n\r\n".encode()
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                writer.close()
                return
            lines = head.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            target = rest.partition(" ")[0]
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or not host or not port.isdigit():
                await self._refuse(writer, 400)
                return
            shown = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "proxy-authorization":
                    scheme, _, token = value.strip().partition(" ")
                    if scheme.lower() == "basic":
                        with contextlib.suppress(ValueError):
                            shown = base64.b64decode(token, validate=True).decode("utf-8")
            if self.credentials is not None and shown != self.credentials:
                await self._refuse(writer, 407, 'proxy-authenticate: Basic realm="egress"\r\n')
                return
            try:
                upstream = await asyncio.open_connection(host.strip("[]"), int(port))
            except OSError:
                await self._refuse(writer, 502)
                return
            self._relays.writers.add(upstream[1])
            self.tunnels.append(Tunnel(target, shown))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await relay((reader, writer), upstream)
        finally:
            self._relays.writers.discard(writer)


class TlsFront:
    """TLS on 127.0.0.1 in front of ``127.0.0.1:backend_port`` (plain HTTP)."""

    def __init__(self, pki: Pki, backend_port: int, *, require_client_cert: bool) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        if require_client_cert:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(Path(pki.ca_cert))
        self.backend_port = backend_port
        self.client_names: list[str | None] = []  # per connection: the client cert's CN
        self.port = 0
        self._server: asyncio.Server | None = None
        self._relays = _Relays()

    async def start(self) -> TlsFront:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._relays.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._relays.writers.add(writer)
        self._relays.spawn(self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            cert = writer.get_extra_info("peercert")
            subject = dict(pair[0] for pair in cert["subject"]) if cert else {}
            self.client_names.append(subject.get("commonName"))
            try:
                backend = await asyncio.open_connection("127.0.0.1", self.backend_port)
            except OSError:
                writer.close()
                return
            self._relays.writers.add(backend[1])
            await relay((reader, writer), backend)
        finally:
            self._relays.writers.discard(writer)
