"""Factories for Messages API responses (JSON and SSE) used by the gateway tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keyrelay.gateway.core.sse import SSEDecoder


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse(name: str, data: object, *, line_end: str = "\n") -> bytes:
    """One event as the Messages API writes it (event line, one data line)."""
    text = f"event: {name}{line_end}data: {dumps(data)}{line_end}{line_end}"
    return text.encode("utf-8")


@dataclass
class Text:
    chunks: Sequence[str]


@dataclass
class ToolUse:
    name: str
    input_json: Sequence[str]  # the partial_json pieces
    id: str = "toolu_01A09q90qw90lq917835lq9"


@dataclass
class ServerToolUse:
    name: str = "web_search"
    id: str = "srvtoolu_014hJH82Qum7Td6UV8gDXThB"
    input: dict[str, Any] = field(default_factory=lambda: {"query": "weather"})


Block = Text | ToolUse | ServerToolUse


def message_start(
    *, model: str = "claude-sonnet-4-5-20250929", usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage
            if usage is not None
            else {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    }


def message_events(
    blocks: Sequence[Block],
    *,
    model: str = "claude-sonnet-4-5-20250929",
    start_usage: dict[str, Any] | None = None,
    delta_usages: Sequence[dict[str, Any]] = ({"output_tokens": 15},),
    ping: bool = True,
    stop_reason: str = "tool_use",
) -> list[bytes]:
    """A realistic event sequence: message_start, ping, blocks, message_delta(s), stop."""
    events = [sse("message_start", message_start(model=model, usage=start_usage))]
    if ping:
        events.append(sse("ping", {"type": "ping"}))
    for index, block in enumerate(blocks):
        if isinstance(block, Text):
            start: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": t} for t in block.chunks]
        elif isinstance(block, ToolUse):
            start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in block.input_json]
        else:
            start = {
                "type": "server_tool_use",
                "id": block.id,
                "name": block.name,
                "input": block.input,
            }
            deltas = []
        events.append(
            sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
        )
        for delta in deltas:
            events.append(
                sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    for usage in delta_usages:
        events.append(
            sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": usage,
                },
            )
        )
    events.append(sse("message_stop", {"type": "message_stop"}))
    return events


def message_json(content: list[dict[str, Any]], *, usage: dict[str, Any] | None = None) -> bytes:
    body = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": usage
        if usage is not None
        else {
            "input_tokens": 2095,
            "output_tokens": 503,
            "cache_creation_input_tokens": 7,
            "cache_read_input_tokens": 11,
        },
    }
    return dumps(body).encode("utf-8")


def chunked(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates and 0 allowed)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out: list[bytes] = []
    prev = 0
    for point in [*points, len(data)]:
        out.append(data[prev:point])
        prev = point
    return [c for c in out if c]


def one_byte_chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def parse_stream(data: bytes) -> list[tuple[str | None, Any]]:
    """(event name, decoded JSON data) for every event of a complete stream."""
    decoder = SSEDecoder()
    out: list[tuple[str | None, Any]] = []
    for event in decoder.feed(data) + decoder.close():
        if event.data is not None:
            out.append((event.event, json.loads(event.data)))
    return out
