"""Response transforms: JSON bodies and SSE streams mapped back to client names."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core.request_transform import Profile, transform_body
from keyrelay.gateway.core.response_transform import (
    StreamTransformer,
    error_type_of,
    first_event,
    first_event_error_type,
    inspect_response_json,
    transform_response_json,
)
from keyrelay.gateway.core.sse import SSEDecoder, encode_event
from keyrelay.gateway.core.tool_names import ToolNameTable
from keyrelay.gateway.core.usage import Usage
from tests.unit.gateway.gw_streams import (
    ServerToolUse,
    Text,
    ToolUse,
    chunked,
    message_events,
    message_json,
    one_byte_chunks,
    parse_stream,
    sse,
)

LONG_NAME = "ツール" * 8
LONG_ALIAS = "mcp_d39abf37454ef93a"


def table_for(*names: str) -> ToolNameTable:
    """The table transform_request builds for a request defining ``names``."""
    tools = [{"name": n, "input_schema": {"type": "object"}} for n in names]
    body = {"model": "m", "max_tokens": 1, "messages": [], "tools": tools}
    _, table, _ = transform_body(body, Profile(tool_prefix="mcp_"))
    assert table is not None
    return table


TABLE = table_for("get_weather", "mcp_x", LONG_NAME)


# -- JSON --------------------------------------------------------------------------


def test_json_tool_use_names_map_back() -> None:
    content: list[dict[str, Any]] = [
        {"type": "text", "text": 'I will call {"name": "mcp_get_weather"}'},
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "mcp_get_weather",
            "input": {"name": "mcp_get_weather", "city": "Paris"},
        },
        {"type": "tool_use", "id": "toolu_2", "name": "mcp_mcp_x", "input": {}},
        {"type": "tool_use", "id": "toolu_3", "name": LONG_ALIAS, "input": {}},
        {"type": "server_tool_use", "id": "srv", "name": "web_search", "input": {}},
    ]
    body = message_json(content)
    result = inspect_response_json(body, TABLE)
    out = json.loads(result.body)
    assert [b.get("name") for b in out["content"]] == [
        None,
        "get_weather",
        "mcp_x",
        LONG_NAME,
        "web_search",
    ]
    assert out["content"][0] == content[0]  # "name" in text untouched
    assert out["content"][1]["input"] == content[1]["input"]  # "name" in input untouched
    expected = json.loads(body)
    expected["content"] = out["content"]
    assert out == expected  # nothing else changed
    assert result.usage == Usage(2095, 503, 7, 11)
    assert result.model == "claude-sonnet-4-5-20250929"
    assert transform_response_json(body, TABLE) == result.body


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"error","error":{"type":"invalid_request_error","message":"mcp_get_weather"}}',
        b"not json at all",
        b"[1, 2]",
        b"",
        b'{"input_tokens": 12}',
        message_json([{"type": "text", "text": "no tools"}]),
        message_json([{"type": "tool_use", "id": "t", "name": "unprefixed", "input": {}}]),
        message_json([{"type": "tool_use", "id": "t", "name": 7, "input": {}}]),
        b'{"type":"message","content":"not a list"}',
    ],
)
def test_json_bodies_passed_unchanged_are_the_same_object(body: bytes) -> None:
    assert transform_response_json(body, TABLE) is body
    assert inspect_response_json(body, TABLE).body is body
    assert transform_response_json(body, None) is body


def test_json_error_body_is_not_read() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert inspect_response_json(body, None).usage is None


def test_json_usage_without_table() -> None:
    body = message_json([], usage={"input_tokens": 3, "output_tokens": None})
    result = inspect_response_json(body, None)
    assert result.body is body
    assert result.usage == Usage(input_tokens=3)


# -- SSE: realistic streams ------------------------------------------------------------

REALISTIC = message_events(
    [
        Text(["Let me check ", 'the "name" of ', "the weather."]),
        ToolUse("mcp_get_weather", ['{"name": "mcp_get', '_weather", "ci', 'ty": "Paris"}']),
        ToolUse("mcp_mcp_x", ["{}"], id="toolu_02"),
        ToolUse(LONG_ALIAS, ['{"q":', " 1}"], id="toolu_03"),
        ServerToolUse(),
        ToolUse("mcp_not_in_table", [], id="toolu_04"),
    ],
    start_usage={
        "input_tokens": 472,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2000,
        "output_tokens": 2,
    },
    delta_usages=[{"output_tokens": 40}, {"output_tokens": 89, "input_tokens": 472}],
)
REALISTIC_BYTES = b"".join(REALISTIC)


def run(transformer: StreamTransformer, chunks: Sequence[bytes]) -> bytes:
    """A whole upstream body: fed, then closed (a stream without message_stop, or
    with a last event cut short, then ends with the gateway's error event)."""
    return feed_all(transformer, chunks) + transformer.close()


def feed_all(transformer: StreamTransformer, chunks: Sequence[bytes]) -> bytes:
    """What goes out while a piece of a stream is fed (no end of the stream yet)."""
    return b"".join(transformer.feed(chunk) for chunk in chunks)


def tool_names_in(stream: bytes) -> list[str]:
    return [
        data["content_block"]["name"]
        for name, data in parse_stream(stream)
        if name == "content_block_start" and "name" in data["content_block"]
    ]


def test_realistic_stream_maps_tool_names_back() -> None:
    transformer = StreamTransformer(TABLE)
    out = run(transformer, [REALISTIC_BYTES])
    assert tool_names_in(out) == ["get_weather", "mcp_x", LONG_NAME, "web_search", "not_in_table"]
    # Every event other than a renamed tool_use start is byte-identical.
    decoder = SSEDecoder()
    out_events = [e.raw for e in decoder.feed(out) + decoder.close()]
    assert len(out_events) == len(REALISTIC)
    for before, after in zip(REALISTIC, out_events, strict=True):
        if b'"type":"tool_use"' in before and before.startswith(b"event: content_block_start"):
            assert before != after
            assert json.loads(after.split(b"data: ", 1)[1])["content_block"]["id"] in (
                before.decode()
            )
        else:
            assert before == after
    # The "name" keys inside partial_json and text are untouched.
    deltas = [d for n, d in parse_stream(out) if n == "content_block_delta"]
    assert deltas[1]["delta"] == {"type": "text_delta", "text": 'the "name" of '}
    assert deltas[3]["delta"]["partial_json"] == '{"name": "mcp_get'
    assert transformer.usage == Usage(472, 89, 100, 2000)
    assert transformer.usage_seen
    assert transformer.model == "claude-sonnet-4-5-20250929"
    assert not transformer.failed
    assert transformer.error is None


def test_renamed_event_keeps_everything_but_the_name() -> None:
    start = {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_9", "name": "mcp_mcp_x", "input": {}},
    }
    raw = (
        b"event: content_block_start\nid: 5\nretry: 10\n: comment\ndata: "
        + json.dumps(start).encode()
        + b"\n\n"
    )
    out = feed_all(StreamTransformer(TABLE), [raw])
    expected_data = {**start, "content_block": {**start["content_block"], "name": "mcp_x"}}  # type: ignore[dict-item]
    assert out == encode_event(
        "content_block_start", json.dumps(expected_data, separators=(",", ":")), "5", retry=10
    )


def test_without_table_the_stream_is_untouched_but_usage_is_read() -> None:
    transformer = StreamTransformer(None)
    out = run(transformer, [REALISTIC_BYTES])
    assert out == REALISTIC_BYTES
    assert tool_names_in(out)[0] == "mcp_get_weather"
    assert transformer.usage == Usage(472, 89, 100, 2000)


@pytest.mark.parametrize(
    "event",
    [
        # Not JSON, wrong shapes, other block types: forwarded as they are.
        b"event: content_block_start\ndata: {not json\n\n",
        b"event: content_block_start\n\n",
        b"event: content_block_start\ndata: []\n\n",
        b'event: content_block_start\ndata: {"type":"content_block_delta"}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start","content_block":1}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start",'
        b'"content_block":{"type":"tool_use","name":5}}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start",'
        b'"content_block":{"type":"text","text":"mcp_get_weather","name":"mcp_get_weather"}}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start",'
        b'"content_block":{"type":"tool_use","name":"unprefixed"}}\n\n',
        # A tool_use start under another event name is not the documented path.
        b'event: content_block_delta\ndata: {"type":"content_block_start",'
        b'"content_block":{"type":"tool_use","name":"mcp_get_weather"}}\n\n',
        b'event: message_start\ndata: {"type":"message_start","message":null}\n\n',
        b"event: message_delta\ndata: garbage\n\n",
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n',
        b": just a comment\n\n",
        b"\n",
    ],
)
def test_events_forwarded_unchanged(event: bytes) -> None:
    for table in (TABLE, None):
        transformer = StreamTransformer(table)
        assert feed_all(transformer, [event]) == event
        assert feed_all(StreamTransformer(table), one_byte_chunks(event)) == event
        assert not transformer.failed
        # The body ending there: only an upstream error event ends a stream cleanly.
        if event.startswith(b"event: error"):
            assert transformer.close() == b""
        else:
            assert transformer.close().startswith(ERROR_PREFIX)


def test_crlf_stream_is_handled() -> None:
    events = [
        sse("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
            line_end="\r\n"),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": "t", "name": "mcp_get_weather",
                              "input": {}}}, line_end="\r\n"),
        sse("ping", {"type": "ping"}, line_end="\r"),
        # The last blank line a CR at the very end: complete, released at close.
        sse("message_stop", {"type": "message_stop"}, line_end="\r"),
    ]  # fmt: skip
    data = b"".join(events)
    for chunks in ([data], one_byte_chunks(data)):
        transformer = StreamTransformer(TABLE)
        out = run(transformer, chunks)
        assert tool_names_in(out) == ["get_weather"]
        assert out.startswith(events[0])
        assert out.endswith(events[2] + events[3])
        assert transformer.usage == Usage(input_tokens=3)
        assert not transformer.failed


