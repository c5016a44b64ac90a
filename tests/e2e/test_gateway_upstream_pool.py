"""The upstream pool under exhaustion: a bounded wait, a bounded queue, a clear 503.

Row 4 of issue 9: an upstream with ``max_connections = 4`` held by 4 long
streams made every further request wait forever (no timeout, no error, no
metric). Now a request waits for a connection at most ``pool_timeout_seconds``
and at most ``max_waiting`` requests wait; beyond either it gets a 503
``overloaded_error`` with ``retry-after``, through the official SDK
(``max_retries=0``), and ``/metrics`` shows the pool's state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keyrelay.gateway.config import parse_gateway_config
from tests.support.fake_upstream import message_json, message_stream
from tests.support.gateway import (
    API_KEY_KEY,
    RunningGateway,
    gateway_config_data,
    gateway_env,
    start_gateway,
)
from tests.support.scripted_upstream import Answer, Request, ScriptedServer, json_answer

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
STREAM = message_stream(SIMPLE)
HEAD, _, REST = STREAM.partition(b"\n\n")  # the first event, and the rest
MESSAGE = json.dumps(message_json(SIMPLE)).encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def held_stream(release: asyncio.Event) -> Answer:
    """A stream that sends its first event, then holds until ``release``."""

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + chunk(HEAD + b"\n\n")
        )
        await writer.drain()
        await release.wait()
        writer.write(chunk(REST) + b"0\r\n\r\n")
        await writer.drain()

    return answer


class Pool:
    """A gateway whose upstream's connections are all held by long streams."""

    def __init__(self, server: ScriptedServer, gateway: RunningGateway) -> None:
        self.server = server
        self.gateway = gateway
        self.release = asyncio.Event()
        self.client = anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key=API_KEY_KEY, max_retries=0, timeout=20.0
        )
        self.streams: list[anthropic.AsyncStream[Any]] = []

    async def hold(self, count: int) -> None:
        self.server.answers = [held_stream(self.release)] * count + [json_answer(MESSAGE)]
        for _ in range(count):
            stream = await self.client.messages.create(**SIMPLE, stream=True)
            self.streams.append(stream)
        assert len(self.server.requests) == count

    async def finish_streams(self) -> None:
        self.release.set()
        for stream in self.streams:
            events = [event.type async for event in stream]
            assert events[-1] == "message_stop"

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` samples of the upstream pool, as {"name{labels}": value}."""
        async with httpx.AsyncClient(base_url=self.gateway.url) as http:
            text = (await http.get("/metrics")).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if "upstream_pool" in sample.name or "upstream_connections" in sample.name:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    out[f"{sample.name}{{{labels}}}"] = sample.value
        return out


@pytest.fixture
async def pool(request: pytest.FixtureRequest) -> AsyncIterator[Pool]:
    """``request.param``: the ``[upstreams.default]`` keys beyond the URL."""
    upstream: dict[str, Any] = getattr(request, "param", {})
    server = await ScriptedServer([json_answer(MESSAGE)]).start()
    data = gateway_config_data(f"http://127.0.0.1:{server.port}", None)
    data["keys"] = [key for key in data["keys"] if key["name"] == "apikey"]
    # The held streams are silent: longer than any wait here (the helper's default is 5 s).
    data["upstreams"]["default"]["read_timeout_seconds"] = 120
    data["upstreams"]["default"].update(upstream)
    gateway = await start_gateway(parse_gateway_config(data, gateway_env()))
    result = Pool(server, gateway)
    try:
        yield result
    finally:
        result.release.set()
        await result.client.close()
        await gateway.stop()
        await server.stop()


@pytest.mark.parametrize("pool", [{"max_connections": 4}], indirect=True)
async def test_pool_exhaustion_with_the_default_settings_is_a_503_not_a_hang(pool: Pool) -> None:
    """No pool settings but ``max_connections``: the default wait deadline holds."""
    await pool.hold(4)
    started = asyncio.get_running_loop().time()
    with pytest.raises(anthropic.InternalServerError) as caught:
        # The SDK's own timeout (20 s) is far beyond the pool's default deadline.
        await pool.client.messages.create(**SIMPLE)
    waited = asyncio.get_running_loop().time() - started
    error = caught.value
    assert error.status_code == 503
    assert error.response.headers["retry-after"] == "1"
    assert isinstance(error.body, dict)
    assert error.body["error"]["type"] == "overloaded_error"
    assert "'default'" in error.message
    assert "pool_timeout_seconds" in error.message
    # The default pool_timeout_seconds: never earlier than the deadline (uvloop's
    # clock counts whole milliseconds).
    assert waited >= 5.0 - 0.002
    assert len(pool.server.requests) == 4  # it never reached the upstream
    await pool.finish_streams()
    # Connections free again: served.
    message = await pool.client.messages.create(**SIMPLE)
    assert message.id == "msg_01"


@pytest.mark.parametrize(
    "pool", [{"max_connections": 4, "pool_timeout_seconds": 0.5}], indirect=True
)
async def test_a_wait_past_the_deadline_is_a_503_and_is_measured(pool: Pool) -> None:
    await pool.hold(4)
    before = await pool.metrics()
    outcomes = await asyncio.gather(
        *(pool.client.messages.create(**SIMPLE) for _ in range(3)), return_exceptions=True
    )
    for outcome in outcomes:
        assert isinstance(outcome, anthropic.InternalServerError), outcome
        assert outcome.status_code == 503
        assert outcome.response.headers["retry-after"] == "1"
    after = await pool.metrics()
    assert after["keyrelay_gateway_upstream_connections_open{upstream=default}"] == 4
    assert after["keyrelay_gateway_upstream_connections_in_use{upstream=default}"] == 4
    assert after["keyrelay_gateway_upstream_connections_idle{upstream=default}"] == 0
    assert after["keyrelay_gateway_upstream_pool_waiting{upstream=default}"] == 0
    rejected = "keyrelay_gateway_upstream_pool_rejected_total{reason=timeout,upstream=default}"
    assert after[rejected] == 3
    # Three waits of at least 0.5 s: none in the buckets below 0.5 s.
    count = "keyrelay_gateway_upstream_pool_wait_seconds_count{upstream=default}"
    below = "keyrelay_gateway_upstream_pool_wait_seconds_bucket{le=0.25,upstream=default}"
    assert after[count] - before[count] == 3
    assert after[below] == before[below]
    await pool.finish_streams()
    final = await pool.metrics()
    assert final["keyrelay_gateway_upstream_connections_in_use{upstream=default}"] == 0
    assert final["keyrelay_gateway_upstream_connections_idle{upstream=default}"] == 4


@pytest.mark.parametrize(
    "pool",
    [{"max_connections": 4, "pool_timeout_seconds": 60, "max_waiting": 2}],
    indirect=True,
)
async def test_beyond_the_waiting_queue_a_request_gets_a_503_at_once(pool: Pool) -> None:
    await pool.hold(4)
    waiting = [asyncio.create_task(pool.client.messages.create(**SIMPLE)) for _ in range(2)]
    for _ in range(500):
        metrics = await pool.metrics()
        if metrics["keyrelay_gateway_upstream_pool_waiting{upstream=default}"] == 2:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the two requests never waited")
    with pytest.raises(anthropic.InternalServerError) as caught:
        await pool.client.messages.create(**SIMPLE)
    # "At once": refused while the two before it still wait (their deadline is 60 s).
    assert not any(task.done() for task in waiting)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert "max_waiting" in caught.value.message
    metrics = await pool.metrics()
    rejected = "keyrelay_gateway_upstream_pool_rejected_total{reason=queue_full,upstream=default}"
    assert metrics[rejected] == 1
    # The streams end: the two waiting requests are served.
    await pool.finish_streams()
    messages = await asyncio.gather(*waiting)
    assert [m.id for m in messages] == ["msg_01", "msg_01"]
    assert len(pool.server.requests) == 6
