"""A non-stream answer cut by the upstream is a 502, never a 200 with a truncated body.

The upstream is a scripted loopback server that writes the head and part of a
JSON body in each HTTP framing, then ends the connection with a FIN or a TCP
reset. Through the gateway (the official SDK, and a raw client for the exact
bytes) every cut is a 502 in the Anthropic error shape; the one end that is not
a cut, a FIN on a body framed "until the connection closes", is passed on as
the upstream sent it. (Streams cut the same ways: ``test_gateway_stream_cuts``.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest

from keyrelay.gateway.config import parse_gateway_config
from tests.support.gateway import (
    API_KEY_KEY,
    RunningGateway,
    gateway_config_data,
    gateway_env,
    start_gateway,
)
from tests.support.scripted_upstream import Request, ScriptedServer, json_answer, reset

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
HEADS = {
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: 1000\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"transfer-encoding: chunked\r\n\r\n",
    "eof": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n",
}
PARTIAL = b'{"id":"msg_01","type":"message","role":"assistant","content":[{"type":"text","te'
WIRE = {
    "content-length": PARTIAL,
    "chunked": f"{len(PARTIAL):x}\r\n".encode() + PARTIAL + b"\r\n",
    "eof": PARTIAL,
}


def cut_answer(framing: str, how: str) -> Any:
    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(HEADS[framing] + WIRE[framing])
        await writer.drain()
        # Lets the gateway read the bytes first (a RST can overtake unread data);
        # were it overtaken, the cut would come before the head: a 502 all the same.
        await asyncio.sleep(0.2)
        if how == "reset":
            reset(writer)
        else:
            writer.close()

    return answer


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    server = await ScriptedServer([json_answer()]).start()
    yield server
    await server.stop()


@pytest.fixture
async def gateway(scripted: ScriptedServer) -> AsyncIterator[RunningGateway]:
    data = gateway_config_data(f"http://127.0.0.1:{scripted.port}", None)
    data["keys"] = [key for key in data["keys"] if key["name"] == "apikey"]
    running = await start_gateway(parse_gateway_config(data, gateway_env()))
    yield running
    await running.stop()


async def ask(gateway: RunningGateway) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        return await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": API_KEY_KEY})


@pytest.mark.parametrize("how", ["reset", "fin"])
@pytest.mark.parametrize("framing", ["content-length", "chunked", "eof"])
async def test_a_cut_non_stream_answer_is_a_502(
    scripted: ScriptedServer, gateway: RunningGateway, framing: str, how: str
) -> None:
    scripted.answers = [cut_answer(framing, how), json_answer()]
    response = await ask(gateway)
    if framing == "eof" and how == "fin":
        # HTTP/1.1's own end for this framing: what the upstream sent, as it sent it.
        assert response.status_code == 200
        assert response.content == PARTIAL
    else:
        assert response.status_code == 502, response.text
        body = response.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "api_error"
        assert "broke the connection" in body["error"]["message"]
        assert body["request_id"] == response.headers["request-id"]
    # The worker keeps serving, on a fresh connection.
    after = await ask(gateway)
    assert (after.status_code, after.content) == (200, b'{"ok":true}')


async def test_the_sdk_raises_on_a_reset_body_without_content_length(
    scripted: ScriptedServer, gateway: RunningGateway
) -> None:
    """Row 5 of issue 9: this answered 200 with truncated JSON."""
    scripted.answers = [cut_answer("eof", "reset")]
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=API_KEY_KEY, max_retries=0)
    async with client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(**SIMPLE)
    assert caught.value.status_code == 502
    assert "broke the connection" in caught.value.message
