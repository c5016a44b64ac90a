"""A fake Messages API upstream: a real HTTP server on loopback that records what it gets.

It answers like the real API: a JSON message, or (``"stream": true``) an SSE
stream of ``message_start``, content blocks (text, and ``tool_use`` with
``input_json_delta``), ``ping``, ``message_delta`` with usage and
``message_stop``, written in whatever chunking the test asks for. A test can
script the next responses (status, raw body, raw SSE bytes) and make it
refuse tokens (some, or every one) with a 401 the way the real API refuses an
expired one. A scripted answer can also be written raw on the socket in a
chosen framing (``Content-Length``, chunked, or until EOF) and then cut: a FIN
(``close``) or a TCP reset, where the framing promised more bytes.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Chunker = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_chunks(seed: int, max_size: int = 17) -> Chunker:
    def split(data: bytes) -> list[bytes]:
        rng = random.Random(seed)
        out, i = [], 0
        while i < len(data):
            size = rng.randint(1, max_size)
            out.append(data[i : i + size])
            i += size
        return out

    return split


@dataclass
class Recorded:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    body: bytes
    refused: bool = False  # answered 401 because the token was refused

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Scripted:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # With a framing, the answer is written raw on the socket (the chunker cuts the
    # body into writes; "chunked": one HTTP chunk per write) and then, with a cut,
    # the connection ends where the framing promised more: "length" declares 100
    # bytes more than sent, "chunked" declares the last chunk 100 bytes longer,
    # "eof" (no length, "connection: close") ends at the cut. "fin" closes the
    # connection, "reset" sends a TCP RST; None ends the answer as framed.
    framing: Literal["length", "chunked", "eof"] | None = None
    cut: Literal["fin", "reset"] | None = None


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def tool_call_blocks(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A tool_use block for the first tool in the request (as the model would pick)."""
    tools = request.get("tools") or []
    custom = [t for t in tools if t.get("type") in (None, "custom")]
    if not custom:
        return []
    return [
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": custom[0]["name"],
            "input": {"name": "the name key inside input", "city": "Paris"},
        }
    ]


def message_json(request: dict[str, Any]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": 'Hello; a "name" in text.'}]
    content += tool_call_blocks(request)
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "claude-test"),
        "content": content,
        "stop_reason": "tool_use" if len(content) > 1 else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 25,
            "output_tokens": 12,
            "cache_creation_input_tokens": 3,
            "cache_read_input_tokens": 7,
        },
    }


