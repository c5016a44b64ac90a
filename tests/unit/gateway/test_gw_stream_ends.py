"""How a stream ends: a cut is never a success, a partial event never goes out.

``StreamTransformer.close()`` is the end the HTTP framing called complete,
``abort(message)`` an upstream that broke. For any cut position and any
chunking, what the client gets is a prefix of the upstream's whole events and
then exactly one ``error`` event; only a stream that reached ``message_stop``
(or ended with the upstream's own ``error`` event) ends without one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core.request_transform import Profile, transform_body
from keyrelay.gateway.core.response_transform import StreamTransformer
from keyrelay.gateway.core.sse import SSEDecoder, event_type, split_blocks
from keyrelay.gateway.core.tool_names import ToolNameTable
from tests.unit.gateway.gw_streams import (
    Text,
    ToolUse,
    chunked,
    message_events,
    one_byte_chunks,
    sse,
)


def table_for(*names: str) -> ToolNameTable:
    tools = [{"name": n, "input_schema": {"type": "object"}} for n in names]
    body = {"model": "m", "max_tokens": 1, "messages": [], "tools": tools}
    _, table, _ = transform_body(body, Profile(tool_prefix="mcp_"))
    assert table is not None
    return table


TABLE = table_for("get_weather")
EVENTS = message_events(
    [Text(["Hel", "lo, ", "wörld"]), ToolUse("mcp_get_weather", ['{"city":', ' "Paris"}'])]
)
STREAM = b"".join(EVENTS)
ENDS = [0]
for _event in EVENTS:
    ENDS.append(ENDS[-1] + len(_event))  # ENDS[i]: where event i ends (ENDS[0] = 0)


def feed_all(transformer: StreamTransformer, chunks: Sequence[bytes]) -> bytes:
    return b"".join(transformer.feed(chunk) for chunk in chunks)


def whole_blocks(out: bytes) -> list[bytes]:
    """The client's view: ``out`` cut into events; it must end on an event boundary."""
    decoder = SSEDecoder()
    blocks = decoder.feed_raw(out)
    assert decoder.buffered == 0, f"a partial event went out: {out[-120:]!r}"
    return blocks


def assert_error_event(block: bytes, fragment: str) -> None:
    assert event_type(block) == b"error"
    data = json.loads(block.split(b"data: ", 1)[1])
    assert data["type"] == "error"
    assert data["error"]["type"] == "api_error"
    assert fragment in data["error"]["message"]


@st.composite
def cuts(draw: st.DrawFn) -> tuple[int, list[int], str, bool]:
    at = draw(st.integers(0, len(STREAM)))
    pieces = draw(st.lists(st.integers(0, max(at, 1)), max_size=12))
    return at, pieces, draw(st.sampled_from(["close", "abort"])), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(cuts())
@example((len(STREAM), [], "close", True))  # the whole stream: no error event
@example((len(STREAM), [], "abort", False))  # the whole stream, then a broken connection
@example((ENDS[3], [], "close", False))  # at an event boundary, before message_stop
@example((ENDS[3] + 1, [], "close", False))  # one byte into the next event
@example((len(STREAM) - 1, [], "close", False))  # message_stop's last LF missing
def test_for_any_cut_the_output_is_whole_events_then_exactly_one_error_event(
    case: tuple[int, list[int], str, bool],
) -> None:
    at, pieces, end, with_table = case
    table = TABLE if with_table else None
    # What the whole stream gives, event by event (names mapped back with a table).
    reference = StreamTransformer(table)
    expected = whole_blocks(feed_all(reference, [STREAM]) + reference.close())
    assert not reference.failed
    assert len(expected) == len(EVENTS)

    transformer = StreamTransformer(table)
    out = feed_all(transformer, chunked(STREAM[:at], pieces))
    out += transformer.close() if end == "close" else transformer.abort("the upstream broke")
    blocks = whole_blocks(out)
    complete = sum(1 for e in ENDS[1:] if e <= at)  # events wholly before the cut
    if end == "close" and at == len(STREAM):
        assert blocks == expected
        assert not transformer.failed
        return
    *forwarded, last = blocks
    assert forwarded == expected[:complete]
    assert transformer.failed
    assert [event_type(b) for b in blocks].count(b"error") == 1
    if end == "abort":
        assert_error_event(last, "the upstream broke")
    else:
        fragment = "before message_stop" if at in ENDS else "in the middle of an event"
        assert_error_event(last, fragment)
    # Nothing more comes out after the end.
    assert transformer.close() == b""
    assert transformer.abort("again") == b""
    assert transformer.feed(STREAM) == b""