def test_final_event_without_blank_line_is_dropped_at_close() -> None:
    # A browser would not dispatch it either; forwarded, the client's parser would
    # glue whatever comes next (the error event) to it.
    transformer = StreamTransformer(TABLE)
    ping = sse("ping", {"type": "ping"})
    assert transformer.feed(ping + b'event: message_stop\ndata: {"type":"message_stop"}') == ping
    out = transformer.close()
    assert out.startswith(ERROR_PREFIX)
    assert b"message_stop" not in out
    assert transformer.failed
    assert transformer.error is not None
    assert "in the middle of an event" in transformer.error
    assert transformer.close() == b""


def test_untouched_events_go_out_as_soon_as_complete() -> None:
    transformer = StreamTransformer(TABLE)
    ping = sse("ping", {"type": "ping"})
    assert transformer.feed(ping[:-1]) == b""
    assert transformer.feed(ping[-1:]) == ping


# -- SSE: hostile upstreams -------------------------------------------------------------

ERROR_PREFIX = b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"'


def test_endless_line_ends_the_stream_with_an_error_event() -> None:
    transformer = StreamTransformer(TABLE, max_event_bytes=1000)
    ping = sse("ping", {"type": "ping"})
    out = transformer.feed(ping + b"data: " + b"x" * 500)
    assert out == ping
    out = transformer.feed(b"x" * 600)
    assert out.startswith(ERROR_PREFIX)
    assert out.endswith(b"\n\n")
    assert transformer.failed
    assert transformer.error is not None
    assert "1000 bytes" in transformer.error
    assert transformer.feed(ping) == b""
    assert transformer.close() == b""
    (event,) = parse_stream(out)
    assert event == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": transformer.error}},
    )


