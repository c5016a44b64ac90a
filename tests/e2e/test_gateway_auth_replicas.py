"""The gateway's gRPC client over two auth replicas: failover and a resumed event stream."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.config import parse_gateway_config
from tests.conftest import AuthFactory
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import PLAIN_KEY, gateway_config_data, gateway_env, start_gateway
from tests.support.stack import gateway_md

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


async def wait_evicted(tokens: Any) -> None:
    for _ in range(500):
        if "acct" not in tokens._cache:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the REFRESHED event never reached the gateway")


@pytest.mark.parametrize("saw_an_event", [True, False])
@pytest.mark.parametrize("stopped", [0, 1])
async def test_failover_and_event_stream_resume_across_auth_replicas(
    make_auth: AuthFactory, upstream: FakeUpstream, stopped: int, saw_an_event: bool
) -> None:
    """One of the two runs stops the replica that carries the event stream.

    Without an event seen before the stop, the stream's cursor comes from its
    initial metadata: resuming must still deliver what happened in between.
    """
    # Refreshes are forced back to back here: no forced-refresh cool-down.
    servers = [await make_auth.start(forced_refresh_cooldown_seconds=0) for _ in range(2)]
    survivor_stub = servers[1 - stopped][1]
    await connect(survivor_stub, "acct", login="replica-user")
    data = gateway_config_data(upstream.url, None)
    ports = ",".join(f"127.0.0.1:{running.port}" for running, _ in servers)
    data["gateway"]["auth"] = {
        "target": f"ipv4:{ports}",
        "token": {"env": "KR_GATEWAY_TOKEN"},
        "timeout_seconds": 10,
    }
    gateway = await start_gateway(parse_gateway_config(data, gateway_env()))
    tokens = gateway.app.tokens
    assert tokens is not None

    async def refresh() -> auth_pb2.GetTokenResponse:
        current = await survivor_stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="acct"), metadata=gateway_md()
        )
        reply: auth_pb2.GetTokenResponse = await survivor_stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="acct", stale_generation=current.generation),
            metadata=gateway_md(),
        )
        return reply

    try:
        async with anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key=PLAIN_KEY, max_retries=0
        ) as client:
            await client.messages.create(**SIMPLE)
            if saw_an_event:
                await refresh()
                await wait_evicted(tokens)
                await client.messages.create(**SIMPLE)
            assert "acct" in tokens._cache
            assert tokens._last_event_id  # from an event, or from the stream's metadata

            await servers[stopped][0].stop(grace=0.1)
            # Refreshed at once, maybe before the gateway's stream reconnects:
            # resuming after its cursor still delivers the event.
            refreshed = await refresh()
            await wait_evicted(tokens)
            await client.messages.create(**SIMPLE)
        assert upstream.last().header("authorization") == f"Bearer {refreshed.access_token}"
    finally:
        await gateway.stop()
