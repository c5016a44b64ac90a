"""Callers of one refresh in one replica (DESIGN §1.2.1), against the real OAuth server:
a caller that goes away never cuts a token call in flight, a caller that joins another's
refresh still gets what it asked for, and shutdown waits for the call in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2
from tests.conftest import AuthFactory, rpc_code
from tests.integration.test_auth_flow import connect
from tests.support.oidc import OidcServer
from tests.support.stack import gateway_md

HOLD_MS = 1500  # the provider rotates at once and answers this much later


@pytest.fixture
def slow_answers(oidc: OidcServer) -> Iterator[OidcServer]:
    oidc.clear_fault()
    yield oidc
    oidc.clear_fault()


def refresh_calls(oidc: OidcServer) -> int:
    return int(oidc.stats()["token_calls"].get("refresh_token", 0))


def request(account: str, **fields: int) -> auth_pb2.GetTokenRequest:
    return auth_pb2.GetTokenRequest(account_id=account, **fields)


async def until_the_provider_has_it(oidc: OidcServer, calls_before: int) -> None:
    deadline = time.monotonic() + 10
    while refresh_calls(oidc) == calls_before:
        assert time.monotonic() < deadline, "the refresh never reached the provider"
        await asyncio.sleep(0.02)


async def test_a_caller_that_goes_away_never_cuts_the_call_in_flight(
    make_auth: AuthFactory, slow_answers: OidcServer
) -> None:
    oidc = slow_answers
    _, stub = await make_auth.start()
    account = await connect(stub, "cancelled", login="cancelled-user")
    stats = oidc.stats()
    calls = refresh_calls(oidc)
    oidc.set_fault("delay_response", delay_ms=HOLD_MS, count=1)

    with pytest.raises(aio.AioRpcError) as gone:
        await stub.GetToken(
            request("cancelled", stale_generation=account.generation),
            metadata=gateway_md(),
            timeout=0.3,
        )
    assert rpc_code(gone.value) is grpc.StatusCode.DEADLINE_EXCEEDED

    # The attempt carried on: the rotated tokens were kept, no second provider call.
    deadline = time.monotonic() + 10
    while True:
        token = await stub.GetToken(request("cancelled"), metadata=gateway_md())
        if token.generation == account.generation + 1:
            break
        assert time.monotonic() < deadline, "the refresh of the cancelled caller was lost"
        await asyncio.sleep(0.1)
    assert refresh_calls(oidc) == calls + 1
    assert oidc.stats()["reuse_detected"] == stats["reuse_detected"]
    assert oidc.userinfo(token.access_token).status_code == 200


async def test_joining_callers_get_what_each_asked_for(
    make_auth: AuthFactory, slow_answers: OidcServer
) -> None:
    """Three callers, one refresh in flight. The one that reported the same rejected token
    is answered by it; the one that needs an hour left (the provider's tokens last an
    hour, minus the time the answer took) gets an attempt of its own."""
    oidc = slow_answers
    _, stub = await make_auth.start()
    account = await connect(stub, "joined", login="joined-user")
    calls = refresh_calls(oidc)
    oidc.set_fault("delay_response", delay_ms=HOLD_MS, count=1)
    stale = request("joined", stale_generation=account.generation)
    first = asyncio.ensure_future(stub.GetToken(stale, metadata=gateway_md(), timeout=30))
    await until_the_provider_has_it(oidc, calls)
    same_report = stub.GetToken(stale, metadata=gateway_md(), timeout=30)
    needs_an_hour = stub.GetToken(
        request("joined", min_ttl_seconds=3600), metadata=gateway_md(), timeout=30
    )
    a, b, c = await asyncio.gather(first, same_report, needs_an_hour)

    assert a.generation == b.generation == account.generation + 1
    assert a.access_token == b.access_token
    # Its own attempt: a second refresh, whose token has the hour it asked for.
    assert c.generation == account.generation + 2
    assert c.expires_at >= time.time() + 3600 - 5
    assert refresh_calls(oidc) == calls + 2
    assert oidc.userinfo(c.access_token).status_code == 200


async def test_shutdown_waits_for_the_call_in_flight(
    make_auth: AuthFactory, slow_answers: OidcServer
) -> None:
    oidc = slow_answers
    running, stub = await make_auth.start()
    _, reader = await make_auth.start()
    account = await connect(stub, "draining", login="draining-user")
    calls = refresh_calls(oidc)
    reuse = oidc.stats()["reuse_detected"]
    oidc.set_fault("delay_response", delay_ms=HOLD_MS, count=1)
    call = asyncio.ensure_future(
        stub.GetToken(
            request("draining", stale_generation=account.generation),
            metadata=gateway_md(),
            timeout=30,
        )
    )
    await until_the_provider_has_it(oidc, calls)
    started = time.monotonic()
    await running.stop(grace=0.1)  # RPCs get 0.1 s; the refresh gets its deadline
    assert time.monotonic() - started >= HOLD_MS / 1000 - 0.3
    await asyncio.gather(call, return_exceptions=True)

    token = await reader.GetToken(request("draining"), metadata=gateway_md())
    assert token.generation == account.generation + 1
    assert refresh_calls(oidc) == calls + 1
    assert oidc.stats()["reuse_detected"] == reuse
    assert oidc.userinfo(token.access_token).status_code == 200


async def test_no_new_token_call_starts_while_stopping(
    make_auth: AuthFactory, oidc: OidcServer
) -> None:
    running, stub = await make_auth.start()
    account = await connect(stub, "stopping", login="stopping-user")
    calls = refresh_calls(oidc)
    await running.service.drain()  # what SIGTERM does first
    token = await running.service.get_token("stopping", stale_generation=account.generation)
    assert token.generation == account.generation  # the current, still valid token
    assert refresh_calls(oidc) == calls