def test_oversized_event_after_good_ones_in_one_chunk() -> None:
    ping = sse("ping", {"type": "ping"})
    big = b"data: " + b"y" * 2000 + b"\n\n"
    transformer = StreamTransformer(None, max_event_bytes=1000)
    out = transformer.feed(ping + ping + big + ping)
    assert out.startswith(ping + ping + ERROR_PREFIX)


def test_invalid_utf8_ends_the_stream_after_the_good_events() -> None:
    ping = sse("ping", {"type": "ping"})
    bad = b'event: content_block_delta\ndata: {"text":"\xff"}\n\n'
    transformer = StreamTransformer(TABLE)
    out = transformer.feed(ping + "data: é\n\n".encode() + bad + ping)
    assert out.startswith(ping + "data: é\n\n".encode() + ERROR_PREFIX)
    assert b"not valid UTF-8" in out
    assert transformer.failed
    # Without validation the bytes pass through untouched.
    transformer = StreamTransformer(TABLE, validate_utf8=False)
    assert feed_all(transformer, [ping + bad + ping]) == ping + bad + ping


def test_invalid_utf8_in_the_final_unterminated_event() -> None:
    transformer = StreamTransformer(None)
    assert transformer.feed(b"data: ok\n\ndata: \xc3") == b"data: ok\n\n"
    assert transformer.close().startswith(ERROR_PREFIX)


