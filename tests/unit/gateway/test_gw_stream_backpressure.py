"""Back-pressure of a streamed answer: ``UpstreamResponse.chunks`` bounds what it holds.

No socket: the connection protocol is driven directly with a transport that
records pause/resume, reads are fed only while it is not paused (as a paused
socket delivers nothing), and a consumer takes steps when the test says so.
Whatever the sizes of the reads and the consumer's pace:

- a step is everything waiting when that is at most ``STEP_BYTES``, else a
  part of it (pieces of one size: as many as fit in ``STEP_BYTES``, a larger
  piece alone), and the steps are exactly the body, in order;
- what the answer holds (the pieces not taken yet and the last three steps,
  which the caller may still be sending) is over ``HIGH_WATER_BYTES`` only
  while reading is paused, and never over it by more than one read;
- reading resumes once the caller has taken everything, so a stream never
  stalls with the socket paused and nothing to take.

And a step of whole events that nothing rewrites goes out as the same object.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.gateway.config import UpstreamConfig
from keyrelay.gateway.core.response_transform import StreamTransformer
from keyrelay.gateway.core.sse import SSEDecoder
from keyrelay.gateway.http.upstream import (
    HIGH_WATER_BYTES,
    STEP_BYTES,
    UpstreamResponse,
    _Connection,
    _Pool,
)

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
UVLOOP_READ = 256_000  # the most one read of uvloop's delivers


class RecordingTransport:
    def __init__(self) -> None:
        self.closed = False
        self.paused = False
        self.pauses = 0

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

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


class Stream:
    """One streamed answer, its body fed in reads of whole HTTP chunks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        pool = _Pool(UpstreamConfig(name="up", url="http://127.0.0.1:9"), loop)
        self.connection = _Connection(pool)
        self.transport = RecordingTransport()
        self.connection.connection_made(self.transport)  # type: ignore[arg-type]
        self.connection.counted = True
        pool.open = 1
        self.response = UpstreamResponse(pool, self.connection)
        self.connection.response = self.response
        self.connection.data_received(HEAD)
        self.body: AsyncGenerator[bytes, None] = self.response.chunks()
        self.sent = bytearray()  # every body byte fed
        self.taken = bytearray()  # every byte of every step taken
        self.steps: list[bytes] = []
        self.pieces = 0  # a running counter, so that every piece's bytes differ

    def read(self, sizes: list[int]) -> None:
        """One socket read holding one HTTP chunk per size."""
        assert not self.transport.paused, "a paused socket delivers nothing"
        wire = b""
        for size in sizes:
            self.pieces += 1
            piece = bytes([self.pieces % 251]) * size
            self.sent += piece
            wire += b"%x\r\n" % size + piece + b"\r\n"
        self.connection.data_received(wire)

    def take(self) -> bytes:
        step = self.loop.run_until_complete(asyncio.wait_for(self.body.__anext__(), 5))
        self.steps.append(step)
        self.taken += step
        return step

    @property
    def waiting(self) -> int:
        """Body bytes fed and not taken yet."""
        return len(self.sent) - len(self.taken)

    @property
    def held(self) -> int:
        """What the answer holds or its caller may: the bytes not taken, and the
        last three steps (the current one and the two the caller may still be
        writing out)."""
        return self.waiting + sum(len(s) for s in self.steps[-3:])


reads = st.lists(st.integers(1, 80_000), min_size=1, max_size=4).filter(
    lambda sizes: sum(sizes) <= UVLOOP_READ
)
actions = st.lists(st.one_of(st.tuples(st.just("read"), reads), st.just(("take", []))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(actions)
def test_what_a_stream_holds_stays_within_the_high_water_mark_and_one_read(
    loop: asyncio.AbstractEventLoop, script: list[tuple[str, list[int]]]
) -> None:
    stream = Stream(loop)
    largest_read = 0
    for action, sizes in script:
        if action == "read":
            if stream.transport.paused:
                continue  # the socket would deliver nothing
            stream.read(sizes)
            largest_read = max(largest_read, sum(sizes))
        elif stream.waiting:
            waiting = stream.waiting
            step = stream.take()
            assert 0 < len(step) <= waiting
            if waiting <= STEP_BYTES:
                assert len(step) == waiting  # no step smaller than needed
        # Above the high-water mark only while paused, and by at most one read.
        if stream.held > HIGH_WATER_BYTES:
            assert stream.transport.paused
        assert stream.held <= HIGH_WATER_BYTES + largest_read
    while stream.waiting:
        stream.take()
    assert stream.taken == stream.sent  # every byte, in order, none twice


def test_a_stalled_consumer_pauses_the_upstream(loop: asyncio.AbstractEventLoop) -> None:
    stream = Stream(loop)
    stream.read([4096] * 8)
    stream.take()  # the caller took one step and is still sending it
    while not stream.transport.paused:
        stream.read([60_000])
    assert HIGH_WATER_BYTES < stream.held <= HIGH_WATER_BYTES + 60_000
    # Taking steps without sending them faster: no resume while it holds that much.
    stream.take()
    stream.take()
    assert stream.transport.paused


def test_reading_resumes_when_the_caller_has_taken_everything(
    loop: asyncio.AbstractEventLoop,
) -> None:
    stream = Stream(loop)
    stream.read([200_000])  # one piece larger than a step: it comes whole
    stream.read([100_000])
    assert stream.transport.paused
    assert len(stream.take()) == 200_000
    assert len(stream.take()) == 100_000
    # Nothing left to take: the caller asks for more, and reading goes on, although
    # the steps it may still be sending are counted.
    pending = loop.create_task(stream.body.__anext__())
    loop.run_until_complete(asyncio.sleep(0))
    assert not stream.transport.paused
    stream.read([10])
    assert loop.run_until_complete(asyncio.wait_for(pending, 5)) == bytes([3]) * 10


@pytest.mark.parametrize("size", [150, 4096, 60_000])
def test_steps_join_pieces_of_one_size_up_to_the_step_size(
    loop: asyncio.AbstractEventLoop, size: int
) -> None:
    # One HTTP chunk per event (as the Messages API sends them), 4 KiB chunks, big ones.
    stream = Stream(loop)
    stream.read([size] * (250_000 // size))
    sizes = []
    while stream.waiting:
        sizes.append(len(stream.take()))
    assert sum(sizes) == 250_000 // size * size
    assert sizes[0] == max(1, STEP_BYTES // size) * size  # as many whole pieces as fit
    assert all(s <= max(STEP_BYTES, size) for s in sizes)


def test_a_big_piece_first_is_a_step_of_its_own(loop: asyncio.AbstractEventLoop) -> None:
    stream = Stream(loop)
    stream.read([60_000, 60_000, *[100] * 1000])
    assert len(stream.take()) == 60_000


# -- no copy of what goes out untouched -------------------------------------------

DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
)


def test_a_step_of_whole_untouched_events_goes_out_as_the_same_object() -> None:
    transformer = StreamTransformer(None)
    step = DELTA * 400
    assert transformer.feed(step) is step
    decoder = SSEDecoder()
    assert decoder.feed_span(step) is step


def test_a_step_completing_a_held_event_goes_out_with_its_head() -> None:
    decoder = SSEDecoder()
    head, rest = DELTA[:50], DELTA[50:] + DELTA * 10 + DELTA[:30]
    assert decoder.feed_span(head) == b""
    span = decoder.feed_span(rest)
    assert span == DELTA * 11
    assert decoder.buffered == 30
    assert decoder.feed_span(DELTA[30:]) == DELTA
