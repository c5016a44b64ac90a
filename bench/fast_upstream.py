"""A fast fake Messages API upstream for the gateway benchmark: a raw asyncio protocol on uvloop.

The benchmark must measure the gateway, not its upstream, so this server does
the least work an HTTP/1.1 server can: it frames requests by ``Content-Length``
(keep-alive, pipelining tolerated) and answers every ``POST /v1/messages`` with
one of two responses built once at start, each written with a single
``transport.write``:

- ``"stream": true`` in the body (compact or with one space): the realistic
  stream of ``bench/sse_core.build_stream`` (message_start, text deltas, ping, a
  ``tool_use`` block named ``mcp_get_weather`` with input_json_delta,
  message_delta with usage, message_stop) as ``text/event-stream`` in
  ``Transfer-Encoding: chunked`` HTTP chunks of ``--chunk`` bytes (0: one HTTP
  chunk per event), the way the real API frames its streams;
- otherwise a JSON message with a text block, a ``tool_use`` block named
  ``mcp_get_weather`` and usage.

Anything else is a 404. It prints ``listening <port>`` on stdout once it accepts
connections (``--port 0``, the default, picks a free port) and runs until
SIGTERM or SIGINT. Run: ``.venv/bin/python -m bench.fast_upstream --events 2000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import uvloop

# `python bench/fast_upstream.py` puts bench/ on sys.path, not the repository root.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.sse_core import build_stream  # noqa: E402

MAX_HEAD = 64 << 10
MAX_BODY = 64 << 20
TOOL_NAME = "mcp_get_weather"  # what the upstream calls the tool; the client knows get_weather


def message_json() -> bytes:
    return json.dumps(
        {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [
                {"type": "text", "text": "I'll look up the current weather in Paris for you."},
                {
                    "type": "tool_use",
                    "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                    "name": TOOL_NAME,
                    "input": {"city": "Paris", "unit": "celsius"},
                },
            ],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 1234,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 1000,
                "output_tokens": 58,
            },
        },
        separators=(",", ":"),
    ).encode()


def _head(status: str, content_type: str, extra: str) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
        f"request-id: req_bench_upstream\r\n{extra}\r\n"
    ).encode()


def json_response(body: bytes, status: str = "200 OK") -> bytes:
    return _head(status, "application/json", f"content-length: {len(body)}\r\n") + body


def stream_response(stream: bytes, chunk: int) -> bytes:
    if chunk > 0:
        pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    else:
        pieces = [block + b"\n\n" for block in stream.split(b"\n\n") if block]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    head = _head(
        "200 OK", "text/event-stream", "cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
    )
    return head + framed + b"0\r\n\r\n"


class Responses:
    def __init__(self, events: int, chunk: int) -> None:
        self.json = json_response(message_json())
        self.stream = stream_response(build_stream(events), chunk)
        self.not_found = json_response(
            b'{"type":"error","error":{"type":"not_found_error","message":"not found"}}',
            "404 Not Found",
        )
        self.bad = json_response(
            b'{"type":"error","error":{"type":"invalid_request_error",'
            b'"message":"this fake upstream needs Content-Length"}}',
            "400 Bad Request",
        )


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, responses: Responses) -> None:
        self._responses = responses
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        transport = self._transport
        while transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    transport.close()
                return
            head = bytes(buffer[:end]).lower()
            length = 0
            at = head.find(b"\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r", at + 1)
                value = head[at + 16 : line_end if line_end >= 0 else len(head)].strip()
                if not value.isdigit() or int(value) > MAX_BODY:
                    transport.write(self._responses.bad)
                    transport.close()
                    return
                length = int(value)
            elif b"\ntransfer-encoding:" in head:
                transport.write(self._responses.bad)
                transport.close()
                return
            total = end + 4 + length
            if len(buffer) < total:
                return
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            transport.write(self._answer(head, body))
            if b"\nconnection: close" in head:
                transport.close()
                return

    def _answer(self, head: bytes, body: bytes) -> bytes:
        if not head.startswith((b"post /v1/messages ", b"post /v1/messages?")):
            return self._responses.not_found
        if b'"stream":true' in body or b'"stream": true' in body:
            return self._responses.stream
        return self._responses.json


async def serve(port: int, events: int, chunk: int) -> None:
    responses = Responses(events, chunk)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    server = await loop.create_server(lambda: UpstreamProtocol(responses), sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--events", type=int, default=2000, help="events per stream")
    parser.add_argument(
        "--chunk", type=int, default=4096, help="bytes per HTTP chunk of a stream (0: per event)"
    )
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.events, args.chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
