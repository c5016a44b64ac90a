"""Usage, billing, metrics and the one access-log line per request."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from keyrelay.logs import JsonFormatter
from tests.e2e.conftest import Stack
from tests.support.gateway import API_KEY_KEY, OAUTH_KEY, PLAIN_KEY, UPSTREAM_API_KEY
from tests.support.stack import ADMIN_TOKEN, GATEWAY_TOKEN

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
# The fake upstream reports 25 input, 12 output, 3 cache-creation and 7 cache-read tokens;
# claude-test* costs $3 / $15 per million, cache prices by Anthropic's multipliers.
METERED_COST = (25 * 3.0 + 12 * 15.0 + 3 * 3.0 * 1.25 + 7 * 3.0 * 0.1) / 1_000_000


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "keyrelay.gateway.access"]


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_billing_and_one_log_line_per_request(
    stack: Stack, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    caplog.set_level(logging.INFO, logger="keyrelay.gateway.access")
    for key in (OAUTH_KEY, API_KEY_KEY):
        async with stack.client(key) as client:
            if stream:
                async with client.messages.stream(**SIMPLE) as events:
                    await events.get_final_message()
            else:
                await client.messages.create(**SIMPLE)
    oauth, metered = access_lines(caplog)
    formatter = JsonFormatter()
    for record in (oauth, metered):
        line = formatter.format(record)
        for secret in (OAUTH_KEY, API_KEY_KEY, UPSTREAM_API_KEY, GATEWAY_TOKEN, ADMIN_TOKEN):
            assert secret not in line
        assert record.__dict__["request_id"].startswith("req_kr_")
        assert record.__dict__["status"] == 200
        assert record.__dict__["stream"] is stream
        assert record.__dict__["usage"] == {
            "input": 25, "output": 12, "cache_creation": 3, "cache_read": 7,
        }  # fmt: skip
    assert oauth.__dict__["billing"] == "included"
    assert oauth.__dict__["cost_usd"] == 0.0
    assert metered.__dict__["billing"] == "metered"
    assert metered.__dict__["cost_usd"] == pytest.approx(METERED_COST)

    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'keyrelay_gateway_requests_total{mode="included",route="oauth",status="200"} 1.0' in (
        metrics
    )
    assert 'keyrelay_gateway_requests_total{mode="metered",route="apikey",status="200"} 1.0' in (
        metrics
    )
    assert (
        'keyrelay_gateway_tokens_total{account="acct",billing="included",kind="input"} 25.0'
        in metrics
    )
    cost_line = next(
        line
        for line in metrics.splitlines()
        if line.startswith('keyrelay_gateway_cost_usd_total{account="-",billing="metered"}')
    )
    assert float(cost_line.split()[-1]) == pytest.approx(METERED_COST)
    assert "keyrelay_gateway_request_seconds_bucket" in metrics
    assert "keyrelay_gateway_upstream_seconds_bucket" in metrics


async def test_errors_are_counted_and_logged_without_secrets(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyrelay.gateway.access")
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        await http.post("/v1/messages", json=SIMPLE, headers={"x-api-key": "kr-not-a-key"})
        response = await http.post(
            "/v1/messages",
            content=b"{broken",
            headers={"x-api-key": PLAIN_KEY, "content-type": "application/json"},
        )
        request_id = response.json()["request_id"]
        metrics = (await http.get("/metrics")).text
    unknown, broken = access_lines(caplog)
    assert unknown.__dict__["status"] == 401
    assert "kr-not-a-key" not in JsonFormatter().format(unknown)
    assert broken.__dict__["status"] == 400
    assert broken.__dict__["request_id"] == request_id
    assert 'keyrelay_gateway_requests_total{mode="-",route="-",status="401"} 1.0' in metrics
    assert 'keyrelay_gateway_requests_total{mode="-",route="plain",status="400"}' in (metrics)


async def test_token_cache_metrics(stack: Stack) -> None:
    async with stack.client(PLAIN_KEY) as client:
        for _ in range(3):
            await client.messages.create(**SIMPLE)
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'keyrelay_gateway_token_cache_total{result="miss"} 1.0' in metrics
    assert 'keyrelay_gateway_token_cache_total{result="hit"} 2.0' in metrics