def test_invalid_utf8_before_an_oversized_event() -> None:
    transformer = StreamTransformer(None, max_event_bytes=100)
    out = transformer.feed(b"data: \xff\n\n" + b"data: " + b"z" * 200)
    assert out.startswith(ERROR_PREFIX)
    assert b"not valid UTF-8" in out
    assert out.count(b"event: error") == 1


# -- properties ---------------------------------------------------------------------------

_text = st.text(max_size=15)
_partial = st.text(alphabet='{}[]":, namecp_\\é', max_size=12)
_tool_names = st.sampled_from(
    ["mcp_get_weather", "mcp_mcp_x", LONG_ALIAS, "mcp_unknown", "raw_name", "mcp_"]
)
_blocks = st.lists(
    st.one_of(
        st.lists(_text, max_size=4).map(Text),
        st.builds(ToolUse, _tool_names, st.lists(_partial, max_size=4)),
        st.just(ServerToolUse()),
    ),
    max_size=4,
)
_usage_numbers = st.one_of(st.none(), st.integers(0, 10**6), st.just("garbage"))


@st.composite
def realistic_streams(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    events = message_events(
        draw(_blocks),
        start_usage={"input_tokens": draw(_usage_numbers), "output_tokens": 1},
        delta_usages=draw(
            st.lists(st.fixed_dictionaries({"output_tokens": _usage_numbers}), max_size=3)
        ),
        ping=draw(st.booleans()),
    )
    size = sum(len(e) for e in events)
    cuts = draw(st.lists(st.integers(0, size), max_size=20))
    return events, cuts


@settings(max_examples=150, deadline=None)
@given(realistic_streams())
def test_realistic_streams_under_any_chunking(case: tuple[list[bytes], list[int]]) -> None:
    events, cuts = case
    data = b"".join(events)
    whole = StreamTransformer(TABLE)
    expected = run(whole, [data])
    split = StreamTransformer(TABLE)
    assert run(split, chunked(data, cuts)) == expected
    assert split.usage == whole.usage
    # Names mapped back through the table; everything else byte-identical.
    names = [TABLE.to_client(n) for n in tool_names_in(data)]
    assert tool_names_in(expected) == names
    decoder = SSEDecoder()
    out_events = [e.raw for e in decoder.feed(expected) + decoder.close()]
    assert len(out_events) == len(events)
    for before, after in zip(events, out_events, strict=True):
        if before != after:
            assert before.startswith(b"event: content_block_start")
            assert b'"type":"tool_use"' in before
    # Without a table the stream is forwarded exactly.
    assert run(StreamTransformer(None), chunked(data, cuts)) == data


@settings(max_examples=30, deadline=None)
@given(realistic_streams())
def test_realistic_streams_one_byte_at_a_time(case: tuple[list[bytes], list[int]]) -> None:
    data = b"".join(case[0])
    assert run(StreamTransformer(TABLE), one_byte_chunks(data)) == run(
        StreamTransformer(TABLE), [data]
    )


_soup_piece = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b"\n\n", b"data: ", b"event: ", b"content_block_start",
     b"message_delta", b"message_start", b'{"type":"content_block_start","content_block":'
     b'{"type":"tool_use","name":"mcp_mcp_x"}}', b'{"type":"message_delta","usage":'
     b'{"output_tokens":7}}', b"x", b"\xe2\x82\xac", b"\xe2\x82", b"\xff", b": c"]
)  # fmt: skip


