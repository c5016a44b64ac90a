"""The SSE decoder/encoder: every input fed whole, one byte at a time, and with
trailing data (h11's test_io style), plus properties against a reference parser."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core.sse import (
    EventTooLarge,
    SSEDecoder,
    SSEError,
    SSEEvent,
    encode_event,
    event_type,
    parse_event,
    split_blocks,
)
from tests.unit.gateway.gw_streams import chunked, one_byte_chunks

# -- helpers ------------------------------------------------------------------


def decode_chunks(chunks: Iterable[bytes], max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    decoder = SSEDecoder(max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def decode_all_ways(data: bytes) -> list[SSEEvent]:
    """Decode ``data`` whole and one byte at a time; both must agree."""
    whole = decode_chunks([data])
    assert decode_chunks(one_byte_chunks(data)) == whole
    assert b"".join(e.raw for e in whole) == data
    return whole


TRAILING = b"event: next\ndata: not yet"


def assert_with_trailing(data: bytes, expected: list[SSEEvent]) -> None:
    """Events complete in ``data`` come out before the trailing partial event,
    and the trailing bytes are still buffered."""
    decoder = SSEDecoder()
    assert decoder.feed(data + TRAILING) == expected
    assert decoder.buffered == len(TRAILING)
    decoder = SSEDecoder()
    got: list[SSEEvent] = []
    for chunk in one_byte_chunks(data + TRAILING):
        got += decoder.feed(chunk)
    assert got == expected


def ev(
    raw: bytes,
    *,
    event: str | None = None,
    data: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> SSEEvent:
    return SSEEvent(event=event, data=data, id=id, retry=retry, raw=raw)


# -- table: whole input, one byte at a time, with trailing data ---------------

CASES: list[tuple[str, bytes, list[SSEEvent]]] = [
    (
        "lf",
        b"event: ping\ndata: {}\n\n",
        [ev(b"event: ping\ndata: {}\n\n", event="ping", data="{}")],
    ),
    (
        "crlf",
        b"event: ping\r\ndata: {}\r\n\r\n",
        [ev(b"event: ping\r\ndata: {}\r\n\r\n", event="ping", data="{}")],
    ),
    (
        "cr",
        b"event: ping\rdata: {}\r\r",
        [ev(b"event: ping\rdata: {}\r\r", event="ping", data="{}")],
    ),
    (
        "mixed line ends",
        b"event: a\r\ndata: 1\rdata: 2\n\r\nevent: b\ndata: 3\r\r\n",
        [
            ev(b"event: a\r\ndata: 1\rdata: 2\n\r\n", event="a", data="1\n2"),
            ev(b"event: b\ndata: 3\r\r\n", event="b", data="3"),
        ],
    ),
    (
        "two events",
        b"data: 1\n\ndata: 2\n\n",
        [ev(b"data: 1\n\n", data="1"), ev(b"data: 2\n\n", data="2")],
    ),
    (
        "comments",
        b": keep-alive\n\n:\nevent: x\n: inside\ndata: y\n\n",
        [
            ev(b": keep-alive\n\n"),
            ev(b":\nevent: x\n: inside\ndata: y\n\n", event="x", data="y"),
        ],
    ),
    (
        "multi-line data",
        b"data: line one\ndata: line two\ndata:\ndata: four\n\n",
        [
            ev(
                b"data: line one\ndata: line two\ndata:\ndata: four\n\n",
                data="line one\nline two\n\nfour",
            )
        ],
    ),
    (
        "id and retry",
        b"id: 42\nretry: 1500\ndata: x\n\n",
        [ev(b"id: 42\nretry: 1500\ndata: x\n\n", id="42", retry=1500, data="x")],
    ),
    (
        "bad retry and NUL id are ignored",
        b"retry: 15s\nid: a\x00b\ndata: x\n\n",
        [ev(b"retry: 15s\nid: a\x00b\ndata: x\n\n", data="x")],
    ),
    (
        "empty id resets",
        b"id:\n\n",
        [ev(b"id:\n\n", id="")],
    ),
    (
        "fields without colon",
        b"data\nevent\n\n",
        [ev(b"data\nevent\n\n", data="", event="")],
    ),
    (
        "only one leading space is removed",
        b"data:x\ndata: x\ndata:  x\nevent:\tname\n\n",
        [ev(b"data:x\ndata: x\ndata:  x\nevent:\tname\n\n", data="x\nx\n x", event="\tname")],
    ),
    (
        "colon in value",
        b"data: a: b\n\n",
        [ev(b"data: a: b\n\n", data="a: b")],
    ),
    (
        "unknown fields and case-sensitive names are ignored",
        b"Data: no\nfoo: bar\nevent: e\n\n",
        [ev(b"Data: no\nfoo: bar\nevent: e\n\n", event="e")],
    ),
    (
        "last event field wins",
        b"event: one\nevent: two\ndata: x\n\n",
        [ev(b"event: one\nevent: two\ndata: x\n\n", event="two", data="x")],
    ),
    (
        "blank lines are empty blocks",
        b"\n\r\n\rdata: x\n\n\n",
        [
            ev(b"\n"),
            ev(b"\r\n"),
            ev(b"\r"),
            ev(b"data: x\n\n", data="x"),
            ev(b"\n"),
        ],
    ),
    (
        "multi-byte utf-8",
        "data: héllo wörld € 𝄞\n\n".encode(),
        [ev("data: héllo wörld € 𝄞\n\n".encode(), data="héllo wörld € 𝄞")],
    ),
    (
        "byte-order mark at the start",
        b"\xef\xbb\xbfevent: x\ndata: y\n\n",
        [ev(b"\xef\xbb\xbfevent: x\ndata: y\n\n", event="x", data="y")],
    ),
    (
        "invalid utf-8 is replaced in fields, kept in raw",
        b"data: a\xffb\xe2\x82\ndata: \xc3\n\n",
        [ev(b"data: a\xffb\xe2\x82\ndata: \xc3\n\n", data="a\ufffdb\ufffd\n\ufffd")],
    ),
    (
        "NUL and other controls in data",
        b"data: a\x00b\x0bc\x1cd\n\n",
        [ev(b"data: a\x00b\x0bc\x1cd\n\n", data="a\x00b\x0bc\x1cd")],
    ),
    (
        "unicode line separators are not line ends",
        "data: a\u2028b\x85c\n\n".encode(),
        [ev("data: a\u2028b\x85c\n\n".encode(), data="a\u2028b\x85c")],
    ),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decoder_table(data: bytes, expected: list[SSEEvent]) -> None:
    assert decode_all_ways(data) == expected
    assert_with_trailing(data, expected)


FINAL_WITHOUT_BLANK_LINE = [
    (b"data: x", [ev(b"data: x", data="x")]),
    (b"data: x\n", [ev(b"data: x\n", data="x")]),
    (b"data: x\r\n", [ev(b"data: x\r\n", data="x")]),
    (
        b"data: 1\n\nevent: e\ndata: 2",
        [ev(b"data: 1\n\n", data="1"), ev(b"event: e\ndata: 2", event="e", data="2")],
    ),
    (b": only a comment", [ev(b": only a comment")]),
]


@pytest.mark.parametrize(("data", "expected"), FINAL_WITHOUT_BLANK_LINE)
def test_final_event_without_blank_line_comes_at_close(
    data: bytes, expected: list[SSEEvent]
) -> None:
    assert decode_all_ways(data) == expected
    decoder = SSEDecoder()
    assert decoder.feed(data) == expected[:-1]
    assert decoder.close() == expected[-1:]
    assert decoder.close() == []


def test_crlf_split_across_chunks() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\n\r") == []  # the blank line could still be a CRLF
    assert decoder.feed(b"\n") == [ev(b"data: x\r\n\r\n", data="x")]
    assert decoder.feed(b"data: y\r\n\r") == []
    assert decoder.feed(b"\ndata: z\r\r") == [ev(b"data: y\r\n\r\n", data="y")]
    # A lone CR ending the blank line is only known once the next byte arrives.
    assert decoder.feed(b"e") == [ev(b"data: z\r\r", data="z")]
    assert decoder.close() == [ev(b"e", data=None)]


def test_held_cr_released_at_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == []
    assert decoder.buffered == len(b"data: x\r\r")
    assert decoder.close() == [ev(b"data: x\r\r", data="x")]


def test_multibyte_character_split_across_chunks() -> None:
    data = "data: €𝄞\n\n".encode()
    for cut in range(1, len(data)):
        assert decode_chunks([data[:cut], data[cut:]]) == [ev(data, data="€𝄞")]


def test_empty_feeds_are_harmless() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [ev(b"data: x\n\n", data="x")]


# -- bounded memory ------------------------------------------------------------


def test_endless_line_raises_and_memory_stays_bounded() -> None:
    limit = 1000
    decoder = SSEDecoder(limit)
    chunk = b"a" * 97
    for _ in range(10):  # 970 bytes: still within the limit
        assert decoder.feed(chunk) == []
        assert decoder.buffered <= limit
    with pytest.raises(EventTooLarge) as info:
        decoder.feed(chunk)
    assert info.value.limit == limit
    assert info.value.complete == ()
    assert "1000 bytes" in str(info.value)


def test_endless_line_fed_one_byte_at_a_time() -> None:
    decoder = SSEDecoder(64)
    for _ in range(64):
        assert decoder.feed(b"x") == []
    assert decoder.buffered == 64
    with pytest.raises(EventTooLarge):
        decoder.feed(b"x")
    with pytest.raises(SSEError):
        decoder.feed(b"\n\n")


def test_oversized_event_in_one_chunk_keeps_earlier_events() -> None:
    small = b"data: ok\n\n"
    big = b"data: " + b"x" * 100 + b"\n\n"
    decoder = SSEDecoder(50)
    with pytest.raises(EventTooLarge) as info:
        decoder.feed(small + big + small)
    assert info.value.complete == (small,)
    assert info.value.events == (ev(small, data="ok"),)


def test_event_exactly_at_the_limit_passes() -> None:
    data = b"data: " + b"x" * 10 + b"\n\n"
    assert decode_chunks([data], max_event_bytes=len(data)) == [ev(data, data="x" * 10)]
    assert decode_chunks(one_byte_chunks(data), max_event_bytes=len(data)) == [
        ev(data, data="x" * 10)
    ]
    with pytest.raises(EventTooLarge):
        decode_chunks([data], max_event_bytes=len(data) - 1)
    with pytest.raises(EventTooLarge):
        decode_chunks(one_byte_chunks(data), max_event_bytes=len(data) - 1)


def test_held_cr_counts_toward_the_limit() -> None:
    data = b"data: x\r\r\n"
    with pytest.raises(EventTooLarge):
        decode_chunks([data[:-1], data[-1:]], max_event_bytes=len(data) - 1)


def test_feed_after_close_or_error_is_refused() -> None:
    decoder = SSEDecoder()
    decoder.close()
    with pytest.raises(SSEError, match="after close"):
        decoder.feed(b"data: x\n\n")
    decoder = SSEDecoder(4)
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: xxxx")
    with pytest.raises(SSEError):
        decoder.close()


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(0)


# -- feed_span / split_blocks ----------------------------------------------------


def test_feed_span_joins_complete_blocks() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_span(b"data: 1\n\ndata: 2\n\ndata: 3") == b"data: 1\n\ndata: 2\n\n"
    assert decoder.feed_span(b"\n") == b""
    assert decoder.feed_span(b"\ndata: 4\r\n\r") == b"data: 3\n\n"
    assert decoder.feed_span(b"\n") == b"data: 4\r\n\r\n"
    assert decoder.close_raw() == []


def test_feed_span_limits() -> None:
    decoder = SSEDecoder(20)
    with pytest.raises(EventTooLarge) as info:
        decoder.feed_span(b"data: 1\n\n" + b"data: " + b"x" * 30 + b"\n\ndata: 3\n\n")
    assert info.value.complete == (b"data: 1\n\n",)
    decoder = SSEDecoder(20)
    with pytest.raises(EventTooLarge) as info:
        decoder.feed_span(b"data: 1\n\n" + b"data: " + b"x" * 30)
    assert info.value.complete == (b"data: 1\n\n",)
    decoder = SSEDecoder(20)
    with pytest.raises(EventTooLarge) as info:
        decoder.feed_span(b"data: " + b"x" * 30)
    assert info.value.complete == ()


def test_split_blocks() -> None:
    assert split_blocks(b"") == []
    assert split_blocks(b"\n\rdata: x\r\r\n: c\r\r") == [b"\n", b"\r", b"data: x\r\r\n", b": c\r\r"]


# -- event_type ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"event: message_start\ndata: {}\n\n", b"message_start"),
        (b"event: message_start\r\ndata: {}\r\n\r\n", b"message_start"),
        (b"event: a\rdata: {}\r\r", b"a"),
        (b"data: {}\n\n", None),
        (b": comment\nevent: x\n\n", b"x"),
        (b"event:x\n\n", b"x"),
        (b"event:  x\n\n", b" x"),
        (b"event\n\n", b""),
        (b"event: a\nevent: b\n\n", b"b"),
        (b"event: a\nevent\n\n", b""),
        (b"event: a\neventual: b\n\n", b"a"),
        (b"events: a\n\n", None),
        (b"Event: a\n\n", None),
        (b"event: a", b"a"),
        (b"\xef\xbb\xbfevent: a\n\n", b"a"),
        (b"data: event: a\n\n", None),
    ],
)
def test_event_type(raw: bytes, name: bytes | None) -> None:
    assert event_type(raw) == name
    parsed = parse_event(raw).event
    assert (None if parsed is None else parsed.encode()) == name


# -- encoder ---------------------------------------------------------------------


def test_encode_event() -> None:
    assert encode_event("ping", '{"type":"ping"}') == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert encode_event(None, "") == b"data: \n\n"
    assert encode_event("e", "a\nb\r\nc\rd", "7", retry=10) == (
        b"event: e\nid: 7\nretry: 10\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    )
    assert encode_event("é", " lead") == "event: é\ndata:  lead\n\n".encode()


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("a\nb", "x"), {}),
        (("a\rb", "x"), {}),
        (("a", "x", "1\n2"), {}),
        (("a", "x", "1\x002"), {}),
        (("a", "x"), {"retry": -1}),
    ],
)
def test_encode_event_rejects_what_cannot_round_trip(
    args: tuple[str, ...], kwargs: dict[str, int]
) -> None:
    with pytest.raises(ValueError):
        encode_event(*args, **kwargs)  # type: ignore[arg-type]


# -- reference parser and properties ---------------------------------------------

_REF_LINE_END = re.compile(rb"\r\n|\r|\n")


def reference_decode(data: bytes) -> list[SSEEvent]:
    """A line-at-a-time WHATWG parser over the whole input (independent of the
    decoder's byte-pattern framing), with the decoder's documented decisions:
    every block is an event, the last one needs no blank line, BOM skipped."""
    events: list[SSEEvent] = []
    lines: list[bytes] = []
    block_start = 0
    pos = 0
    for match in _REF_LINE_END.finditer(data):
        line = data[pos : match.start()]
        pos = match.end()
        if line:
            lines.append(line)
        else:
            events.append(_reference_block(lines, data[block_start:pos]))
            lines = []
            block_start = pos
    if pos < len(data):
        lines.append(data[pos:])
    if block_start < len(data):
        events.append(_reference_block(lines, data[block_start:]))
    return events


def _reference_block(lines: list[bytes], raw: bytes) -> SSEEvent:
    event = event_id = None
    data: list[str] | None = None
    retry = None
    for i, line_bytes in enumerate(lines):
        line = line_bytes.decode("utf-8", "replace")
        if i == 0 and line.startswith("\ufeff"):
            line = line[1:]
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            value = value.removeprefix(" ")
        else:
            name, value = line, ""
        if name == "event":
            event = value
        elif name == "data":
            data = [*(data or []), value]
        elif name == "id" and "\0" not in value:
            event_id = value
        elif name == "retry" and re.fullmatch("[0-9]+", value):
            retry = int(value)
    return SSEEvent(
        event=event,
        data=None if data is None else "\n".join(data),
        id=event_id,
        retry=retry,
        raw=raw,
    )


_value_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"),
    max_size=12,
)
_line_end = st.sampled_from(["\n", "\r\n", "\r"])
_field_line = st.one_of(
    st.tuples(st.sampled_from(["data", "event", "id", "retry", "x", ""]), _value_text).map(
        lambda t: f"{t[0]}:{t[1]}" if t[0] else f":{t[1]}"
    ),
    st.tuples(st.sampled_from(["data", "event", "id", "retry"]), _value_text).map(
        lambda t: f"{t[0]}: {t[1]}"
    ),
    st.sampled_from(["data", "event", "id", "retry: 12", "retry: 1x", ": ping", ":"]),
)
_block = st.lists(st.tuples(_field_line, _line_end), max_size=5).flatmap(
    lambda lines: _line_end.map(lambda blank: "".join(line + end for line, end in lines) + blank)
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Streams of well-formed blocks with mixed line ends, maybe a final partial one."""
    blocks = draw(st.lists(_block, max_size=8))
    tail = draw(st.one_of(st.just(""), _field_line, _field_line.map(lambda s: s + "\r")))
    return ("".join(blocks) + tail).encode("utf-8")


# Byte soup: line ends, colons, field names, and broken multi-byte UTF-8.
_soup_piece = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b":", b" ", b"data", b"event", b"id", b"retry", b"7", b"x",
     b"\xe2\x82\xac", b"\xe2\x82", b"\xff", b"\xf0\x9d\x84\x9e", b"\xef\xbb\xbf", b"\x00"]
)  # fmt: skip
byte_soup = st.lists(_soup_piece, max_size=60).map(b"".join)
any_stream = st.one_of(sse_streams(), byte_soup, st.binary(max_size=80))


