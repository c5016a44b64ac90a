"""A cut is never a success: an answer whose connection ends before its framing
says it is complete fails with ``UpstreamCut``, for every framing.

Framing x cut, each against a scripted loopback server that writes the head and
part of the body, waits until the client holds them, then ends the connection
with a FIN (``close``) or a RST (``SO_LINGER`` 0). The only end that is not a cut
is a FIN on a body framed "until the connection closes" (no Content-Length, not
chunked): HTTP/1.1 defines that as the body's end. A RST there, or any transport
error, is a cut.
"""

from __future__ import annotations

import asyncio

import pytest

from keyrelay.gateway.core.errors import UPSTREAM_UNREACHABLE, GatewayError
from keyrelay.gateway.http.upstream import UpstreamCut, UpstreamResponse, Upstreams
from tests.support.scripted_upstream import (
    Make,
    Request,
    json_answer,
    post,
    read,
    reset,
    settle,
)

HEADS = {
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: 1000\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"transfer-encoding: chunked\r\n\r\n",
    "eof": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n",
}
PARTIAL = b'{"id":"msg_01","content":[{"type":"text","text":"half'
# On the wire: a chunked body's part is one complete chunk (everything seen is
# well formed; only the last chunk is missing).
WIRE = {
    "content-length": PARTIAL,
    "chunked": f"{len(PARTIAL):x}\r\n".encode() + PARTIAL + b"\r\n",
    "eof": PARTIAL,
}
FRAMINGS = list(HEADS)
CUTS = ["reset", "fin"]


class CutServer:
    """Answers with the head and part of a body, then cuts when ``cut`` is set."""

    def __init__(self, framing: str, how: str, *, body: bool = True) -> None:
        self.data = HEADS[framing] + (WIRE[framing] if body else b"")
        self.how = how
        self.cut = asyncio.Event()

    async def __call__(self, request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(self.data)
        await writer.drain()
        await self.cut.wait()
        if self.how == "reset":
            reset(writer)
        else:
            writer.close()


async def _holding(upstreams: Upstreams, size: int) -> UpstreamResponse:
    """The answer, once the client holds ``size`` body bytes (the part before the cut)."""
    response = await post(upstreams)
    await settle(lambda: response._buffered >= size)
    return response


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_cut_body_read_whole_is_an_error(make: Make, framing: str, how: str) -> None:
    answer = CutServer(framing, how)
    server, upstreams = await make(answer, json_answer())
    response = await _holding(upstreams, len(PARTIAL))
    assert response.status == 200
    answer.cut.set()
    try:
        if framing == "eof" and how == "fin":
            # The one legitimate end: a FIN on a body framed by the connection's end.
            assert await response.read_all() == PARTIAL
            return
        with pytest.raises(UpstreamCut) as caught:
            await response.read_all()
    finally:
        response.release()
    error = caught.value
    assert isinstance(error, GatewayError)  # callers that catch GatewayError still do
    assert error.kind is UPSTREAM_UNREACHABLE
    assert error.framing == framing
    assert "'up'" in error.message
    assert "broke the connection" in error.message
    assert framing in error.message
    # Nothing is left behind, and the next request gets a good connection.
    assert upstreams.open_connections("up") == 0
    assert await read(upstreams) == (200, b'{"ok":true}')
    assert server.connections == 2


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_cut_stream_yields_what_came_then_raises(
    make: Make, framing: str, how: str
) -> None:
    """What a streaming caller sees: the bytes before the cut, then ``UpstreamCut``
    raised by the iterator (the caller can catch it mid-body)."""
    answer = CutServer(framing, how)
    _, upstreams = await make(answer)
    response = await _holding(upstreams, len(PARTIAL))
    received: list[bytes] = []
    chunks = response.chunks()
    received.append(await anext(chunks))
    answer.cut.set()
    try:
        if framing == "eof" and how == "fin":
            received += [c async for c in chunks]
            assert b"".join(received) == PARTIAL
            return
        with pytest.raises(UpstreamCut) as caught:
            received += [chunk async for chunk in chunks]
    finally:
        response.release()
    assert b"".join(received) == PARTIAL
    assert caught.value.framing == framing
    assert upstreams.open_connections("up") == 0


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_cut_before_the_first_body_byte_is_an_error(
    make: Make, framing: str, how: str
) -> None:
    answer = CutServer(framing, how, body=False)
    _, upstreams = await make(answer)
    response = await post(upstreams)
    answer.cut.set()
    try:
        with pytest.raises(UpstreamCut):
            await response.read_all()
    finally:
        response.release()


async def test_a_reset_after_the_last_chunk_is_no_cut(make: Make) -> None:
    """The framing said the answer was complete before the RST: it is a success."""
    cut = asyncio.Event()

    async def complete_then_reset(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(HEADS["chunked"] + WIRE["chunked"] + b"0\r\n\r\n")
        await writer.drain()
        await cut.wait()
        reset(writer)

    _, upstreams = await make(complete_then_reset)
    response = await post(upstreams)
    assert await response.read_all() == PARTIAL
    response.release()
    cut.set()
    await settle(lambda: upstreams.open_connections("up") == 0)
