"""Every malformed or unauthorised call gets its documented status and changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import rpc_code
from tests.integration.test_auth_flow import connect
from tests.support.oidc import OidcServer, complete_login
from tests.support.redis_server import RedisServer
from tests.support.stack import ADMIN_TOKEN, GATEWAY_TOKEN, PROVIDER, admin_md, gateway_md

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    return rpc_code(info.value), info.value.details() or ""


async def start(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, account: str
) -> auth_pb2.StartFlowResponse:
    flow: auth_pb2.StartFlowResponse = await stub.StartFlow(
        auth_pb2.StartFlowRequest(account_id=account, provider=PROVIDER), metadata=admin_md()
    )
    return flow


def submit(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, flow_id: str, code: str, state: str = ""
) -> Awaitable[auth_pb2.Account]:
    return stub.SubmitCode(
        auth_pb2.SubmitCodeRequest(flow_id=flow_id, code=code, state=state), metadata=admin_md()
    )


@pytest.mark.parametrize(
    ("pasted", "fragment"),
    [
        ("", "no authorization code"),
        ("   \n", "no authorization code"),
        ("abc def", "space"),
        ("code#", "#"),
        ("#state", "#"),
        ("a#b#c", "#"),
        ("http://127.0.0.1:8765/callback?state=x", "code"),
        ("http://127.0.0.1:8765/callback?code=a&code=b", "code"),
        (
            "http://127.0.0.1:8765/callback?error=access_denied&error_description=nope",
            "access_denied",
        ),
        ("x" * 9000, "9000 characters"),
        ("caf\u00e9", "character"),
    ],
)
async def test_malformed_pasted_codes_leave_the_flow_usable(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, pasted: str, fragment: str
) -> None:
    flow = await start(auth_stub, "bad-paste")
    code, details = await status_of(submit(auth_stub, flow.flow_id, pasted))
    assert code == INVALID
    assert fragment in details.lower()
    # Nothing consumed: the same flow still completes.
    redirect = complete_login(flow.authorize_url)
    account = await submit(auth_stub, flow.flow_id, redirect)
    assert account.status == auth_pb2.Account.CONNECTED


async def test_state_mismatch_is_rejected_without_using_the_flow(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, oidc: OidcServer
) -> None:
    flow = await start(auth_stub, "bad-state")
    redirect = complete_login(flow.authorize_url)
    code_value = parse_qs(urlsplit(redirect).query)["code"][0]
    calls_before = oidc.stats()["token_calls"].get("authorization_code", 0)
    status, details = await status_of(submit(auth_stub, flow.flow_id, f"{code_value}#wrongstate"))
    assert status == INVALID
    assert "state" in details
    status, _ = await status_of(submit(auth_stub, flow.flow_id, code_value, state="wrongstate"))
    assert status == INVALID
    # The code never went to the provider, so it is still good for this flow.
    assert oidc.stats()["token_calls"].get("authorization_code", 0) == calls_before
    account = await submit(auth_stub, flow.flow_id, redirect)
    assert account.status == auth_pb2.Account.CONNECTED


async def test_a_flow_is_single_use(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
    flow = await start(auth_stub, "single-use")
    redirect = complete_login(flow.authorize_url)
    await submit(auth_stub, flow.flow_id, redirect)
    status, details = await status_of(submit(auth_stub, flow.flow_id, redirect))
    assert status == NOT_FOUND
    assert "already used" in details


async def test_cancelled_and_unknown_flows(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
    flow = await start(auth_stub, "cancelled")
    await auth_stub.CancelFlow(
        auth_pb2.CancelFlowRequest(flow_id=flow.flow_id), metadata=admin_md()
    )
    assert (await status_of(submit(auth_stub, flow.flow_id, "somecode")))[0] == NOT_FOUND
    again = auth_stub.CancelFlow(
        auth_pb2.CancelFlowRequest(flow_id=flow.flow_id), metadata=admin_md()
    )
    assert (await status_of(again))[0] == NOT_FOUND
    for flow_id in ("", "nope", "x" * 500, "../../etc", "A" * 32):
        assert (await status_of(submit(auth_stub, flow_id, "somecode")))[0] == NOT_FOUND


async def test_expired_flow(
    redis_server: RedisServer, prefix: str, auth_stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    flow = await start(auth_stub, "expired")
    with redis_server.client() as client:
        assert client.pttl(f"{prefix}flow:{flow.flow_id}") > 590_000  # the 10-minute default
        client.pexpire(f"{prefix}flow:{flow.flow_id}", 1)
    await asyncio.sleep(0.01)
    status, details = await status_of(submit(auth_stub, flow.flow_id, "somecode"))
    assert status == NOT_FOUND
    assert "expired" in details


async def test_code_refused_by_the_provider(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    flow = await start(auth_stub, "refused")
    status, details = await status_of(submit(auth_stub, flow.flow_id, "not-a-real-code"))
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert "invalid_grant" in details
    assert "start a new flow" in details


@pytest.mark.parametrize(
    "request_",
    [
        auth_pb2.StartFlowRequest(account_id="ok", provider="nope"),
        auth_pb2.StartFlowRequest(account_id="ok", provider=""),
    ],
)
async def test_unknown_provider(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, request_: auth_pb2.StartFlowRequest
) -> None:
    status, details = await status_of(auth_stub.StartFlow(request_, metadata=admin_md()))
    assert status == NOT_FOUND
    assert PROVIDER in details  # names what is configured


@pytest.mark.parametrize(
    "account_id", ["", " ", "a b", "-lead", "x" * 200, "a/b", "caf\u00e9", "a\nb"]
)
async def test_bad_account_ids(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, account_id: str
) -> None:
    calls: list[Awaitable[Any]] = [
        auth_stub.StartFlow(
            auth_pb2.StartFlowRequest(account_id=account_id, provider=PROVIDER), metadata=admin_md()
        ),
        auth_stub.GetToken(auth_pb2.GetTokenRequest(account_id=account_id), metadata=gateway_md()),
        auth_stub.GetAccount(
            auth_pb2.GetAccountRequest(account_id=account_id), metadata=admin_md()
        ),
        auth_stub.Disconnect(
            auth_pb2.DisconnectRequest(account_id=account_id), metadata=admin_md()
        ),
    ]
    for call in calls:
        status, details = await status_of(call)
        assert status == INVALID, details


async def test_redirect_uri_not_allowed(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
    call = auth_stub.StartFlow(
        auth_pb2.StartFlowRequest(
            account_id="ok", provider=PROVIDER, redirect_uri="https://evil.example/cb"
        ),
        metadata=admin_md(),
    )
    status, details = await status_of(call)
    assert status == INVALID
    assert "redirect_uri" in details


async def test_unknown_accounts(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
    for call in (
        auth_stub.GetToken(auth_pb2.GetTokenRequest(account_id="ghost"), metadata=gateway_md()),
        auth_stub.GetAccount(auth_pb2.GetAccountRequest(account_id="ghost"), metadata=admin_md()),
        auth_stub.Disconnect(auth_pb2.DisconnectRequest(account_id="ghost"), metadata=admin_md()),
    ):
        assert (await status_of(call))[0] == NOT_FOUND
    listed = await auth_stub.ListAccounts(auth_pb2.ListAccountsRequest(), metadata=admin_md())
    assert list(listed.accounts) == []


async def test_bad_get_token_arguments(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
    await connect(auth_stub, "args")
    for request in (
        auth_pb2.GetTokenRequest(account_id="args", min_ttl_seconds=-1),
        auth_pb2.GetTokenRequest(account_id="args", min_ttl_seconds=10**9),
        auth_pb2.GetTokenRequest(account_id="args", stale_generation=-5),
    ):
        status, _ = await status_of(auth_stub.GetToken(request, metadata=gateway_md()))
        assert status == INVALID


async def test_bad_event_cursor(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
    stream = auth_stub.WatchEvents(
        auth_pb2.WatchEventsRequest(after_event_id="not-an-id"), metadata=gateway_md()
    )
    with pytest.raises(aio.AioRpcError) as info:
        async for _ in stream:
            pass
    assert rpc_code(info.value) == INVALID


def metadata_variants() -> list[tuple[tuple[str, str], ...]]:
    return [
        (),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer wrong-token-of-some-length"),),
        (("authorization", f"Basic {ADMIN_TOKEN}"),),
        (("authorization", ADMIN_TOKEN),),
        (("x-api-key", ADMIN_TOKEN),),
    ]


@pytest.mark.parametrize("metadata", metadata_variants())
async def test_callers_without_a_valid_token_are_rejected(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    for call in (
        auth_stub.ListAccounts(auth_pb2.ListAccountsRequest(), metadata=metadata),
        auth_stub.GetToken(auth_pb2.GetTokenRequest(account_id="a"), metadata=metadata),
        auth_stub.StartFlow(
            auth_pb2.StartFlowRequest(account_id="a", provider=PROVIDER), metadata=metadata
        ),
    ):
        status, details = await status_of(call)
        assert status == grpc.StatusCode.UNAUTHENTICATED
        assert ADMIN_TOKEN not in details


async def test_gateway_role_is_limited(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
    md = gateway_md()
    denied: list[Awaitable[Any]] = [
        auth_stub.StartFlow(
            auth_pb2.StartFlowRequest(account_id="a", provider=PROVIDER), metadata=md
        ),
        auth_stub.SubmitCode(auth_pb2.SubmitCodeRequest(flow_id="x" * 32, code="c"), metadata=md),
        auth_stub.CancelFlow(auth_pb2.CancelFlowRequest(flow_id="x" * 32), metadata=md),
        auth_stub.Disconnect(auth_pb2.DisconnectRequest(account_id="a"), metadata=md),
        auth_stub.ListAccounts(auth_pb2.ListAccountsRequest(), metadata=md),
    ]
    for call in denied:
        status, details = await status_of(call)
        assert status == grpc.StatusCode.PERMISSION_DENIED
        assert GATEWAY_TOKEN not in details
    # Allowed calls reach the service (and fail there for their own reasons).
    status, _ = await status_of(
        auth_stub.GetAccount(auth_pb2.GetAccountRequest(account_id="a"), metadata=md)
    )
    assert status == NOT_FOUND
    listed = await auth_stub.ListAccounts(auth_pb2.ListAccountsRequest(), metadata=admin_md())
    assert list(listed.accounts) == []