@st.composite
def hostile_streams(draw: st.DrawFn) -> tuple[bytes, list[int], int, bool]:
    data = b"".join(draw(st.lists(_soup_piece, max_size=40)))
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=15))
    limit = draw(st.sampled_from([1 << 20, 200, 60, 5]))
    return data, cuts, limit, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(hostile_streams())
@example((b"data: x\r\r\n\n", [8], 1 << 20, True))
def test_output_is_independent_of_chunking(case: tuple[bytes, list[int], int, bool]) -> None:
    data, cuts, limit, with_table = case
    table = TABLE if with_table else None
    whole = StreamTransformer(table, limit)
    fed = feed_all(whole, [data])
    failed_while_fed = whole.failed
    expected = fed + whole.close()
    for chunks in (chunked(data, cuts), one_byte_chunks(data)):
        split = StreamTransformer(table, limit)
        assert feed_all(split, chunks) == fed
        assert split.close() == expected[len(fed) :]
        assert split.usage == whole.usage
        assert split.failed == whole.failed
    if not failed_while_fed and table is None:
        # Untouched events are byte-identical; only a last event cut short is held.
        assert data.startswith(fed)
    if whole.failed:
        assert expected.count(b"event: error") >= 1
        assert expected.endswith(b"\n\n")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ping", "content_block_delta", "x", ""]), _text),
                max_size=8), st.data())  # fmt: skip
def test_untouched_events_are_byte_identical(
    items: list[tuple[str, str]], draw: st.DataObject
) -> None:
    data = b"".join(encode_event(name or None, text) for name, text in items)
    cuts = draw.draw(st.lists(st.integers(0, max(len(data), 1)), max_size=10))
    assert feed_all(StreamTransformer(TABLE), chunked(data, cuts)) == data


def test_usage_events_with_unusual_shapes() -> None:
    start: dict[str, Any] = {
        "type": "message_start",
        "message": {"model": "m", "usage": {"input_tokens": 5, "output_tokens": 1}},
    }
    data = (
        encode_event("message_start", json.dumps(start), "1")
        + b"event:message_delta\r\ndata: "
        + b'{"type":"message_delta","usage":{"output_tokens":9}}\r\n\r\n'
    )
    transformer = StreamTransformer(None)
    assert feed_all(transformer, one_byte_chunks(data)) == data
    assert transformer.usage == Usage(input_tokens=5, output_tokens=9)
    assert transformer.model == "m"


def test_lone_surrogates_in_rewritten_json_do_not_crash() -> None:
    start = (
        '{"type":"content_block_start","index":0,"content_block":'
        '{"type":"tool_use","id":"toolu_\\ud800","name":"mcp_get_weather","input":{}}}'
    )
    out = feed_all(
        StreamTransformer(TABLE), [f"event: content_block_start\ndata: {start}\n\n".encode()]
    )
    (event,) = parse_stream(out)
    assert event[1]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_\ud800",
        "name": "get_weather",
        "input": {},
    }
    body = (
        b'{"type":"message","content":[{"type":"tool_use","id":"\\udfff",'
        b'"name":"mcp_get_weather","input":{}}]}'
    )
    assert json.loads(transform_response_json(body, TABLE))["content"][0] == {
        "type": "tool_use",
        "id": "\udfff",
        "name": "get_weather",
        "input": {},
    }


def test_one_chunk_of_many_events_reads_only_the_events_that_need_it() -> None:
    """A whole stream in one read (a fast upstream): the same output, usage and names
    as event by event, decoys in data and blank-line runs included."""
    decoys = [
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": 'a "message_start" and content_block_start'}}),
        b": comment with message_delta\n\n",
        b"\n\n\n",
        b"event: ping\ndata: {\"type\":\"ping\"}\n\n",
    ]  # fmt: skip
    events = message_events(
        [Text(["hel", "lo"]), ToolUse("mcp_get_weather", ['{"city":', '"Paris"}'])]
    )
    stream = b"".join(events[:2] + decoys + events[2:] + decoys)
    blocks = SSEDecoder().feed_raw(stream)
    for table in (TABLE, None):
        whole = StreamTransformer(table)
        one_by_one = StreamTransformer(table)
        assert run(whole, [stream]) == run(one_by_one, blocks)
        assert whole.usage == one_by_one.usage
        assert whole.usage_seen
    assert b'"name":"get_weather"' in run(StreamTransformer(TABLE), [stream])