def message_stream(request: dict[str, Any], *, text_deltas: int = 3) -> bytes:
    model = request.get("model", "claude-test")
    usage = {
        "input_tokens": 25,
        "output_tokens": 1,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 7,
    }
    out = sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage,
            },
        },
    )
    out += sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    out += sse("ping", {"type": "ping"})
    for i in range(text_deltas):
        out += sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": f"h\u00e9llo \u4e16\u754c {i} "},
            },
        )
    out += sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    for block in tool_call_blocks(request):
        out += sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": block["id"],
                    "name": block["name"],
                    "input": {},
                },
            },
        )
        partial = json.dumps(block["input"])
        for piece in (partial[:10], partial[10:]):
            out += sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                },
            )
        out += sse("content_block_stop", {"type": "content_block_stop", "index": 1})
    out += sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": "tool_use" if tool_call_blocks(request) else "end_turn",
                "stop_sequence": None,
            },
            "usage": {"output_tokens": 12},
        },
    )
    out += sse("message_stop", {"type": "message_stop"})
    return out


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: list[Scripted] = []
        self.chunker: Chunker = whole
        self.chunk_delay = 0.0
        self.header_delay = 0.0
        self.aborted_streams = 0
        self.refused_tokens: set[str] = set()
        # Refuses every token, whatever it is (an upstream that rejects them all).
        self.refuse_all = False
        # Asked about every Bearer token as it arrives (e.g. the provider's
        # userinfo): a token it calls invalid gets the real API's 401.
        self.token_check: Callable[[str], Awaitable[bool]] | None = None
        # Per upstream API key (``x-api-key``): asked first; an answer it returns is
        # written instead of the normal one (a pool member rate limited, say).
        self.by_api_key: dict[str, Callable[[Recorded], Scripted | None]] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorded = Recorded(
            request.method,
            request.path,
            list(request.query.items()),
            list(request.headers.items()),
            body,
        )
        self.requests.append(recorded)
        token = (recorded.header("authorization") or "").removeprefix("Bearer ")
        if (
            self.refuse_all
            or token in self.refused_tokens
            or (self.token_check is not None and not await self.token_check(token))
        ):
            recorded.refused = True
            return web.json_response(
                {
                    "type": "error",
                    "error": {"type": "authentication_error", "message": "invalid token"},
                },
                status=401,
            )
        hook = self.by_api_key.get(recorded.header("x-api-key") or "")
        answer = hook(recorded) if hook is not None else None
        if answer is not None:
            if answer.framing is not None:
                return await self._write_raw(request, answer)
            return await self._write(
                request, answer.status, answer.body, answer.content_type, answer.headers
            )
        if self.script:
            scripted = self.script.pop(0)
            if scripted.framing is not None:
                return await self._write_raw(request, scripted)
            return await self._write(
                request, scripted.status, scripted.body, scripted.content_type, scripted.headers
            )
        payload = json.loads(body)
        if request.path.endswith("/count_tokens"):
            return web.json_response({"input_tokens": 42})
        if payload.get("stream"):
            return await self._write(request, 200, message_stream(payload), "text/event-stream")
        return await self._write(
            request, 200, json.dumps(message_json(payload)).encode(), "application/json"
        )

    async def _write(
        self,
        request: web.Request,
        status: int,
        data: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        if self.header_delay:
            await asyncio.sleep(self.header_delay)
        response = web.StreamResponse(
            status=status,
            headers={
                "content-type": content_type,
                "request-id": "req_upstream_01",
                **(headers or {}),
            },
        )
        await response.prepare(request)
        try:
            for chunk in self.chunker(data):
                await response.write(chunk)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await response.write_eof()
        except ConnectionError:
            self.aborted_streams += 1  # the gateway hung up on us
            raise
        return response

    async def _write_raw(self, request: web.Request, scripted: Scripted) -> web.StreamResponse:
        """The answer written straight on the socket, then maybe cut (see ``Scripted``)."""
        transport = request.transport
        assert transport is not None
        cut = scripted.cut
        body = scripted.body
        head = [f"HTTP/1.1 {scripted.status} Scripted", f"content-type: {scripted.content_type}"]
        head += [f"{name}: {value}" for name, value in scripted.headers.items()]
        if scripted.framing == "length":
            head.append(f"content-length: {len(body) + (100 if cut else 0)}")
        elif scripted.framing == "chunked":
            head.append("transfer-encoding: chunked")
        else:
            head.append("connection: close")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        pieces = self.chunker(body) if body else []
        for i, piece in enumerate(pieces):
            data = piece
            if scripted.framing == "chunked":
                short = cut is not None and i == len(pieces) - 1  # the chunk that is cut
                size = b"%x\r\n" % (len(piece) + (100 if short else 0))
                data = size + piece + (b"" if short else b"\r\n")
            transport.write(data)
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        if scripted.framing == "chunked" and not cut:
            transport.write(b"0\r\n\r\n")
        if cut == "reset":
            # Let the bytes reach the gateway first: an RST can overtake unread data.
            await asyncio.sleep(0.2)
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if cut or scripted.framing == "eof":
            transport.close()
        # The answer went out raw: aiohttp must not write one of its own.
        raise asyncio.CancelledError

    def last(self) -> Recorded:
        return self.requests[-1]

    def only(self, paths: Sequence[str] = ("/v1/messages",)) -> list[Recorded]:
        return [r for r in self.requests if r.path in paths]
