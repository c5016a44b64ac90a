"""The upstream client on production networks: a CA bundle and a client
certificate per upstream (mTLS), an explicit egress proxy (``CONNECT`` with
credentials), the idle keep-alive time, and a pooled connection checked just
before it is reused.

Servers are real loopback sockets: the scripted upstream (TLS with
``tests/support/certs.py`` certificates), ``tests/support/egress_proxy.py``'s
CONNECT proxy, and, where the test must hold the event loop still while the
upstream closes a connection, a small server on its own thread.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from keyrelay.configfile import ConfigError
from keyrelay.gateway.config import UpstreamConfig
from keyrelay.gateway.core.errors import UPSTREAM_TIMEOUT, UPSTREAM_UNREACHABLE, GatewayError
from keyrelay.gateway.http.upstream import Upstreams, tls_context
from tests.support.certs import Pki, make_pki
from tests.support.egress_proxy import EgressProxy
from tests.support.scripted_upstream import Make, config, json_answer, read, settle

CREDENTIALS = "gateway-7:s3cret:with:colons"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def server_tls(pki: Pki, *, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.set_alpn_protocols(["h2", "http/1.1"])  # as a real API front end offers
    if client_ca is not None:  # mTLS: no handshake without a certificate from this CA
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


@pytest.fixture
async def proxy() -> AsyncIterator[EgressProxy]:
    running = await EgressProxy(credentials=CREDENTIALS).start()
    yield running
    await running.stop()


# -- TLS: the CA bundle and the client certificate ------------------------------------


async def test_ca_file_is_the_upstreams_trust_store(make: Make, pki: Pki) -> None:
    """No SSL_CERT_FILE: the test CA is trusted only because ca_file names it."""
    server, upstreams = await make(
        json_answer(), ssl_context=server_tls(pki), ca_file=str(pki.ca_cert)
    )
    assert await read(upstreams) == (200, b'{"ok":true}')
    assert server.alpn == ["http/1.1"]


async def test_ca_file_replaces_the_system_trust_store(
    make: Make, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system store trusts the server's CA, but ca_file names another CA: refused."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    server, upstreams = await make(
        json_answer(), ssl_context=server_tls(pki), ca_file=str(other.ca_cert)
    )
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    assert caught.value.kind is UPSTREAM_UNREACHABLE
    assert "SSLCertVerificationError" in caught.value.message
    assert server.requests == []


async def test_a_client_certificate_for_mtls(make: Make, pki: Pki) -> None:
    server, upstreams = await make(
        json_answer(),
        ssl_context=server_tls(pki, client_ca=pki.ca_cert),
        ca_file=str(pki.ca_cert),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    assert await read(upstreams) == (200, b'{"ok":true}')
    assert server.client_names == ["gateway"]  # the server saw our certificate


async def test_without_the_client_certificate_an_mtls_upstream_is_unreachable(
    make: Make, pki: Pki
) -> None:
    server, upstreams = await make(
        json_answer(),
        ssl_context=server_tls(pki, client_ca=pki.ca_cert),
        ca_file=str(pki.ca_cert),
    )
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    # TLS 1.3 finishes the client's side of the handshake before the server
    # refuses: the refusal is a handshake error or a cut, a 502 either way.
    assert caught.value.kind is UPSTREAM_UNREACHABLE
    assert server.requests == []
    assert upstreams.open_connections("up") == 0


def test_tls_files_that_do_not_load_are_config_errors_naming_the_key(
    pki: Pki, tmp_path: Path
) -> None:
    base = {"name": "up", "url": "https://localhost:1"}
    with pytest.raises(ConfigError, match=r"^upstreams\.up\.ca_file: cannot load"):
        tls_context(UpstreamConfig(**base, ca_file=str(tmp_path / "missing.pem")))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^upstreams\.up\.cert_file: cannot load"):
        tls_context(
            UpstreamConfig(**base, cert_file=str(pki.client_cert), key_file=str(pki.server_cert))  # type: ignore[arg-type]
        )
    # The same error from the pools' constructor, before the worker serves anything.
    with pytest.raises(ConfigError, match="ca_file"):
        Upstreams({"up": UpstreamConfig(**base, ca_file=str(tmp_path / "missing.pem"))})  # type: ignore[arg-type]
    assert tls_context(UpstreamConfig(name="up", url="http://localhost:1")) is None


# -- the egress proxy -------------------------------------------------------------------


async def test_an_upstream_through_the_egress_proxy(make: Make, proxy: EgressProxy) -> None:
    server, upstreams = await make(
        json_answer(), proxy_url=proxy.url, proxy_credentials=CREDENTIALS
    )
    for _ in range(3):
        assert await read(upstreams) == (200, b'{"ok":true}')
    # One tunnel, kept alive for the three requests, with the credentials shown.
    assert [(t.target, t.credentials) for t in proxy.tunnels] == [
        (f"127.0.0.1:{server.port}", CREDENTIALS)
    ]
    assert server.connections == 1
    # The upstream sees a request for itself, not for the proxy.
    assert server.requests[0].header(b"host") == f"127.0.0.1:{server.port}".encode()
    assert server.requests[0].header(b"proxy-authorization") is None


async def test_an_https_upstream_with_mtls_through_the_egress_proxy(
    make: Make, pki: Pki, proxy: EgressProxy
) -> None:
    server, upstreams = await make(
        json_answer(),
        ssl_context=server_tls(pki, client_ca=pki.ca_cert),
        ca_file=str(pki.ca_cert),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
        proxy_url=proxy.url,
        proxy_credentials=CREDENTIALS,
    )
    assert await read(upstreams) == (200, b'{"ok":true}')
    assert await read(upstreams) == (200, b'{"ok":true}')
    assert [t.target for t in proxy.tunnels] == [f"localhost:{server.port}"]
    assert server.client_names == ["gateway"]
    assert server.alpn == ["http/1.1"]


async def test_wrong_proxy_credentials_are_a_clear_502(make: Make, proxy: EgressProxy) -> None:
    server, upstreams = await make(json_answer(), proxy_url=proxy.url, proxy_credentials="u:wrong")
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    assert caught.value.kind is UPSTREAM_UNREACHABLE
    assert "CONNECT answered 407" in caught.value.message
    assert "upstreams.up.proxy_credentials" in caught.value.message
    assert "wrong" not in caught.value.message
    assert proxy.refused == [407]
    assert server.connections == 0
    assert upstreams.open_connections("up") == 0


async def test_an_unreachable_proxy_is_a_clear_502(make: Make) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, upstreams = await make(json_answer(), proxy_url=f"http://127.0.0.1:{port}")
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    assert "egress proxy: ConnectionRefusedError" in caught.value.message
    assert upstreams.open_connections("up") == 0


async def test_a_proxy_that_answers_nonsense_is_a_clear_502(make: Make) -> None:
    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        writer.close()

    fake = await asyncio.start_server(nonsense, "127.0.0.1", 0)
    try:
        port = fake.sockets[0].getsockname()[1]
        _, upstreams = await make(json_answer(), proxy_url=f"http://127.0.0.1:{port}")
        with pytest.raises(
            GatewayError, match="egress proxy: an answer to CONNECT that is not HTTP"
        ):
            await read(upstreams)
    finally:
        fake.close()
        await fake.wait_closed()


async def test_a_proxy_that_never_answers_counts_against_the_connect_timeout(make: Make) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # until the client gives up

    fake = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = fake.sockets[0].getsockname()[1]
        _, upstreams = await make(
            json_answer(), proxy_url=f"http://127.0.0.1:{port}", connect_timeout_seconds=0.3
        )
        with pytest.raises(GatewayError) as caught:
            await asyncio.wait_for(read(upstreams), 30)
        assert caught.value.kind is UPSTREAM_TIMEOUT
        assert "did not accept a connection in time" in caught.value.message
        assert upstreams.open_connections("up") == 0
        assert len(accepted) == 1
    finally:
        for writer in accepted:
            writer.close()
        fake.close()
        await fake.wait_closed()


async def test_proxy_environment_variables_are_never_read(
    make: Make, proxy: EgressProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    server, upstreams = await make(json_answer())
    assert (await read(upstreams))[0] == 200
    assert proxy.tunnels == []
    assert server.connections == 1


# -- keep-alive: idle time, and the check before reuse ---------------------------------


async def test_an_idle_connection_is_closed_after_idle_timeout(make: Make) -> None:
    """Closed by the gateway's own timer, with no request coming to notice it."""
    server, upstreams = await make(json_answer(), idle_timeout_seconds=0.2)
    assert (await read(upstreams))[0] == 200
    assert upstreams.stats()[0].idle == 1
    await settle(lambda: server.closed_by_client == 1)
    assert upstreams.stats()[0].idle == 0
    assert upstreams.open_connections("up") == 0