@st.composite
def stream_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = draw(any_stream)
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=12))
    return data, cuts


@settings(max_examples=400, deadline=None)
@given(stream_and_cuts())
@example((b"data: x\r\n\r\n", [8]))  # CRLF split between chunks
@example((b"data: x\r\r\n", [8, 9]))
@example(("data: é€𝄞\n\n".encode(), [7, 9, 11, 12]))  # multi-byte UTF-8 split
def test_any_chunking_gives_the_same_events(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    whole = decode_chunks([data])
    assert decode_chunks(chunked(data, cuts)) == whole
    assert b"".join(e.raw for e in whole) == data


@settings(max_examples=150, deadline=None)
@given(any_stream)
def test_one_byte_chunks_give_the_same_events(data: bytes) -> None:
    assert decode_chunks(one_byte_chunks(data)) == decode_chunks([data])


@settings(max_examples=400, deadline=None)
@given(any_stream)
@example(b"\r\r\n\n\r")
@example(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n")
@example(b"data: \xe2\n\n")
def test_decoder_matches_reference_parser(data: bytes) -> None:
    assert decode_chunks([data]) == reference_decode(data)


@settings(max_examples=300, deadline=None)
@given(stream_and_cuts())
def test_feed_span_and_split_blocks_agree_with_feed_raw(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    chunks = chunked(data, cuts)
    raw_decoder = SSEDecoder()
    span_decoder = SSEDecoder()
    blocks: list[bytes] = []
    spans: list[bytes] = []
    for chunk in chunks:
        expected = raw_decoder.feed_raw(chunk)
        span = span_decoder.feed_span(chunk)
        assert span == b"".join(expected)
        assert split_blocks(span) == expected
        blocks += expected
        spans.append(span)
    assert raw_decoder.close_raw() == span_decoder.close_raw()


@st.composite
def too_large_cases(draw: st.DrawFn) -> tuple[bytes, list[int], int]:
    data = draw(any_stream)
    limit = draw(st.integers(1, 40))
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=12))
    return data, cuts, limit


def _events_until_error(chunks: list[bytes], limit: int) -> tuple[list[SSEEvent], bool]:
    decoder = SSEDecoder(limit)
    events: list[SSEEvent] = []
    try:
        for chunk in chunks:
            events += decoder.feed(chunk)
            assert decoder.buffered <= limit
        events += decoder.close()
    except EventTooLarge as exc:
        return events + list(exc.events), True
    return events, False


@settings(max_examples=300, deadline=None)
@given(too_large_cases())
def test_limit_is_independent_of_chunking(case: tuple[bytes, list[int], int]) -> None:
    data, cuts, limit = case
    whole = _events_until_error([data], limit)
    assert _events_until_error(chunked(data, cuts), limit) == whole
    assert _events_until_error(one_byte_chunks(data), limit) == whole
    events, failed = whole
    assert all(len(e.raw) <= limit for e in events)
    expected = reference_decode(data)
    assert failed == any(len(e.raw) > limit for e in expected)


_name_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"),
    max_size=20,
)
_data_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    event=st.none() | _name_text,
    data=_data_text,
    event_id=st.none() | _name_text.filter(lambda s: "\0" not in s),
    retry=st.none() | st.integers(0, 10**9),
)
def test_encode_decode_round_trip(
    event: str | None, data: str, event_id: str | None, retry: int | None
) -> None:
    raw = encode_event(event, data, event_id, retry=retry)
    decoded = decode_all_ways(raw)
    assert decoded == [
        SSEEvent(
            event=event,
            data=re.sub(r"\r\n|\r", "\n", data),
            id=event_id,
            retry=retry,
            raw=raw,
        )
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.none() | _name_text, _data_text), max_size=6), st.data())
def test_encoded_streams_decode_under_any_chunking(
    items: list[tuple[str | None, str]], draw: st.DataObject
) -> None:
    stream = b"".join(encode_event(name, data) for name, data in items)
    cuts = draw.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=10))
    events = decode_chunks(chunked(stream, cuts))
    assert [(e.event, e.data) for e in events] == [
        (name, re.sub(r"\r\n|\r", "\n", data)) for name, data in items
    ]


