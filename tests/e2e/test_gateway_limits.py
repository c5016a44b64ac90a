"""Limits and budgets on the request path: SDK → gateway(s) → fake upstream, with the
shared counters in a real Redis that the gateways reach as their ACL user only.

- 3 ``keyrelay gateway serve`` processes and a key limited to 60 requests a minute:
  300 concurrent SDK requests admit exactly 60; the rest get 429 with
  ``retry-after`` and the ``x-keyrelay-ratelimit-*`` headers; an SDK client with
  retries waits out ``retry-after`` into the next minute and is admitted.
- A token budget under concurrent streams: the usage recorded equals what the
  upstream reported, and the overshoot stays within what was in flight.
- The store killed and restarted under load: ``allow`` keeps serving, ``deny``
  answers 503; no request waits longer than the store's timeout allows; the
  counters resume.
- A key without limits makes no Redis call at all.

The minute window is the real UTC minute (no test clock in the gateway): the
tests that need one window wait, once and at most 40 s, until enough of the
current minute is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.core.ratelimit import window
from keyrelay.gateway.keys import key_hash, new_key
from keyrelay.gateway.limits_store import LimitsStore, UsageRecord
from keyrelay.limit_rules import Period
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import (
    GatewayProcess,
    RunningGateway,
    gateway_env,
    start_gateway,
)
from tests.support.redis_server import RedisServer, gateway_user

PREFIX = "gwl:"
PASSWORD = "gateway-limits-secret"
GATEWAY_USER = gateway_user(PREFIX, PASSWORD)
SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
# What the fake upstream reports for every answer (tests/support/fake_upstream.py):
# input 25, cache creation 3, cache read 7 (not counted), output 12 at the end.
STREAM_USAGE = UsageRecord(
    requests=1,
    input_tokens=25,
    output_tokens=12,
    cache_creation_input_tokens=3,
    cache_read_input_tokens=7,
    tokens=25 + 3 + 12,
    # [prices] below, USD per million: 25 x 3 + 12 x 15 + 3 x 3.75 (cache creation:
    # 1.25 x input) + 7 x 0.3 (cache read: 0.1 x input) = 268.35 micro-dollars
    cost_micro_usd=268,
)
RATELIMIT_HEADERS = (
    "x-keyrelay-ratelimit-limit",
    "x-keyrelay-ratelimit-remaining",
    "x-keyrelay-ratelimit-reset",
)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = await FakeUpstream().start()
    yield server
    await server.stop()


def url_file(tmp_path: Path, server: RedisServer) -> str:
    """The ACL user's URL as a secret file (it holds the password)."""
    path = tmp_path / "limits-url"
    path.write_text(server.acl_url + "\n")
    return str(path)


def limits_config(
    tmp_path: Path,
    server: RedisServer,
    upstream: FakeUpstream,
    keys: dict[str, dict[str, Any] | None],
    **limits: Any,
) -> dict[str, Any]:
    """api_key-mode keys (no auth service) named by their gateway key, each with the
    given ``limits`` (None: none), and ``[gateway.limits]`` on ``server``."""
    return {
        "gateway": {
            "listen": "127.0.0.1:0",
            "limits": {
                "redis_url": {"file": url_file(tmp_path, server)},
                "key_prefix": PREFIX,
                **limits,
            },
        },
        "upstreams": {"default": {"url": upstream.url, "read_timeout_seconds": 10}},
        "prices": {"claude-test*": {"input": 3.0, "output": 15.0}},
        "keys": [
            {
                "name": f"k{i}",
                "hash": key_hash(key),
                "mode": "api_key",
                "api_key": {"env": "KR_UPSTREAM_KEY"},
                **({} if key_limits is None else {"limits": key_limits}),
            }
            for i, (key, key_limits) in enumerate(keys.items())
        ],
    }


async def in_process(data: dict[str, Any]) -> RunningGateway:
    return await start_gateway(parse_gateway_config(data, gateway_env()))


def sdk(url: str, key: str, **options: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, **{"max_retries": 0, **options})