@pytest.mark.parametrize("chunks", [[STREAM], one_byte_chunks(STREAM)], ids=["whole", "bytes"])
def test_a_stream_that_reached_message_stop_ends_cleanly(chunks: list[bytes]) -> None:
    transformer = StreamTransformer(None)
    assert feed_all(transformer, chunks) + transformer.close() == STREAM
    assert not transformer.failed
    assert transformer.error is None


def test_an_upstream_error_event_is_a_clean_end_of_the_stream() -> None:
    error = sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                       "message": "Overloaded"}})  # fmt: skip
    data = EVENTS[0] + EVENTS[1] + error
    for chunks in ([data], one_byte_chunks(data)):
        transformer = StreamTransformer(None)
        assert feed_all(transformer, chunks) + transformer.close() == data
        assert not transformer.failed
    # Not when other events follow it: then the stream was cut after them.
    transformer = StreamTransformer(None)
    out = feed_all(transformer, [data + EVENTS[2]]) + transformer.close()
    assert out.startswith(data + EVENTS[2])
    assert_error_event(whole_blocks(out)[-1], "before message_stop")


def test_a_long_upstream_error_event_ending_a_large_read() -> None:
    error = sse("error", {"type": "error", "error": {"type": "api_error", "message": "x" * 1500}})
    data = b"".join(EVENTS[:-2]) * 20 + error
    transformer = StreamTransformer(None)
    assert feed_all(transformer, [data]) + transformer.close() == data


def test_events_after_message_stop_do_not_make_it_a_cut() -> None:
    data = STREAM + b": keep-alive\n\n"
    transformer = StreamTransformer(TABLE)
    out = feed_all(transformer, [data]) + transformer.close()
    assert out.endswith(EVENTS[-1] + b": keep-alive\n\n")
    assert not transformer.failed


def test_an_empty_body_is_a_cut() -> None:
    transformer = StreamTransformer(None)
    (block,) = whole_blocks(transformer.close())
    assert_error_event(block, "before message_stop")


def test_a_comment_only_body_is_a_cut() -> None:
    transformer = StreamTransformer(None)
    out = feed_all(transformer, [b": ping\n\n"]) + transformer.close()
    blocks = whole_blocks(out)
    assert blocks[0] == b": ping\n\n"
    assert_error_event(blocks[1], "before message_stop")


def test_abort_drops_the_event_in_progress() -> None:
    transformer = StreamTransformer(TABLE)
    half = EVENTS[2][: len(EVENTS[2]) // 2]
    out = feed_all(transformer, [EVENTS[0], EVENTS[1], half])
    assert out == EVENTS[0] + EVENTS[1]
    end = transformer.abort("the upstream 'default' broke the connection")
    (block,) = whole_blocks(end)
    assert_error_event(block, "broke the connection")
    assert transformer.error == "the upstream 'default' broke the connection"


def test_an_error_event_of_the_transformer_is_the_only_one() -> None:
    # The transformer ended the stream itself (an event over the limit): a cut or
    # the end of the body afterwards adds nothing.
    transformer = StreamTransformer(None, max_event_bytes=100)
    out = feed_all(transformer, [EVENTS[0][:10], b"data: " + b"x" * 200])
    assert [event_type(b) for b in whole_blocks(out)] == [b"error"]
    assert transformer.failed
    assert transformer.abort("the upstream broke") == b""
    assert transformer.close() == b""


def complete(block: bytes) -> bool:
    """Whether ``block`` ends with its blank line: more bytes after it leave it whole."""
    return SSEDecoder().feed_raw(block + b"x") == [block]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\r\n", b":c", b"event: e"]), max_size=12),
    st.lists(st.integers(0, 80), max_size=8),
)
@example([b"data: x", b"\r", b"\r"], [])  # the blank line a CR at the very end: held, whole
@example([b"data: x", b"\n"], [])  # no blank line: dropped
def test_close_whole_keeps_exactly_the_complete_blocks(
    parts: list[bytes], pieces: list[int]
) -> None:
    data = b"".join(parts)
    decoder = SSEDecoder()
    fed: list[bytes] = []
    for chunk in chunked(data, pieces):
        fed += decoder.feed_raw(chunk)
    last, dropped = decoder.close_whole()
    blocks = split_blocks(data)
    if blocks and not complete(blocks[-1]):
        assert (fed + last, dropped) == (blocks[:-1], len(blocks[-1]))
    else:
        assert (fed + last, dropped) == (blocks, 0)
    assert decoder.close_whole() == ([], 0)
