"""Refresh failures against the real OAuth server: what disconnects and what never does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import SHORT_TTL, AuthFactory, rpc_code
from tests.integration.test_auth_flow import connect
from tests.support.events import EventWatcher
from tests.support.oidc import FaultMode, OidcServer
from tests.support.stack import admin_md, gateway_md

EV = auth_pb2.AccountEvent
FAST_FAILURES: dict[str, Any] = {
    "token_timeout_seconds": 1.0,
    "refresh_deadline_seconds": 3.0,
    "lock_ttl_seconds": 2.0,
    "refresh_backoff_base_seconds": 0.05,
    "refresh_backoff_cap_seconds": 0.2,
}


@pytest.fixture
def clean_faults(oidc: OidcServer) -> Iterator[OidcServer]:
    oidc.clear_fault()
    yield oidc
    oidc.clear_fault()


def get_token(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, account: str, **fields: int
) -> aio.UnaryUnaryCall[auth_pb2.GetTokenRequest, auth_pb2.GetTokenResponse]:
    return stub.GetToken(
        auth_pb2.GetTokenRequest(account_id=account, **fields), metadata=gateway_md()
    )


@pytest.mark.parametrize("mode", ["status503", "html502", "hang", "reset"])
async def test_transient_faults_keep_the_account_and_recover(
    make_auth: AuthFactory, clean_faults: OidcServer, mode: FaultMode
) -> None:
    oidc = clean_faults
    _, stub = await make_auth.start(**FAST_FAILURES)
    await connect(stub, "flaky", login=f"flaky-{mode}")
    watcher = EventWatcher(stub)
    first = await get_token(stub, "flaky")
    stats_before = oidc.stats()

    oidc.set_fault(mode, count=1)
    # A refresh is forced (an hour of validity is never left); it fails, and the
    # still-valid token is served instead of an error.
    served = await get_token(stub, "flaky", min_ttl_seconds=3600)
    assert served.access_token == first.access_token
    assert served.generation == first.generation
    account = await stub.GetAccount(
        auth_pb2.GetAccountRequest(account_id="flaky"), metadata=admin_md()
    )
    assert account.status == auth_pb2.Account.CONNECTED
    assert account.last_error
    await watcher.wait_for(lambda _: len(watcher.of("flaky", EV.REFRESH_FAILED)) == 1)

    await asyncio.sleep(0.25)  # past the backoff
    fresh = await get_token(stub, "flaky", min_ttl_seconds=3600)
    assert fresh.generation == first.generation + 1
    assert oidc.userinfo(fresh.access_token).status_code == 200
    account = await stub.GetAccount(
        auth_pb2.GetAccountRequest(account_id="flaky"), metadata=admin_md()
    )
    assert account.last_error == ""
    await watcher.wait_for(lambda _: len(watcher.of("flaky", EV.REFRESHED)) == 1)
    assert watcher.of("flaky", EV.DISCONNECTED) == []
    stats = oidc.stats()
    assert stats["reuse_detected"] == stats_before["reuse_detected"]
    assert stats["faulted_by_mode"].get(mode, 0) == stats_before["faulted_by_mode"].get(mode, 0) + 1
    await watcher.close()


async def test_expired_token_and_failing_endpoint_is_unavailable_then_recovers(
    make_auth: AuthFactory, clean_faults: OidcServer, short_oidc: OidcServer
) -> None:
    _, stub = await make_auth.start(oidc=short_oidc, skew_seconds=0.5, **FAST_FAILURES)
    await connect(stub, "expired", login="expired-user")
    await asyncio.sleep(SHORT_TTL + 0.2)
    short_oidc.set_fault("status503", count=-1)
    try:
        with pytest.raises(aio.AioRpcError) as info:
            await get_token(stub, "expired")
        assert rpc_code(info.value) == grpc.StatusCode.UNAVAILABLE
        assert "no valid token" in (info.value.details() or "")
    finally:
        short_oidc.clear_fault()
    await asyncio.sleep(0.25)
    token = await get_token(stub, "expired")
    assert short_oidc.userinfo(token.access_token).status_code == 200


async def test_revoked_grant_disconnects_exactly_once(
    make_auth: AuthFactory, clean_faults: OidcServer
) -> None:
    oidc = clean_faults
    _, stub = await make_auth.start(**FAST_FAILURES)
    await connect(stub, "revoked", login="revoked-user")
    watcher = EventWatcher(stub)
    assert oidc.revoke_user("revoked-user") >= 1

    calls = [get_token(stub, "revoked", min_ttl_seconds=3600) for _ in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        assert isinstance(result, aio.AioRpcError), result
        assert result.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "keyrelay connect revoked" in (result.details() or "")

    await watcher.wait_for(lambda _: len(watcher.of("revoked", EV.DISCONNECTED)) == 1)
    await asyncio.sleep(0.5)  # room for a wrong second event to show up
    disconnected = watcher.of("revoked", EV.DISCONNECTED)
    assert len(disconnected) == 1
    assert "invalid_grant" in disconnected[0].reason
    account = await stub.GetAccount(
        auth_pb2.GetAccountRequest(account_id="revoked"), metadata=gateway_md()
    )
    assert account.status == auth_pb2.Account.DISCONNECTED
    assert "invalid_grant" in account.disconnect_reason
    await watcher.close()


async def test_watch_events_resumes_after_an_event_id(make_auth: AuthFactory) -> None:
    _, stub = await make_auth.start()
    await connect(stub, "resume", login="resume-user")
    await get_token(stub, "resume", stale_generation=1)
    await stub.Disconnect(auth_pb2.DisconnectRequest(account_id="resume"), metadata=admin_md())
    watcher = EventWatcher(stub)
    await watcher.wait_for(lambda events: len(events) == 3)
    assert [e.kind for e in watcher.events] == [EV.CONNECTED, EV.REFRESHED, EV.DISCONNECTED]
    assert [e.generation for e in watcher.events] == [1, 2, 3]
    assert watcher.events[2].reason == "user"
    await watcher.close()

    resumed = EventWatcher(stub, after_event_id=watcher.events[0].event_id)
    await resumed.wait_for(lambda events: len(events) == 2)
    assert [e.kind for e in resumed.events] == [EV.REFRESHED, EV.DISCONNECTED]
    await resumed.close()