async def minute_with_room(at_least: float, at_most: float) -> None:
    """Waits (once, at most ``60 - at_least + at_most`` s) until between ``at_least``
    and ``at_most`` seconds of the current UTC minute are left."""
    left = window(Period.MINUTE, time.time()).end - time.time()
    if left > at_most:
        await asyncio.sleep(left - at_most)
    elif left < at_least:
        await asyncio.sleep(left + 60 - at_most)


def store_for(server: RedisServer) -> LimitsStore:
    """The store as the auth service would read usage: the default user."""
    return LimitsStore.from_url(server.url, prefix=PREFIX, timeout=2.0)


async def day_usage(server: RedisServer, key: str, expected_requests: int) -> UsageRecord:
    """The key's usage today, once ``expected_requests`` finishes arrived (they run
    after the answers: a few ms later), within 5 s."""
    store = store_for(server)
    try:
        today = window(Period.DAY, time.time()).label
        for _ in range(100):
            (record,) = await store.usage("key", key_hash(key), [today])
            if record.requests >= expected_requests:
                await asyncio.sleep(0.2)  # none more arrives
                (record,) = await store.usage("key", key_hash(key), [today])
                return record
            await asyncio.sleep(0.05)
        return record
    finally:
        await store.close()


def scaled(record: UsageRecord, n: int) -> UsageRecord:
    return UsageRecord(*(n * getattr(record, name) for name in record.__dataclass_fields__))


# -- the request limit, across 3 worker processes --------------------------------------


