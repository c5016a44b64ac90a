"""The upstream client's response parsing under any TCP chunking (hypothesis).

The answer's bytes are fed to the connection protocol in arbitrary pieces, the
way reads of a socket may cut them: the status, the headers and the body the
caller gets must not depend on where the cuts fall. No socket: the protocol
object is driven directly, with a transport that only records what is asked of it.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.gateway.config import UpstreamConfig
from keyrelay.gateway.core.errors import GatewayError
from keyrelay.gateway.http.upstream import UpstreamResponse, _Connection, _Pool


class RecordingTransport:
    def __init__(self) -> None:
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def feed(
    loop: asyncio.AbstractEventLoop, data: bytes, cuts: list[int]
) -> tuple[UpstreamResponse, _Connection, RecordingTransport]:
    pool = _Pool(UpstreamConfig(name="up", url="http://127.0.0.1:9"), loop)
    connection = _Connection(pool)
    transport = RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.counted = True
    pool.open = 1
    response = UpstreamResponse(pool, connection)
    connection.response = response
    response._start_timer()
    start = 0
    # A socket read is never empty: a cut at or past the end is no cut.
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        connection.data_received(data[start:cut])
        start = cut
    response._stop_timer()
    return response, connection, transport


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts if p) + b"0\r\n\r\n"


payloads = st.lists(st.binary(min_size=0, max_size=300), min_size=0, max_size=8)


@settings(max_examples=300, deadline=None)
@given(parts=payloads, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_chunked_body_is_the_same_under_any_cuts(
    loop: asyncio.AbstractEventLoop, parts: list[bytes], cuts: list[int]
) -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Request-Id: r1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(parts)
    )
    response, connection, transport = feed(loop, data, cuts)
    assert response.status == 200
    assert response.content_type == b"text/event-stream"
    assert (b"x-request-id", b"r1") in response.headers
    assert response._error is None
    assert response._complete
    assert b"".join(response._chunks) == b"".join(parts)
    # A complete keep-alive answer hands the connection back, open.
    assert connection.response is None
    assert not transport.closed
    assert connection.pool.idle == [connection]


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
    compress=st.booleans(),
)
def test_content_length_body_is_the_same_under_any_cuts(
    loop: asyncio.AbstractEventLoop, body: bytes, cuts: list[int], compress: bool
) -> None:
    wire = gzip.compress(body) if compress else body
    encoding = b"Content-Encoding: gzip\r\n" if compress else b""
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + encoding
        + b"Content-Length: "
        + str(len(wire)).encode()
        + b"\r\n\r\n"
        + wire
    )
    response, _, _ = feed(loop, data, cuts)
    assert response._error is None
    assert response._complete
    assert b"".join(response._chunks) == body


@settings(max_examples=200, deadline=None)
@given(
    parts=payloads.filter(any),
    cut_at=st.floats(min_value=0.0, max_value=0.999),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
def test_an_answer_cut_short_is_an_error_never_a_shorter_body(
    loop: asyncio.AbstractEventLoop, parts: list[bytes], cut_at: float, cuts: list[int]
) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(parts)
    truncated = data[: int(len(data) * cut_at)]
    response, connection, _ = feed(loop, truncated, cuts)
    assert not response._complete
    connection.connection_lost(None)  # the upstream went away
    assert response._error is not None
    assert "broke the connection" in response._error.message
    assert not response._complete


def start(loop: asyncio.AbstractEventLoop, head: bytes) -> tuple[UpstreamResponse, _Connection]:
    """An answer whose first bytes (``head``) have arrived; the rest is fed by the test."""
    response, connection, _ = feed(loop, head, [])
    response._start_timer()
    return response, connection


def has_blank_line(head: bytes) -> bool:
    return b"\n\n" in head


@settings(max_examples=200, deadline=None)
@given(
    parts=payloads,
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20),
    limit=st.integers(min_value=1, max_value=2000),
    stream=st.booleans(),
)
def test_peek_leaves_the_body_for_the_reader(
    loop: asyncio.AbstractEventLoop, parts: list[bytes], cuts: list[int], limit: int, stream: bool
) -> None:
    """What ``peek`` saw is the body's start, and the reader still gets all of it,
    whatever the reads: ``read_all`` or ``chunks``."""
    body = b"".join(parts)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    rest = chunked(parts)
    response, connection = start(loop, head)

    async def scenario() -> tuple[bytes, bytes]:
        peeking = asyncio.ensure_future(response.peek(limit, has_blank_line))
        offset = 0
        for cut in [*sorted({c for c in cuts if 0 < c < len(rest)}), len(rest)]:
            await asyncio.sleep(0)
            connection.data_received(rest[offset:cut])
            offset = cut
        seen = await peeking
        if stream:
            read = b"".join([chunk async for chunk in response.chunks()])
        else:
            read = await response.read_all()
        return seen, read

    seen, read = loop.run_until_complete(scenario())
    response._stop_timer()
    assert read == body
    assert body.startswith(seen)
    # It stopped at the first of: enough seen, more than the limit, the end.
    assert has_blank_line(seen) or len(seen) > limit or seen == body


def test_peek_returns_when_the_answer_breaks_and_the_reader_meets_the_error(
    loop: asyncio.AbstractEventLoop,
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    response, connection = start(loop, head + b"event: err")

    async def scenario() -> bytes:
        peeking = asyncio.ensure_future(response.peek(1000, has_blank_line))
        await asyncio.sleep(0)
        connection.connection_lost(None)  # the upstream went away mid-body
        return await peeking

    assert loop.run_until_complete(scenario()) == b"event: err"
    with pytest.raises(GatewayError, match="broke the connection"):
        loop.run_until_complete(response.read_all())


def test_peek_returns_once_enough_has_arrived_not_at_the_end(
    loop: asyncio.AbstractEventLoop,
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 30\r\n\r\n"
    response, connection = start(loop, head + b"event: a")

    async def scenario() -> tuple[bytes, bool, bool]:
        peeking = asyncio.ensure_future(response.peek(1000, has_blank_line))
        await asyncio.sleep(0)
        waited = not peeking.done()  # half an event: not enough yet
        connection.data_received(b"\n\n")  # a whole event; 20 bytes still to come
        await asyncio.sleep(0)
        return await asyncio.wait_for(peeking, 1), waited, response._complete

    seen, waited, complete = loop.run_until_complete(scenario())
    assert (seen, waited, complete) == (b"event: a\n\n", True, False)
    connection.data_received(b"x" * 20)
    assert loop.run_until_complete(response.read_all()) == b"event: a\n\n" + b"x" * 20
