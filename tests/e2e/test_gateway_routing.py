"""Routes (oauth / api_key / auto), the token cache, and the upstream-401 retry."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import pytest

from keyrelay.auth.v1 import auth_pb2
from tests.e2e.conftest import Stack
from tests.support.fake_upstream import Scripted
from tests.support.gateway import (
    API_KEY_KEY,
    AUTO_KEY,
    OAUTH_KEY,
    PLAIN_KEY,
    UPSTREAM_API_KEY,
    gateway_config,
    start_gateway,
)
from tests.support.stack import admin_md, gateway_md

SIMPLE = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


async def token_of(stack: Stack) -> auth_pb2.GetTokenResponse:
    reply: auth_pb2.GetTokenResponse = await stack.auth_stub.GetToken(
        auth_pb2.GetTokenRequest(account_id="acct"), metadata=gateway_md()
    )
    return reply


async def test_routes_use_the_credential_they_name(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key lying in the environment is never picked up implicitly.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-the-environment")
    await stack.restart_gateway()
    token = (await token_of(stack)).access_token
    for key, auth, api_key in (
        (OAUTH_KEY, f"Bearer {token}", None),
        (API_KEY_KEY, None, UPSTREAM_API_KEY),
        (AUTO_KEY, f"Bearer {token}", None),  # connected: OAuth
    ):
        async with stack.client(key) as client:
            await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
        seen = stack.upstream.last()
        assert seen.header("authorization") == auth, key
        assert seen.header("x-api-key") == api_key, key
        assert all("sk-from-the-environment" not in v for _, v in seen.headers)

    await stack.auth_stub.Disconnect(
        auth_pb2.DisconnectRequest(account_id="acct"), metadata=admin_md()
    )
    await wait_until_evicted(stack)
    async with stack.client(AUTO_KEY) as client:
        await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
    seen = stack.upstream.last()
    assert seen.header("x-api-key") == UPSTREAM_API_KEY  # disconnected: the explicit key
    assert seen.header("authorization") is None
    async with stack.client(OAUTH_KEY) as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
    assert "keyrelay connect acct" in str(info.value)


async def wait_until_evicted(stack: Stack) -> None:
    tokens = stack.gateway.app.tokens
    assert tokens is not None
    for _ in range(500):
        if "acct" not in tokens._cache:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the DISCONNECTED event never evicted the cached token")


async def test_cold_worker_fetches_once_then_serves_from_cache(stack: Stack) -> None:
    tokens = stack.gateway.app.tokens
    assert tokens is not None
    async with stack.client(PLAIN_KEY) as client:
        await asyncio.gather(*(client.messages.create(**SIMPLE) for _ in range(40)))  # type: ignore[call-overload]
        assert tokens.rpcs == 1
        for _ in range(20):
            await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
    assert tokens.rpcs == 1
    assert tokens.hits >= 20
    assert len(stack.upstream.requests) == 60


async def test_a_token_stale_for_the_worker_but_fresh_for_the_auth_service_is_refreshed(
    stack: Stack,
) -> None:
    """The worker asks for ``min_ttl = its skew + 1``, so it never re-fetches a token
    that the auth service (with a smaller skew) would hand back unchanged."""
    current = await token_of(stack)
    remaining = current.expires_at - time.time()
    # Stale for this worker in about two seconds, fresh for the auth service for an hour.
    await stack.restart_gateway(token_skew_seconds=remaining - 2)
    tokens = stack.gateway.app.tokens
    assert tokens is not None
    async with stack.client(PLAIN_KEY) as client:
        await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
        await asyncio.sleep(3)
        for _ in range(10):
            await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
    # One fetch at start; one refresh once the token was stale here: not one per request.
    assert tokens.rpcs == 2
    assert (await token_of(stack)).generation == current.generation + 1
    sent = {r.header("authorization") for r in stack.upstream.requests[-10:]}
    assert len(sent) == 1


async def test_refresh_elsewhere_evicts_and_the_next_request_uses_the_new_token(
    stack: Stack,
) -> None:
    tokens = stack.gateway.app.tokens
    assert tokens is not None
    async with stack.client(PLAIN_KEY) as client:
        await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
        first = await token_of(stack)
        refreshed = await stack.auth_stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="acct", stale_generation=first.generation),
            metadata=gateway_md(),
        )
        await wait_until_evicted(stack)
        await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
    assert stack.upstream.last().header("authorization") == f"Bearer {refreshed.access_token}"
    assert tokens.rpcs == 2


async def test_upstream_401_refreshes_once_and_retries(stack: Stack) -> None:
    tokens = stack.gateway.app.tokens
    assert tokens is not None
    first = await token_of(stack)
    stack.upstream.refused_tokens.add(first.access_token)
    async with stack.client(PLAIN_KEY) as client:
        message = await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
        assert message.content[0].type == "text"
        async with client.messages.stream(**SIMPLE) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_message()
    assert final.stop_reason == "end_turn"
    now = await token_of(stack)
    assert now.generation == first.generation + 1
    auths = [r.header("authorization") for r in stack.upstream.requests]
    assert auths == [
        f"Bearer {first.access_token}",  # refused
        f"Bearer {now.access_token}",  # the retry
        f"Bearer {now.access_token}",  # the stream: cached new token
    ]


async def test_upstream_401_twice_is_passed_through(stack: Stack) -> None:
    stack.upstream.script = [
        _scripted_401(),
        _scripted_401(),
    ]
    async with stack.client(PLAIN_KEY) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
    assert len(stack.upstream.requests) == 2


def _scripted_401() -> Scripted:
    body = {"type": "error", "error": {"type": "authentication_error", "message": "expired"}}
    return Scripted(status=401, body=json.dumps(body).encode())


async def test_auth_service_down_is_503_and_cached_tokens_keep_working(
    stack: Stack,
) -> None:
    async with stack.client(PLAIN_KEY) as client:
        await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
    await stack.auth.stop(grace=0.1)
    async with stack.client(PLAIN_KEY) as client:
        await client.messages.create(**SIMPLE)  # type: ignore[call-overload]  # cached
    cold = await start_gateway(gateway_config(stack.upstream.url, stack.auth.port))
    try:
        async with anthropic.AsyncAnthropic(
            base_url=cold.url, api_key=PLAIN_KEY, max_retries=0
        ) as client:
            with pytest.raises(anthropic.APIStatusError) as info:
                await client.messages.create(**SIMPLE)  # type: ignore[call-overload]
        assert info.value.status_code == 503
        assert "auth service" in str(info.value)
    finally:
        await cold.stop()