@pytest.mark.slow
async def test_three_workers_admit_exactly_60_of_300_and_the_next_minute_admits_again(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    key = new_key()
    data = limits_config(tmp_path, limits_redis, upstream, {key: {"requests_per_minute": 60}})
    workers = [GatewayProcess.write(tmp_path, f"gateway-{i}", data) for i in range(3)]
    for worker in workers:
        worker.spawn()
    try:
        for worker in workers:
            worker.wait_ready()
        # One window for the whole burst: 12-40 s of this minute left.
        await minute_with_room(12, 40)
        minute = window(Period.MINUTE, time.time())
        clients = [sdk(worker.url, key) for worker in workers]

        async def one(i: int) -> tuple[int, Any, str]:
            try:
                response = await clients[i % 3].messages.with_raw_response.create(**SIMPLE)
            except anthropic.RateLimitError as exc:
                return exc.status_code, exc.response.headers, exc.message
            return response.status_code, response.headers, ""

        results = await asyncio.gather(*(one(i) for i in range(300)))
        for client in clients:
            await client.close()
        assert window(Period.MINUTE, time.time()) == minute, "the burst crossed a minute"
        statuses = [status for status, _, _ in results]
        assert statuses.count(200) == 60
        assert statuses.count(429) == 240
        assert len(upstream.only()) == 60  # nothing refused reached the upstream
        for status, headers, message in results:
            assert headers["x-keyrelay-ratelimit-limit"] == "60"
            reset = int(headers["x-keyrelay-ratelimit-reset"])
            assert 1 <= reset <= 60
            if status == 429:
                assert headers["x-keyrelay-ratelimit-remaining"] == "0"
                assert int(headers["retry-after"]) == reset
                assert "x-should-retry" not in headers  # a minute passes; a budget would not
                assert "60 requests per minute" in message
                assert 'the key "k0"' in message
        # The counter is exact, shared by all three workers.
        raw = limits_redis.client()
        minute_key = f"{PREFIX}limits:key:{key_hash(key)}:rpm:{minute.label}"
        assert int(raw.get(minute_key) or 0) == 60
        raw.close()
        # Every admitted request was finished once.
        assert (await day_usage(limits_redis, key, 60)).requests == 60

        # An SDK client with retries: refused now, it waits out retry-after (the
        # rest of this minute) and the next window admits it.
        seen: list[int] = []

        async def record(response: Any) -> None:  # the SDK's own httpx (httpx2)
            seen.append(response.status_code)

        retrying = anthropic.AsyncAnthropic(
            base_url=workers[1].url,
            api_key=key,
            max_retries=1,
            http_client=anthropic.DefaultAsyncHttpxClient(event_hooks={"response": [record]}),
        )
        started = time.monotonic()
        async with retrying:
            message = await retrying.messages.create(**SIMPLE)
        waited = time.monotonic() - started
        assert message.content
        assert seen == [429, 200]
        assert time.time() >= minute.end  # the retry came in the next minute
        assert waited <= 45
    finally:
        for worker in workers:
            worker.stop()


# -- a token budget under concurrent streams ----------------------------------------------


async def test_a_token_budget_under_concurrent_streams_records_exactly_what_was_used(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    key = new_key()
    budget = 500  # tokens a day
    wave = 12  # streams in flight at once
    data = limits_config(
        tmp_path,
        limits_redis,
        upstream,
        {key: {"budget": {"amount": budget, "unit": "tokens", "period": "day"}}},
    )
    upstream.chunker = lambda data: [data[i : i + 200] for i in range(0, len(data), 200)]
    upstream.chunk_delay = 0.005  # the streams overlap
    gateway = await in_process(data)
    client = sdk(gateway.url, key)
    succeeded = 0
    refusals: list[anthropic.RateLimitError] = []
    try:

        async def stream() -> None:
            nonlocal succeeded
            try:
                async with client.messages.stream(**SIMPLE) as events:
                    async for _ in events:
                        pass
                    final = await events.get_final_message()
                assert final.usage.output_tokens == 12
                succeeded += 1
            except anthropic.RateLimitError as exc:
                refusals.append(exc)

        for _ in range(10):  # waves until the budget refuses a whole one
            before = len(refusals)
            await asyncio.gather(*(stream() for _ in range(wave)))
            if len(refusals) - before == wave:
                break
        recorded = await day_usage(limits_redis, key, succeeded)
    finally:
        await client.close()
        await gateway.stop()
    assert succeeded >= budget // STREAM_USAGE.tokens
    assert refusals
    # No drift: what was recorded is exactly what the upstream reported.
    assert recorded == scaled(STREAM_USAGE, succeeded)
    # The overshoot: at most what the requests in flight used when it was crossed.
    assert budget <= recorded.tokens < budget + wave * STREAM_USAGE.tokens
    refusal = refusals[-1]
    assert refusal.status_code == 429
    assert refusal.response.headers["x-should-retry"] == "false"
    body = refusal.response.json()
    message = body["error"]["message"]
    assert body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": message},
        "request_id": body["request_id"],
    }
    assert message.startswith('the key "k0" has used up its daily budget of 500 tokens (')
    assert "Do not retry" in message
    assert refusal.response.headers["x-keyrelay-ratelimit-remaining"] == "0"
    reset = int(refusal.response.headers["retry-after"])
    assert reset == int(refusal.response.headers["x-keyrelay-ratelimit-reset"])
    assert 1 <= reset <= 86_400


# -- the store down and back -----------------------------------------------------------------


async def load(url: str, key: str, until: asyncio.Event) -> list[tuple[int, float]]:
    """Requests from 8 clients until ``until``: (status, seconds) of each."""
    results: list[tuple[int, float]] = []

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while not until.is_set():
                started = time.monotonic()
                response = await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": key})
                results.append((response.status_code, time.monotonic() - started))
                if response.status_code != 200:
                    assert response.json()["error"]["type"] == "api_error"
                    assert response.headers["retry-after"] == "1"
                    assert "on_store_error = deny" in response.json()["error"]["message"]
                await asyncio.sleep(0.01)

    await asyncio.gather(*(client_loop() for _ in range(8)))
    return results


def metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_the_store_killed_and_restarted_under_load(
    policy: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    server = RedisServer(tmp_path / "redis", acl_user=GATEWAY_USER).start()
    key = new_key()
    timeout = 0.3
    data = limits_config(
        tmp_path,
        server,
        upstream,
        {key: {"requests_per_minute": 1_000_000, "concurrent_requests": 1000}},
        on_store_error=policy,
        timeout_seconds=timeout,
    )
    gateway = await in_process(data)
    stop = asyncio.Event()
    try:
        loader = asyncio.create_task(load(gateway.url, key, stop))
        await asyncio.sleep(0.5)
        before = await day_usage(server, key, 1)
        server.kill()
        await asyncio.sleep(1.5)
        await asyncio.to_thread(server.start)  # same port and data (AOF), ACL user again
        await asyncio.sleep(1.0)
        stop.set()
        results = await loader
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            metrics = (await http.get("/metrics")).text
        after = await day_usage(server, key, before.requests + 1)
    finally:
        stop.set()
        await gateway.stop()
        server.stop()
    statuses = [status for status, _ in results]
    # Never a hang: a request waits at most about the store's timeout for it.
    assert max(seconds for _, seconds in results) < timeout + 1.0
    if policy == "allow":
        assert set(statuses) == {200}
    else:
        assert set(statuses) == {200, 503}
    assert metric(metrics, "keyrelay_gateway_limits_store_errors_total") > 0
    store_errors = metric(
        metrics, 'keyrelay_gateway_limit_decisions_total{limit="-",outcome="store_error"'
    )
    assert store_errors > 0
    allowed = metric(metrics, 'keyrelay_gateway_limit_decisions_total{limit="-",outcome="allowed"')
    assert allowed + store_errors == len(results)
    # The counters resumed: requests admitted after the restart were recorded.
    assert after.requests > before.requests
    assert statuses[-1] == 200


# -- no limits, no Redis ----------------------------------------------------------------------


def command_calls(server: RedisServer) -> dict[str, int]:
    with server.client() as client:
        stats: dict[str, dict[str, int]] = client.info("commandstats")
    return {
        name: int(values["calls"])
        for name, values in stats.items()
        if name not in ("cmdstat_info", "cmdstat_hello", "cmdstat_client|setinfo")
    }


async def test_count_tokens_counts_against_the_key_s_limits(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """count_tokens reaches the upstream (its own rate limit there), so a key's
    requests/min covers it as it covers messages; it records a request, no tokens."""
    server = RedisServer(tmp_path / "redis", acl_user=GATEWAY_USER).start()
    key = new_key()
    gateway = await in_process(
        limits_config(tmp_path, server, upstream, {key: {"requests_per_minute": 3}})
    )
    try:
        await minute_with_room(5, 60)
        async with sdk(gateway.url, key) as client:
            for _ in range(2):
                counted = await client.messages.count_tokens(
                    model="claude-test", messages=[{"role": "user", "content": "hi"}]
                )
                assert counted.input_tokens == 42  # (the fake upstream's count)
            await client.messages.create(**SIMPLE)  # the third request of the minute
            with pytest.raises(anthropic.RateLimitError) as refused:
                await client.messages.count_tokens(
                    model="claude-test", messages=[{"role": "user", "content": "hi"}]
                )
            assert refused.value.response.headers["x-keyrelay-ratelimit-remaining"] == "0"
        record = await day_usage(server, key, 3)
        assert record.requests == 3
        assert record.input_tokens == STREAM_USAGE.input_tokens  # the message's alone
    finally:
        await gateway.stop()
        server.stop()


async def test_a_key_without_limits_makes_no_redis_call(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    server = RedisServer(tmp_path / "redis", acl_user=GATEWAY_USER).start()
    free, limited = new_key(), new_key()
    data = limits_config(
        tmp_path, server, upstream, {free: None, limited: {"requests_per_minute": 100}}
    )
    gateway = await in_process(data)
    try:
        calls = command_calls(server)
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            for _ in range(20):
                response = await http.post(
                    "/v1/messages", json={**SIMPLE, "stream": True}, headers={"x-api-key": free}
                )
                assert response.status_code == 200
                assert not any(h.startswith("x-keyrelay-ratelimit") for h in response.headers)
            for _ in range(20):
                response = await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": free})
                assert response.status_code == 200
            await asyncio.sleep(0.2)  # any finish would have arrived
            assert command_calls(server) == calls
            # The limited key beside it does count (the counting works at all).
            response = await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": limited})
            assert response.status_code == 200
            assert response.headers["x-keyrelay-ratelimit-limit"] == "100"
            assert response.headers["x-keyrelay-ratelimit-remaining"] == "99"
        await asyncio.sleep(0.2)
        assert command_calls(server) != calls
    finally:
        await gateway.stop()
        server.stop()
