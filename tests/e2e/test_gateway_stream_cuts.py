"""A cut is never a success: an upstream stream that breaks ends with an ``error`` event.

The fake upstream writes a real stream raw on its socket in each HTTP framing
(``Content-Length``, chunked, until EOF) and cuts it: a FIN where the framing
promised more bytes, a TCP reset, or (until EOF, where a FIN is the framing's
own end) a FIN in the middle of an event or before ``message_stop``. Through
the gateway, a raw reader must get a prefix of the upstream's whole events and
then exactly one ``error`` event (never a partial event), and the official SDK
must raise an API error instead of returning a message. The same streams,
written whole, end cleanly.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import anthropic
import httpx
import pytest

from keyrelay.gateway.core.sse import SSEDecoder, split_blocks
from tests.e2e.conftest import Stack
from tests.support.fake_upstream import Scripted, message_stream
from tests.support.gateway import PLAIN_KEY

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
STREAM = message_stream(SIMPLE, text_deltas=20)
EVENTS = split_blocks(STREAM)
# In the middle of the 6th event (a text delta), and right after the 5th.
MID_EVENT = sum(len(e) for e in EVENTS[:5]) + len(EVENTS[5]) // 2
AT_BOUNDARY = sum(len(e) for e in EVENTS[:5])

Framing = Literal["length", "chunked", "eof"]
Cut = Literal["fin", "reset"]

CUTS: list[tuple[Framing, Cut, int]] = [
    ("eof", "fin", MID_EVENT),
    ("eof", "fin", AT_BOUNDARY),  # a clean FIN for the framing, but no message_stop
    ("eof", "reset", MID_EVENT),
    ("eof", "reset", AT_BOUNDARY),
    ("chunked", "fin", MID_EVENT),
    ("chunked", "fin", AT_BOUNDARY),
    ("chunked", "reset", MID_EVENT),
    ("length", "fin", MID_EVENT),
    ("length", "reset", AT_BOUNDARY),
]
IDS = [f"{framing}-{cut}-{'mid' if at == MID_EVENT else 'boundary'}" for framing, cut, at in CUTS]


def script(stack: Stack, framing: Framing, cut: Cut | None, at: int) -> None:
    stack.upstream.script = [
        Scripted(200, STREAM[:at], "text/event-stream", framing=framing, cut=cut)
    ]


async def raw_stream(stack: Stack) -> bytes:
    """The response body as a raw reader gets it (the HTTP framing must end properly)."""
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        response = await http.post(
            "/v1/messages", json={**SIMPLE, "stream": True}, headers={"x-api-key": PLAIN_KEY}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return response.content


def whole_blocks(body: bytes) -> list[bytes]:
    """The body's events; it must end on an event boundary."""
    decoder = SSEDecoder()
    blocks = decoder.feed_raw(body)
    assert decoder.buffered == 0, f"a partial event reached the client: {body[-200:]!r}"
    assert decoder.close_raw() == []
    return blocks


@pytest.mark.parametrize(("framing", "cut", "at"), CUTS, ids=IDS)
async def test_a_raw_reader_gets_whole_events_then_one_error_event(
    stack: Stack, framing: Framing, cut: Cut, at: int
) -> None:
    script(stack, framing, cut, at)
    blocks = whole_blocks(await raw_stream(stack))
    *forwarded, last = blocks
    # A prefix of the upstream's whole events (the partial one is never forwarded) ...
    assert forwarded == EVENTS[: len(forwarded)]
    assert len(forwarded) <= 5
    # ... then exactly one error event in the Anthropic shape.
    assert last.startswith(b"event: error\n")
    data = json.loads(last.split(b"data: ", 1)[1])
    assert data["type"] == "error"
    assert data["error"]["type"] == "api_error"
    assert "upstream" in data["error"]["message"]
    assert all(not b.startswith(b"event: error") for b in forwarded)
    # Counted, by route (one cut stream in this test's gateway).
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
        metrics = (await http.get("/metrics")).text
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("keyrelay_gateway_stream_errors_total{")
    ]
    assert counted == ['keyrelay_gateway_stream_errors_total{route="plain"} 1.0'], counted


@pytest.mark.parametrize(("framing", "cut", "at"), CUTS, ids=IDS)
async def test_the_sdk_raises_instead_of_returning_a_message(
    stack: Stack, framing: Framing, cut: Cut, at: int
) -> None:
    script(stack, framing, cut, at)
    texts: list[str] = []

    async def read() -> None:
        async with anthropic.AsyncAnthropic(
            base_url=stack.gateway.url, api_key=PLAIN_KEY, max_retries=0
        ) as client, client.messages.stream(**SIMPLE) as stream:  # fmt: skip
            async for text in stream.text_stream:
                texts.append(text)

    with pytest.raises(anthropic.APIStatusError) as info:
        await read()
    assert "upstream" in str(info.value)
    # What arrived before the cut was whole deltas (the 6th event, cut, never came).
    assert len(texts) <= 2


@pytest.mark.parametrize("framing", ["length", "chunked", "eof"])
async def test_whole_streams_end_cleanly_in_every_framing(stack: Stack, framing: Framing) -> None:
    script(stack, framing, None, len(STREAM))
    assert await raw_stream(stack) == STREAM
    script(stack, framing, None, len(STREAM))
    async with anthropic.AsyncAnthropic(
        base_url=stack.gateway.url, api_key=PLAIN_KEY, max_retries=0
    ) as client, client.messages.stream(**SIMPLE) as stream:  # fmt: skip
        message = await stream.get_final_message()
    assert message.stop_reason == "end_turn"