async def test_a_connection_in_use_is_reused_within_the_idle_time(make: Make) -> None:
    server, upstreams = await make(json_answer(), idle_timeout_seconds=30)
    for _ in range(3):
        assert (await read(upstreams))[0] == 200
        await asyncio.sleep(0.05)
    assert server.connections == 1
    assert server.closed_by_client == 0


async def test_idle_timeout_zero_means_no_keep_alive(make: Make) -> None:
    server, upstreams = await make(json_answer(), idle_timeout_seconds=0)
    for _ in range(3):
        assert (await read(upstreams))[0] == 200
    assert server.connections == 3
    await settle(lambda: server.closed_by_client == 3)


class ClosingServer:
    """An HTTP server on its own thread: answers each request with keep-alive, and
    closes a connection when told to, while the test's event loop stands still."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.close_now = threading.Event()
        self.closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(
                target=self._serve, args=(conn, self.connections), daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(
                line.split(b":")[1] for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ))  # fmt: skip
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{"ok":true}')
            if number == 1:  # the first connection closes when the test says so
                self.close_now.wait(30)
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
                self.closed.set()
                return
            conn.settimeout(30)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                return

    def stop(self) -> None:
        self.close_now.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)
        self._accepting.join(5)


@pytest.fixture
def closing_server() -> Iterator[ClosingServer]:
    server = ClosingServer()
    yield server
    server.stop()


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(
    closing_server: ClosingServer,
) -> None:
    """The upstream's FIN has reached the socket, but the event loop has not run
    since, so the connection still looks open: the check before reuse sees the
    FIN and the request goes out on a new connection, with no error."""
    upstreams = Upstreams({"up": config(closing_server.port)})
    await upstreams.start()
    try:
        assert (await read(upstreams))[0] == 200
        pool = upstreams._pools["up"]
        (idle,) = pool.idle
        assert idle.transport is not None
        fd = idle.transport.get_extra_info("socket").fileno()
        # From here until the request is written nothing awaits: the loop stands still.
        closing_server.close_now.set()
        assert closing_server.closed.wait(10)
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        assert poll.poll(10_000), "the FIN never reached the socket"
        assert idle.usable  # as far as the transport knows, still open
        assert (await read(upstreams))[0] == 200
        assert closing_server.connections == 2
    finally:
        await upstreams.close()
