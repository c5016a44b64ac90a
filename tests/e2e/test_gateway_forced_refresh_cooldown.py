"""An upstream that refuses every token: forced refreshes wait out a cool-down.

DESIGN §1.2.1: reports of a rejected token (``GetToken(stale_generation=…)``,
sent by the gateway after an upstream 401) force at most one refresh of an
account per ``forced_refresh_cooldown_seconds`` (the first always goes
through); within the cool-down the current token is served. So an upstream
that rejects every token turns a flood of requests into a flood of 401s, not
into one provider call per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
from prometheus_client import REGISTRY

from tests.conftest import AuthFactory
from tests.e2e.conftest import Stack
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import PLAIN_KEY, gateway_config, start_gateway
from tests.support.oidc import OidcServer

SIMPLE = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
REQUESTS = 200
BATCH = 20
REFUSED_METRIC = "keyrelay_auth_forced_refreshes_refused_total"


def refreshes(oidc: OidcServer) -> int:
    """refresh_token calls the provider has seen (the OAuth server is per session)."""
    return int(oidc.stats()["token_calls"].get("refresh_token", 0))


def refused() -> float:
    return REGISTRY.get_sample_value(REFUSED_METRIC) or 0.0


@asynccontextmanager
async def refusing_stack(
    make_auth: AuthFactory, upstream: FakeUpstream, **auth: Any
) -> AsyncIterator[Stack]:
    """Auth service (with ``auth`` overrides), a connected account, a gateway in
    front of an upstream that answers every request 401."""
    server, stub = await make_auth.start(**auth)
    await connect(stub, "acct", login="gateway-user")
    gateway = await start_gateway(gateway_config(upstream.url, server.port))
    stack = Stack(server, stub, upstream, gateway)
    upstream.refuse_all = True
    try:
        yield stack
    finally:
        await stack.gateway.stop()


async def one_batch(client: anthropic.AsyncAnthropic) -> list[BaseException | object]:
    return await asyncio.gather(
        *(client.messages.create(**SIMPLE) for _ in range(BATCH)),  # type: ignore[call-overload]
        return_exceptions=True,
    )


def assert_all_refused(results: list[BaseException | object]) -> None:
    """Every client got the upstream's 401 (the gateway passes the retry's answer through)."""
    assert len(results) == REQUESTS
    for result in results:
        assert isinstance(result, anthropic.AuthenticationError), repr(result)
        assert result.status_code == 401
        assert isinstance(result.body, dict)
        assert result.body["error"]["type"] == "authentication_error"


async def test_a_flood_of_401s_costs_one_provider_refresh_per_cooldown(
    make_auth: AuthFactory, upstream: FakeUpstream, oidc: OidcServer
) -> None:
    async with refusing_stack(make_auth, upstream) as stack:  # default cool-down: 30 s
        refreshes_before, refused_before = refreshes(oidc), refused()
        results: list[BaseException | object] = []
        async with stack.client(PLAIN_KEY) as client:
            for _ in range(REQUESTS // BATCH):
                results += await one_batch(client)
        provider_refreshes = refreshes(oidc) - refreshes_before
        refused_after = refused()
    assert_all_refused(results)
    # The first forced refresh goes through; every later report within 30 s is refused.
    assert provider_refreshes == 1, (
        f"{provider_refreshes} provider refreshes for {REQUESTS} refused requests"
    )
    assert refused_after > refused_before
    # A retry only with a newer token: the first round's (one refresh), none after it.
    assert len(upstream.only()) <= REQUESTS + BATCH


async def test_a_short_cooldown_allows_one_forced_refresh_per_window(
    make_auth: AuthFactory, upstream: FakeUpstream, oidc: OidcServer
) -> None:
    cooldown = 1.0
    async with refusing_stack(
        make_auth, upstream, forced_refresh_cooldown_seconds=cooldown
    ) as stack:
        refreshes_before, refused_before = refreshes(oidc), refused()
        results: list[BaseException | object] = []
        async with stack.client(PLAIN_KEY) as client:
            started = time.monotonic()
            for index in range(REQUESTS // BATCH):
                # A batch every 0.25 s: the last starts 2.25 s in, so the run spans ~2.5 s.
                await asyncio.sleep(max(0.0, started + index * 0.25 - time.monotonic()))
                results += await one_batch(client)
            elapsed = time.monotonic() - started
        provider_refreshes = refreshes(oidc) - refreshes_before
        refused_after = refused()
    assert_all_refused(results)
    # At most one forced refresh per cool-down window (the first at once; 3 windows
    # in a ~2.3 s run), never one per request; and the cool-down ends: a report made
    # after it forces a refresh again.
    windows = math.floor(elapsed / cooldown) + 1
    assert 2 <= provider_refreshes <= windows, (
        f"{provider_refreshes} provider refreshes in {elapsed:.2f} s "
        f"for {REQUESTS} refused requests"
    )
    assert refused_after > refused_before
