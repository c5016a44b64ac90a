"""Bad client input, broken upstreams, hostile streams: clear errors; the worker keeps going."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import anthropic
import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.support.fake_upstream import Scripted, message_stream, random_chunks, sse
from tests.support.gateway import OAUTH_KEY, PLAIN_KEY

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
MAX_REQUEST = 10 << 20


def assert_error(response: httpx.Response, status: int, error_type: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert fragment in body["error"]["message"]
    assert "Traceback" not in response.text
    assert response.headers["content-type"] == "application/json"


async def still_serving(stack: Stack) -> None:
    async with stack.client(PLAIN_KEY) as client:
        message = await client.messages.create(**SIMPLE)
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("body", "headers", "status", "error_type", "fragment"),
    [
        (b"{not json", {}, 400, "invalid_request_error", "not valid JSON"),
        (b"[1, 2]", {}, 400, "invalid_request_error", "JSON object"),
        (b'"text"', {}, 400, "invalid_request_error", "JSON object"),
        (b"", {}, 400, "invalid_request_error", "JSON"),
        (b'{"a": NaN}', {}, 400, "invalid_request_error", "JSON"),
        (b"\xff\xfe{}", {}, 400, "invalid_request_error", "JSON"),
        (json.dumps(SIMPLE).encode(), {"content-type": "text/plain"}, 400,
         "invalid_request_error", "content-type"),
        (json.dumps({**SIMPLE, "tools": "nope"}).encode(), {}, 400, "invalid_request_error",
         "tools"),
        (json.dumps(SIMPLE).encode(), {"x-api-key": "kr-unknown"}, 401,
         "authentication_error", "not in the gateway's [[keys]]"),
        (json.dumps(SIMPLE).encode(), {"x-api-key": ""}, 401, "authentication_error",
         "missing gateway key"),
    ],
)  # fmt: skip
async def test_malformed_requests(
    stack: Stack,
    body: bytes,
    headers: dict[str, str],
    status: int,
    error_type: str,
    fragment: str,
) -> None:
    sent = {"content-type": "application/json", "x-api-key": OAUTH_KEY, **headers}
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        response = await http.post("/v1/messages", content=body, headers=sent)
    assert_error(response, status, error_type, fragment)
    assert stack.upstream.requests == []
    await still_serving(stack)


async def test_paths_and_methods(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        assert_error(await http.get("/v1/models"), 404, "not_found_error", "/v1/models")
        assert_error(await http.post("/v1/complete"), 404, "not_found_error", "/v1/complete")
        assert_error(
            await http.get("/v1/messages", headers={"x-api-key": OAUTH_KEY}),
            405,
            "invalid_request_error",
            "POST",
        )
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200


async def test_bearer_authorization_works_like_x_api_key(stack: Stack) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=stack.gateway.url, auth_token=PLAIN_KEY, max_retries=0
    ) as client:
        message = await client.messages.create(**SIMPLE)
    assert message.stop_reason == "end_turn"
    upstream_auth = stack.upstream.last().header("authorization") or ""
    assert upstream_auth.startswith("Bearer ")
    assert PLAIN_KEY not in upstream_auth


async def test_body_over_the_limit_with_content_length(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        response = await http.post(
            "/v1/messages",
            content=b"x" * (MAX_REQUEST + 1),
            headers={"content-type": "application/json", "x-api-key": OAUTH_KEY},
        )
    assert_error(response, 413, "request_too_large", str(MAX_REQUEST))
    await still_serving(stack)


async def test_body_over_the_limit_chunked_is_not_buffered_unbounded(stack: Stack) -> None:
    """A chunked body with no length: the 413 comes once the limit is crossed, while
    the client is still sending (a raw socket, so we see the answer mid-upload)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        + f"x-api-key: {OAUTH_KEY}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    sent = 0
    answer = b""
    try:
        while sent < 8 * MAX_REQUEST and not answer:
            writer.write(chunk)
            await writer.drain()
            sent += 0x10000
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), timeout=0.001)
    except ConnectionError:
        pass  # closed on us after the answer: fine
    if not answer:
        answer = await asyncio.wait_for(reader.read(65536), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer
    assert sent < 2 * MAX_REQUEST, f"the client could send {sent} bytes before the 413"
    await still_serving(stack)


async def test_upstream_errors_pass_through_unchanged(stack: Stack) -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    stack.upstream.script = [
        Scripted(529, json.dumps(error).encode(), headers={"retry-after": "3"})
    ]
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        response = await http.post(
            "/v1/messages", json={**SIMPLE, "stream": True}, headers={"x-api-key": PLAIN_KEY}
        )
    assert response.status_code == 529
    assert response.json() == error
    assert response.headers["retry-after"] == "3"
    assert response.headers["request-id"] == "req_upstream_01"


async def test_error_event_after_200_is_forwarded(stack: Stack) -> None:
    events = sse("message_start", {"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "model": "claude-test-1",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1}}})  # fmt: skip
    events += sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                       "message": "Overloaded"}})  # fmt: skip
    stack.upstream.script = [Scripted(200, events, "text/event-stream")]
    async with stack.client(PLAIN_KEY) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            async with client.messages.stream(**SIMPLE) as stream:
                await stream.get_final_message()
    assert "Overloaded" in str(info.value)


