"""The gateway's upstream HTTP client against real loopback servers that write exact bytes.

The servers (``tests/support/scripted_upstream.py``) read one request at a
time and answer with whatever the test scripts, so framing, keep-alive,
timeouts, back-pressure and broken answers are all on the wire, not imagined.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import zlib
from pathlib import Path

import pytest

from keyrelay.gateway.core.errors import UPSTREAM_TIMEOUT, UPSTREAM_UNREACHABLE, GatewayError
from keyrelay.gateway.http import upstream as upstream_module
from keyrelay.gateway.http.upstream import HIGH_WATER_BYTES, Upstreams
from tests.support.certs import make_pki
from tests.support.scripted_upstream import (
    Answer,
    Make,
    Request,
    ScriptedServer,
    chunked,
    config,
    json_answer,
    post,
    raw,
    read,
    settle,
    stall,
)

# -- the request on the wire -------------------------------------------------------


async def test_the_request_is_exactly_what_was_asked(make: Make) -> None:
    server, upstreams = await make(json_answer(), base_path="/base")
    status, body = await read(
        upstreams,
        headers=[("x-api-key", "sk-1"), ("anthropic-beta", "a,b")],
        query=[("beta", "true"), ("q", "a b&c")],
        body=b'{"x":1}',
    )
    assert (status, body) == (200, b'{"ok":true}')
    (request,) = server.requests
    assert request.request_line == b"POST /base/v1/messages?beta=true&q=a+b%26c HTTP/1.1"
    assert request.header(b"host") == f"127.0.0.1:{server.port}".encode()
    assert request.header(b"content-length") == b"7"
    assert request.header(b"x-api-key") == b"sk-1"
    assert request.header(b"anthropic-beta") == b"a,b"
    assert request.header(b"accept-encoding") == b"gzip, deflate"
    assert request.body == b'{"x":1}'


async def test_a_large_body_goes_out_whole(make: Make) -> None:
    server, upstreams = await make(json_answer())
    body = b'{"text":"' + b"x" * (3 << 20) + b'"}'
    assert (await read(upstreams, body=body))[0] == 200
    assert server.requests[0].body == body


@pytest.mark.parametrize(
    "value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "caf\u00e9\u2603"], ids=repr
)
async def test_a_header_that_would_break_the_request_is_refused_before_sending(
    make: Make, value: str
) -> None:
    server, upstreams = await make(json_answer())
    with pytest.raises(ValueError, match="upstream request header") as caught:
        await post(upstreams, headers=[("authorization", value)])
    assert value not in str(caught.value)  # a header value never lands in an error
    assert server.connections == 0
    assert server.requests == []


# -- bodies --------------------------------------------------------------------------


async def test_content_length_chunked_and_until_close_bodies(
    make: Make,
) -> None:
    _, upstreams = await make(
        json_answer(b'{"a":1}'),
        raw(chunked([b"data: 1\n\n", b"data: 2\n\n"])),
        raw(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"eof":1}', close=True),
    )
    assert await read(upstreams) == (200, b'{"a":1}')
    response = await post(upstreams)
    assert response.content_type == b"text/event-stream"
    assert [c async for c in response.chunks()] != []
    response.release()
    assert await read(upstreams) == (200, b'{"eof":1}')


async def test_chunks_arrive_as_they_are_written(make: Make) -> None:
    release_second = asyncio.Event()

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n"
        )
        await writer.drain()
        await release_second.wait()
        writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await writer.drain()

    _, upstreams = await make(answer)
    response = await post(upstreams)
    stream = response.chunks()
    assert await asyncio.wait_for(anext(stream), 5) == b"data: 1\n\n"  # before the rest exists
    release_second.set()
    assert [c async for c in stream] == [b"data: 2\n\n"]
    response.release()


async def test_interim_1xx_answers_are_skipped(make: Make) -> None:
    body = b'{"final":true}'
    _, upstreams = await make(
        raw(
            b"HTTP/1.1 100 Continue\r\nx-interim: 1\r\n\r\n"
            b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
    )
    response = await post(upstreams)
    assert response.status == 201
    assert (b"x-interim", b"1") not in response.headers
    assert await response.read_all() == body
    response.release()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_decoded(make: Make, encoding: str) -> None:
    payload = b'{"text":"' + b"hello " * 5000 + b'"}'
    packed = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
    header = f"content-encoding: {encoding}\r\n".encode()
    _, upstreams = await make(
        json_answer(packed, extra=header),
        raw(chunked([packed[:10], packed[10:200], packed[200:]], headers=header)),
    )
    response = await post(upstreams)
    assert await response.read_all() == payload
    response.release()
    response = await post(upstreams)
    assert b"".join([c async for c in response.chunks()]) == payload
    response.release()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (json_answer(b"not gzip at all", extra=b"content-encoding: gzip\r\n"), "compressed"),
        (json_answer(gzip.compress(b"x" * 1000)[:-12], extra=b"content-encoding: gzip\r\n"),
         "truncated compressed"),
        (json_answer(b"xx", extra=b"content-encoding: br\r\n"), "not asked for"),
        (raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", close=True), "closed"),
        (raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"), "invalid HTTP"),
        (raw(b"SMTP ready\r\n\r\n"), "invalid HTTP"),
        (raw(b"HTTP/1.1 200 OK\r\n", close=True), "closed"),
        (raw(b"", close=True), "closed"),
    ],
    ids=["bad-gzip", "truncated-gzip", "brotli", "short-body", "bad-chunk", "not-http",
         "cut-in-headers", "closed-at-once"],
)  # fmt: skip
async def test_broken_answers_are_a_clear_502(make: Make, answer: Answer, why: str) -> None:
    _, upstreams = await make(answer, json_answer())
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    assert caught.value.kind is UPSTREAM_UNREACHABLE
    assert "'up'" in caught.value.message
    assert why in caught.value.message
    # The broken connection is gone; the next request gets a good one.
    assert await read(upstreams) == (200, b'{"ok":true}')


async def test_an_oversized_answer_is_refused(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "MAX_RESPONSE_BYTES", 1000)
    _, upstreams = await make(raw(chunked([b"x" * 600, b"y" * 600])))
    with pytest.raises(GatewayError, match="more than 1000 bytes"):
        await read(upstreams)


async def test_a_gzip_bomb_is_refused_in_bounded_steps(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_RESPONSE_BYTES", 4 << 20)
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB from about 64 KiB
    _, upstreams = await make(json_answer(bomb, extra=b"content-encoding: gzip\r\n"))
    with pytest.raises(GatewayError, match="more than"):
        await read(upstreams)


# -- connections -------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(make: Make) -> None:
    server, upstreams = await make(json_answer())
    for _ in range(5):
        assert (await read(upstreams))[0] == 200
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [0] * 5


async def test_connection_close_answers_are_not_reused(make: Make) -> None:
    server, upstreams = await make(json_answer(extra=b"connection: close\r\n"))
    for _ in range(3):
        assert (await read(upstreams))[0] == 200
    assert server.connections == 3


async def test_bytes_after_the_answer_spoil_the_connection(
    make: Make,
) -> None:
    body = b'{"ok":true}'
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n" + body
    server, upstreams = await make(raw(answer + b"HTTP/1.1 200 OK\r\n"), json_answer())
    assert await read(upstreams) == (200, body)  # the answer itself was fine
    assert await read(upstreams) == (200, body)
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_not_used(
    make: Make,
) -> None:
    async def answer_then_close(request: Request, writer: asyncio.StreamWriter) -> None:
        await json_answer()(request, writer)
        await asyncio.sleep(0.05)
        writer.close()  # the server's keep-alive timeout, after the answer

    server, upstreams = await make(answer_then_close, json_answer())
    assert (await read(upstreams))[0] == 200
    await settle(lambda: upstreams.open_connections("up") == 0)
    assert (await read(upstreams))[0] == 200
    assert server.connections == 2


async def test_idle_connections_expire(make: Make) -> None:
    server, upstreams = await make(json_answer(), idle_timeout_seconds=0.05)
    assert (await read(upstreams))[0] == 200
    await asyncio.sleep(0.1)
    assert (await read(upstreams))[0] == 200
    assert server.connections == 2
    await settle(lambda: server.closed_by_client == 1)


async def test_at_most_max_connections_are_open(make: Make) -> None:
    async def slow(request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.02)
        await json_answer()(request, writer)

    server, upstreams = await make(slow, max_connections=3)
    results = await asyncio.gather(*(read(upstreams) for _ in range(30)))
    assert all(status == 200 for status, _ in results)
    assert len(server.requests) == 30
    assert server.most_open == 3
    assert upstreams.open_connections("up") == 3


async def test_a_failed_connect_frees_its_slot_for_waiting_callers(
    make: Make,
) -> None:
    server, upstreams = await make(json_answer(), max_connections=1)
    port = server.port
    await server.stop()
    outcomes = await asyncio.gather(*(read(upstreams) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(o, GatewayError) for o in outcomes)
    assert upstreams.open_connections("up") == 0
    # The same port serving again: callers get through (no slot leaked).
    again = ScriptedServer([json_answer()])
    again.server = await asyncio.start_server(again._serve, "127.0.0.1", port)
    try:
        assert (await read(upstreams))[0] == 200
    finally:
        await again.stop()


async def test_refused_connection_is_unreachable(make: Make) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    upstreams = Upstreams({"up": config(port)})
    await upstreams.start()
    try:
        with pytest.raises(GatewayError) as caught:
            await read(upstreams)
    finally:
        await upstreams.close()
    assert caught.value.kind is UPSTREAM_UNREACHABLE
    assert "ConnectionRefusedError" in caught.value.message


async def test_connect_timeout(make: Make) -> None:
    # A listener whose accept queue is full: the kernel drops new SYNs, so a
    # connect hangs the way it does to a black-holed address.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
            fillers.append(filler)
        upstreams = Upstreams(
            {"up": config(listener.getsockname()[1], connect_timeout_seconds=0.3)}
        )
        await upstreams.start()
        started = asyncio.get_running_loop().time()
        with pytest.raises(GatewayError) as caught:
            await read(upstreams)
        await upstreams.close()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert caught.value.kind is UPSTREAM_TIMEOUT
    assert "did not accept a connection in time" in caught.value.message
    assert asyncio.get_running_loop().time() - started < 5
    assert upstreams.open_connections("up") == 0


# -- timeouts, back-pressure, cancellation ------------------------------------------


async def test_read_timeout_before_headers(make: Make) -> None:
    _, upstreams = await make(stall(), read_timeout_seconds=0.2)
    with pytest.raises(GatewayError) as caught:
        await post(upstreams)
    assert caught.value.kind is UPSTREAM_TIMEOUT
    assert upstreams.open_connections("up") == 0


async def test_read_timeout_is_silence_not_total_time(make: Make) -> None:
    async def trickle(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for _ in range(8):  # 0.8 s in all, never 0.3 s silent
            await asyncio.sleep(0.1)
            writer.write(b"9\r\ndata: x\n\n\r\n")
            await writer.drain()
        await asyncio.sleep(3600)  # then silence

    _, upstreams = await make(trickle, read_timeout_seconds=0.3)
    response = await post(upstreams)
    received: list[bytes] = []

    async def drain() -> None:
        async for chunk in response.chunks():
            received.append(chunk)

    with pytest.raises(GatewayError) as caught:
        await drain()
    response.release()
    assert caught.value.kind is UPSTREAM_TIMEOUT
    assert b"".join(received) == b"data: x\n\n" * 8


async def test_a_slow_reader_pauses_the_upstream_without_timing_out(
    make: Make,
) -> None:
    total = 16 << 20
    written = 0
    piece = b"x" * 65536

    async def flood(request: Request, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(total).encode() + b"\r\n\r\n")
        while written < total:
            writer.write(piece)
            written += len(piece)
            await writer.drain()

    _, upstreams = await make(flood, read_timeout_seconds=0.3)
    response = await post(upstreams)
    await asyncio.sleep(0.6)  # longer than the read timeout: the reader is slow, not the server
    # Reading paused: the client holds about HIGH_WATER_BYTES, the server is stuck
    # on socket buffers (a few MB on loopback), not on the whole 16 MiB.
    assert response._buffered <= HIGH_WATER_BYTES + (1 << 20)
    assert written < total
    size = 0
    async for chunk in response.chunks():
        size += len(chunk)
    response.release()
    assert size == total


async def test_releasing_early_closes_the_connection(make: Make) -> None:
    async def endless(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        while True:
            writer.write(b"9\r\ndata: x\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    server, upstreams = await make(endless, json_answer())
    response = await post(upstreams)
    await anext(response.chunks())
    response.release()
    assert upstreams.open_connections("up") == 0
    await settle(lambda: server.open_now == 0)  # the server saw the connection go
    assert (await read(upstreams))[0] == 200


async def test_a_cancelled_caller_leaves_nothing_open(make: Make) -> None:
    server, upstreams = await make(stall())
    task = asyncio.create_task(post(upstreams))
    await settle(lambda: len(server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert upstreams.open_connections("up") == 0
    await settle(lambda: server.open_now == 0)


async def test_a_cancelled_waiter_passes_its_connection_on(
    make: Make,
) -> None:
    gate = asyncio.Event()

    async def gated(request: Request, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        await json_answer()(request, writer)

    server, upstreams = await make(gated, max_connections=1)
    first = asyncio.create_task(read(upstreams))
    await settle(lambda: len(server.requests) == 1)
    waiting = [asyncio.create_task(read(upstreams)) for _ in range(3)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()
    gate.set()
    assert (await first)[0] == 200
    assert [(await w)[0] for w in waiting[1:]] == [200, 200]
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    assert server.connections == 1


# -- TLS -----------------------------------------------------------------------------


def _server_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.set_alpn_protocols(["h2", "http/1.1"])  # as a real API front end offers
    return context, pki.ca_cert


async def test_https_upstream_verified_against_the_trust_store(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context, ca = _server_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the system trust store, as OpenSSL reads it
    server, upstreams = await make(json_answer(), ssl_context=context)
    assert await read(upstreams) == (200, b'{"ok":true}')
    assert server.requests[0].header(b"host") == f"localhost:{server.port}".encode()
    assert server.alpn == ["http/1.1"]  # offered h2 first; the client speaks HTTP/1.1 only


async def test_https_upstream_with_an_untrusted_certificate_is_unreachable(
    make: Make, tmp_path: Path
) -> None:
    context, _ = _server_tls(tmp_path)
    server, upstreams = await make(json_answer(), ssl_context=context)
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    assert caught.value.kind is UPSTREAM_UNREACHABLE
    assert "SSLCertVerificationError" in caught.value.message
    assert server.requests == []
    assert upstreams.open_connections("up") == 0


async def test_a_connection_that_closes_on_its_way_to_a_waiter_is_not_used(make: Make) -> None:
    server, upstreams = await make(json_answer(), max_connections=1)
    pool = upstreams._pools["up"]
    assert (await read(upstreams))[0] == 200
    connection = pool._idle_connection()  # taken, as a request takes it: the one slot is used
    assert connection is not None
    waiting = asyncio.create_task(read(upstreams))
    await settle(lambda: len(pool.waiters) == 1)
    pool.put(connection)  # handed to the waiter ...
    connection.close()  # ... and closed (the upstream's FIN) before the waiter runs
    assert (await waiting)[0] == 200  # on a new connection, not a failed request
    assert server.connections == 2
    assert upstreams.open_connections("up") == 1