# LF-only streams take feed_span's own path (no CR anywhere): cut anywhere, with a
# limit or none, it must give what feed_raw gives.
lf_streams = st.one_of(
    sse_streams().map(lambda b: b.replace(b"\r\n", b"\n").replace(b"\r", b"\n")),
    st.lists(st.sampled_from([b"\n", b"\n\n", b"data: x", b"event: e", b":", b"\xe2\x82"]),
             max_size=40).map(b"".join),
)  # fmt: skip


def _blocks_until_error(chunks: list[bytes], limit: int, *, span: bool) -> tuple[bytes, bool]:
    decoder = SSEDecoder(limit)
    out: list[bytes] = []
    try:
        for chunk in chunks:
            out.append(decoder.feed_span(chunk) if span else b"".join(decoder.feed_raw(chunk)))
        out += decoder.close_raw()
    except EventTooLarge as exc:
        return b"".join([*out, *exc.complete]), True
    return b"".join(out), False


@settings(max_examples=400, deadline=None)
@given(
    lf_streams,
    st.lists(st.integers(0, 200), max_size=12),
    st.one_of(st.just(1 << 20), st.integers(1, 30)),
)
def test_feed_span_on_lf_streams_agrees_with_feed_raw(
    data: bytes, cuts: list[int], limit: int
) -> None:
    chunks = chunked(data, cuts)
    expected = _blocks_until_error(chunks, limit, span=False)
    assert _blocks_until_error(chunks, limit, span=True) == expected
    assert _blocks_until_error(one_byte_chunks(data), limit, span=True) == expected