# -- overloads that only the body tells (credential pools) ----------------------------

OVERLOADED_DATA = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
OVERLOADED = f"event: error\ndata: {OVERLOADED_DATA}\n\n".encode()
START = b'event: message_start\ndata: {"type":"message_start"}\n\n'


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (OVERLOADED_DATA, "overloaded_error"),
        (OVERLOADED_DATA.encode(), "overloaded_error"),
        (b'{"type":"error","error":{"type":"api_error"}}', "api_error"),
        (b'{"error":{"type":7}}', None),
        (b'{"error":"overloaded_error"}', None),
        (b'["error"]', None),
        (b"not json", None),
        (b"", None),
        (None, None),
        (b"[" * 100_000, None),  # nested beyond the parser
        (b'{"type":"error","error":{"type":"overloaded_error"', None),  # cut
    ],
)
def test_error_type_of(data: str | bytes | None, expected: str | None) -> None:
    assert error_type_of(data) == expected


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (OVERLOADED, "overloaded_error"),
        (OVERLOADED + START, "overloaded_error"),
        (OVERLOADED.replace(b"\n", b"\r\n"), "overloaded_error"),  # CRLF line ends
        (b"\xef\xbb\xbf" + OVERLOADED, "overloaded_error"),  # a BOM first
        (b": keep-alive\n\n" + OVERLOADED, "overloaded_error"),  # a comment first
        (b"data: {}\n\n" + OVERLOADED, "overloaded_error"),  # no event field: not an event
        (START + OVERLOADED, None),  # the stream had begun: not its first event
        (OVERLOADED[:-1], None),  # not whole yet
        (b"event: error\ndata: not json\n\n", None),
        (b'event: error\ndata: {"type":"error","error":{"type":"api_error"}}\n\n', "api_error"),
        (b"event: ping\ndata: {}\n\n", None),
        (b"", None),
        (b"\n\n\n\n", None),
    ],
)
def test_first_event_error_type(head: bytes, expected: str | None) -> None:
    assert first_event_error_type(head) == expected


@settings(max_examples=300)
@given(
    events=st.lists(
        st.sampled_from([START, OVERLOADED, b": c\n\n", b"event: ping\ndata: {}\n\n"]),
        min_size=1,
        max_size=4,
    ),
    crlf=st.booleans(),
    cut=st.integers(min_value=0, max_value=400),
)
def test_first_event_is_the_decoders_first_block_with_an_event(
    events: list[bytes], crlf: bool, cut: int
) -> None:
    """The shortcut for LF streams finds what the decoder finds, whole or cut."""
    stream = b"".join(events)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    head = stream[:cut]
    decoder = SSEDecoder(len(head) + 1)
    blocks = [b for b in decoder.feed_raw(head) if b"event" in b]
    assert first_event(head) == (blocks[0] if blocks else None)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([START, OVERLOADED], "overloaded_error"),
        ([START, OVERLOADED[:10], OVERLOADED[10:]], "overloaded_error"),
        ([START, b'event: error\ndata: {"error":{"type":"api_error"}}\n\n'], "api_error"),
        ([START], None),  # cut: the gateway ends it
        ([START, OVERLOADED[:-1]], None),  # the error event itself cut
        ([START, b'event: message_stop\ndata: {"type":"message_stop"}\n\n'], None),
        ([b"event: error\ndata: {" + b"x" * 5000 + b"}\n\n"], None),  # too large to keep
    ],
)
def test_upstream_error_type_of_a_stream(chunks: list[bytes], expected: str | None) -> None:
    transformer = StreamTransformer(None, 2048)
    for chunk in chunks:
        transformer.feed(chunk)
    transformer.close()
    assert transformer.upstream_error_type() == expected