@pytest.mark.parametrize(
    ("stream", "fragment"),
    [
        (b"event: ping\ndata: " + b"x" * (2 << 20), "larger than"),
        (b"data: " + b"y" * (1 << 20) + b"\n\n", "larger than"),
        (b'event: content_block_delta\ndata: {"t": "\xff\xfe"}\n\n', "UTF-8"),
    ],
    ids=["endless-line", "event-over-limit", "invalid-utf8"],
)
async def test_hostile_upstream_streams_end_with_an_error_event(
    stack: Stack, stream: bytes, fragment: str
) -> None:
    start = message_stream(SIMPLE).split(b"\n\n")[0] + b"\n\n"
    stack.upstream.script = [Scripted(200, start + stream, "text/event-stream")]
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        response = await http.post(
            "/v1/messages", json={**SIMPLE, "stream": True}, headers={"x-api-key": PLAIN_KEY}
        )
    assert response.status_code == 200
    assert response.content.startswith(start)
    tail = response.content[len(start) :]
    assert tail.startswith(b"event: error\ndata: ")
    error = json.loads(tail.split(b"data: ", 1)[1])
    assert error["error"]["type"] == "api_error"
    assert fragment in error["error"]["message"]
    await still_serving(stack)


async def test_unreachable_upstream_is_502(stack: Stack) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    await stack.upstream.stop()
    stack.upstream.port = int(dead.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        response = await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": PLAIN_KEY})
    assert_error(response, 502, "api_error", "unreachable")


async def test_slow_upstream_is_504_before_headers_and_an_error_event_after(
    stack: Stack,
) -> None:
    await stack.restart_gateway(upstream_read_timeout=1.0)
    stack.upstream.header_delay = 1.5
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        response = await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": PLAIN_KEY})
    assert_error(response, 504, "api_error", "did not answer in time")
    stack.upstream.header_delay = 0.0
    stack.upstream.chunk_delay = 1.5
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        response = await http.post(
            "/v1/messages", json={**SIMPLE, "stream": True}, headers={"x-api-key": PLAIN_KEY}
        )
    assert response.status_code == 200  # headers were out before the stall
    assert b"event: error" in response.content
    assert b"did not answer in time" in response.content


async def test_client_going_away_mid_stream_cancels_the_upstream_read(stack: Stack) -> None:
    stack.upstream.chunk_delay = 0.01
    stack.upstream.chunker = random_chunks(3)
    stack.upstream.script = [
        Scripted(200, message_stream(SIMPLE, text_deltas=400), "text/event-stream")
    ]
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http, http.stream(
        "POST", "/v1/messages", json={**SIMPLE, "stream": True},
        headers={"x-api-key": PLAIN_KEY},
    ) as response:  # fmt: skip
        async for _ in response.aiter_bytes():
            break
    for _ in range(300):
        if stack.upstream.aborted_streams:
            break
        await asyncio.sleep(0.01)
    assert stack.upstream.aborted_streams == 1, "the upstream stream was not cancelled"
    await still_serving(stack)
