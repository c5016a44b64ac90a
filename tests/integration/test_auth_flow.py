"""End to end against the real OAuth server: connect, get tokens, use them, disconnect."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import rpc_code
from tests.support.oidc import OidcServer, PasteForm, as_pasted, complete_login
from tests.support.stack import PROVIDER, admin_md, gateway_md


async def connect(
    stub: auth_pb2_grpc.AuthServiceAsyncStub,
    account: str,
    *,
    form: PasteForm = "url",
    login: str = "alice",
) -> auth_pb2.Account:
    flow = await stub.StartFlow(
        auth_pb2.StartFlowRequest(account_id=account, provider=PROVIDER), metadata=admin_md()
    )
    pasted = as_pasted(complete_login(flow.authorize_url, login=login), form)
    account_msg: auth_pb2.Account = await stub.SubmitCode(
        auth_pb2.SubmitCodeRequest(flow_id=flow.flow_id, code=pasted), metadata=admin_md()
    )
    return account_msg


@pytest.mark.parametrize("form", ["url", "code#state", "bare"])
async def test_connect_then_token_works_at_the_provider(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, oidc: OidcServer, form: PasteForm
) -> None:
    account = await connect(auth_stub, "acct-1", form=form)
    assert account.status == auth_pb2.Account.CONNECTED
    assert account.provider == PROVIDER
    assert "openid" in account.scopes
    assert account.generation == 1

    token = await auth_stub.GetToken(
        auth_pb2.GetTokenRequest(account_id="acct-1"), metadata=gateway_md()
    )
    assert token.token_type == "Bearer"
    assert token.generation == 1
    response = oidc.userinfo(token.access_token)
    assert response.status_code == 200, response.text
    assert response.json()["sub"] == "alice"


async def test_authorize_url_carries_pkce_s256_and_state(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    flow = await auth_stub.StartFlow(
        auth_pb2.StartFlowRequest(account_id="acct-2", provider=PROVIDER), metadata=admin_md()
    )
    query = parse_qs(urlsplit(flow.authorize_url).query)
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 32
    assert query["response_type"] == ["code"]
    assert query["prompt"] == ["consent"]


async def test_get_token_serves_the_cached_token_without_refreshing(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, oidc: OidcServer
) -> None:
    await connect(auth_stub, "acct-3")
    before = oidc.stats()["token_calls"].get("refresh_token", 0)
    tokens = {
        (
            await auth_stub.GetToken(
                auth_pb2.GetTokenRequest(account_id="acct-3"), metadata=gateway_md()
            )
        ).access_token
        for _ in range(5)
    }
    assert len(tokens) == 1
    assert oidc.stats()["token_calls"].get("refresh_token", 0) == before


async def test_min_ttl_above_remaining_lifetime_refreshes(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, oidc: OidcServer
) -> None:
    await connect(auth_stub, "acct-4")
    first = await auth_stub.GetToken(
        auth_pb2.GetTokenRequest(account_id="acct-4"), metadata=gateway_md()
    )
    # The provider issues 1-hour tokens, so an hour left is never there after the exchange.
    second = await auth_stub.GetToken(
        auth_pb2.GetTokenRequest(account_id="acct-4", min_ttl_seconds=3600),
        metadata=gateway_md(),
    )
    assert second.generation == first.generation + 1
    assert second.access_token != first.access_token
    assert oidc.userinfo(second.access_token).status_code == 200


async def test_stale_generation_refreshes_once(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, oidc: OidcServer
) -> None:
    await connect(auth_stub, "acct-5")
    first = await auth_stub.GetToken(
        auth_pb2.GetTokenRequest(account_id="acct-5"), metadata=gateway_md()
    )
    rejected = auth_pb2.GetTokenRequest(account_id="acct-5", stale_generation=first.generation)
    second = await auth_stub.GetToken(rejected, metadata=gateway_md())
    assert second.generation == first.generation + 1
    # The same report again: a newer generation exists already, so no second refresh.
    third = await auth_stub.GetToken(rejected, metadata=gateway_md())
    assert third.generation == second.generation
    assert third.access_token == second.access_token


async def test_disconnect_revokes_and_reports(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, oidc: OidcServer
) -> None:
    await connect(auth_stub, "acct-6")
    token = await auth_stub.GetToken(
        auth_pb2.GetTokenRequest(account_id="acct-6"), metadata=gateway_md()
    )
    account = await auth_stub.Disconnect(
        auth_pb2.DisconnectRequest(account_id="acct-6"), metadata=admin_md()
    )
    assert account.status == auth_pb2.Account.DISCONNECTED
    assert account.disconnect_reason == "user"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth_stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="acct-6"), metadata=gateway_md()
        )
    assert rpc_code(info.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "keyrelay connect acct-6" in (info.value.details() or "")
    # Revoking the refresh token at the provider revoked the grant and its access token.
    assert oidc.userinfo(token.access_token).status_code == 401

    listed = await auth_stub.ListAccounts(auth_pb2.ListAccountsRequest(), metadata=admin_md())
    assert [(a.account_id, a.status) for a in listed.accounts] == [
        ("acct-6", auth_pb2.Account.DISCONNECTED)
    ]

    reconnected = await connect(auth_stub, "acct-6")
    assert reconnected.status == auth_pb2.Account.CONNECTED
    assert reconnected.generation > account.generation
