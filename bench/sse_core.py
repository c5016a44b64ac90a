"""Micro-benchmark of the SSE hot path: ns of CPU per streamed event.

A realistic 2000-event Messages API stream (message_start, a text block, ping,
a tool_use block with input_json_delta, message_delta, message_stop) is fed in
~4 KiB chunks to the bare decoder and to ``StreamTransformer`` with and without
a tool table (the last line: the same stream with CRLF line ends, which takes
the per-event framing path). Run: ``.venv/bin/python bench/sse_core.py``.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

from keyrelay.gateway.core.response_transform import StreamTransformer
from keyrelay.gateway.core.sse import SSEDecoder
from keyrelay.gateway.core.tool_names import ToolNameTable

EVENTS = 2000
CHUNK = 4096


def _event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def build_stream(events: int = EVENTS) -> bytes:
    """message_start, text block, ping, tool_use block, message_delta, message_stop."""
    head = [
        _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5-20250929",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 1234,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 1000,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _event("ping", {"type": "ping"}),
    ]
    tool_start = [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                    "name": "mcp_get_weather",
                    "input": {},
                },
            },
        ),
    ]
    tail = [
        _event("content_block_stop", {"type": "content_block_stop", "index": 1}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": events},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
    deltas = events - len(head) - len(tool_start) - len(tail)
    text_deltas = deltas * 3 // 4
    body: list[bytes] = []
    for i in range(text_deltas):
        body.append(
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f"token {i} of the answer, "},
                },
            )
        )
    body.extend(tool_start)
    for i in range(deltas - text_deltas):
        body.append(
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": f'"city{i}": "Par'},
                },
            )
        )
    return b"".join(head + body + tail)


def chunks_of(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def run_decoder_raw(chunks: list[bytes]) -> None:
    decoder = SSEDecoder()
    for chunk in chunks:
        decoder.feed_raw(chunk)
    decoder.close_raw()


def run_decoder_span(chunks: list[bytes]) -> None:
    decoder = SSEDecoder()
    for chunk in chunks:
        decoder.feed_span(chunk)
    decoder.close_raw()


def run_decoder_parsed(chunks: list[bytes]) -> None:
    decoder = SSEDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
    decoder.close()


def run_transformer(chunks: list[bytes], table: ToolNameTable | None) -> None:
    transformer = StreamTransformer(table)
    for chunk in chunks:
        transformer.feed(chunk)
    transformer.close()


def ns_per_event(fn: Callable[[], None], events: int) -> float:
    timer = timeit.Timer(fn)
    loops, _ = timer.autorange()
    best = min(timer.repeat(repeat=7, number=loops)) / loops
    return best / events * 1e9


def main() -> None:
    stream = build_stream()
    chunks = chunks_of(stream)
    crlf_chunks = chunks_of(stream.replace(b"\n", b"\r\n"))
    table = ToolNameTable("mcp_")
    table.add("get_weather")
    print(
        f"stream: {EVENTS} events, {len(stream)} bytes, {len(chunks)} chunks of {CHUNK} bytes "
        f"(mean event {len(stream) / EVENTS:.0f} bytes)"
    )
    cases: list[tuple[str, Callable[[], None]]] = [
        ("decoder.feed_raw (framing only)", lambda: run_decoder_raw(chunks)),
        ("decoder.feed_span (joined blocks)", lambda: run_decoder_span(chunks)),
        ("decoder.feed (parsed SSEEvent)", lambda: run_decoder_parsed(chunks)),
        ("StreamTransformer, no tool table", lambda: run_transformer(chunks, None)),
        ("StreamTransformer, with tool table", lambda: run_transformer(chunks, table)),
        ("  same, CRLF line ends (slow framing)", lambda: run_transformer(crlf_chunks, table)),
    ]
    for label, fn in cases:
        print(f"  {label:<38} {ns_per_event(fn, EVENTS):8.0f} ns/event")


if __name__ == "__main__":
    main()
