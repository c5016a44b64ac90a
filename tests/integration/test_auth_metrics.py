"""The auth service's Prometheus metrics and log levels, against the real service.

The metrics live in prometheus_client's default registry, shared by every
server this test process starts, so each test compares before and after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, generate_latest

from keyrelay.auth.config import parse_auth_config
from keyrelay.auth.rpc.server import start_server
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import AuthFactory, rpc_code
from tests.integration.test_auth_flow import connect
from tests.support.oidc import CONFIDENTIAL_CLIENT_ID, OidcServer, complete_login
from tests.support.stack import PROVIDER, admin_md, auth_config_data, auth_env, gateway_md


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counts:
    """Samples taken now; ``delta`` says how much each grew since."""

    def __init__(self, *keys: tuple[str, dict[str, str]]) -> None:
        self._keys = keys
        self._before = [sample(name, **labels) for name, labels in keys]

    def delta(self) -> list[float]:
        return [
            sample(name, **labels) - before
            for (name, labels), before in zip(self._keys, self._before, strict=True)
        ]


def rpcs(method: str, code: str) -> tuple[str, dict[str, str]]:
    return "keyrelay_auth_rpcs_total", {"method": method, "code": code}


def refreshes(outcome: str) -> tuple[str, dict[str, str]]:
    return "keyrelay_auth_refreshes_total", {"provider": PROVIDER, "outcome": outcome}


def events(kind: str) -> tuple[str, dict[str, str]]:
    return "keyrelay_auth_events_total", {"kind": kind}


def token_calls(call: str) -> tuple[str, dict[str, str]]:
    return "keyrelay_auth_token_endpoint_seconds_count", {"provider": PROVIDER, "call": call}


async def get_token(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, account: str, stale: int = 0
) -> auth_pb2.GetTokenResponse:
    reply: auth_pb2.GetTokenResponse = await stub.GetToken(
        auth_pb2.GetTokenRequest(account_id=account, stale_generation=stale),
        metadata=gateway_md(),
    )
    return reply


async def eventually(check: Callable[[], Any], attempts: int = 200) -> None:
    for _ in range(attempts):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def test_rpcs_are_counted_by_method_and_status(
    make_auth: AuthFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyrelay")
    counts = Counts(
        rpcs("GetToken", "OK"),
        rpcs("GetToken", "UNAUTHENTICATED"),
        rpcs("GetAccount", "NOT_FOUND"),
        rpcs("StartFlow", "OK"),
        rpcs("SubmitCode", "OK"),
        ("keyrelay_auth_rpc_seconds_count", {"method": "GetToken"}),
    )
    running, stub = await make_auth.start()
    await connect(stub, "metrics-rpc")
    await get_token(stub, "metrics-rpc")
    with pytest.raises(aio.AioRpcError) as unauthenticated:
        await stub.GetToken(auth_pb2.GetTokenRequest(account_id="metrics-rpc"))
    assert rpc_code(unauthenticated.value) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(aio.AioRpcError) as missing:
        await stub.GetAccount(
            auth_pb2.GetAccountRequest(account_id="never-connected"), metadata=admin_md()
        )
    assert rpc_code(missing.value) == grpc.StatusCode.NOT_FOUND
    async with aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    assert counts.delta() == [1, 1, 1, 1, 1, 2]
    exposition = generate_latest(REGISTRY).decode()
    assert 'keyrelay_auth_rpcs_total{code="OK",method="GetToken"}' in exposition
    assert 'keyrelay_auth_rpc_seconds_bucket{le="0.001",method="GetToken"}' in exposition
    assert 'method="Check"' not in exposition  # probes are not AuthService calls
    for line in exposition.splitlines():
        if line.startswith("keyrelay_auth_"):
            assert "metrics-rpc" not in line  # never an account id in a label
    # Lifecycle lines are info.
    (listening,) = [r for r in caplog.records if r.getMessage() == "auth service listening"]
    assert listening.levelno == logging.INFO


async def test_refresh_outcomes_events_and_token_endpoint_calls(
    make_auth: AuthFactory, oidc: OidcServer, caplog: pytest.LogCaptureFixture
) -> None:
    counts = Counts(
        events("CONNECTED"),
        token_calls("exchange"),
        refreshes("refreshed"),
        events("REFRESHED"),
        token_calls("refresh"),
        refreshes("transient"),
        events("REFRESH_FAILED"),
        refreshes("invalid_grant"),
        events("DISCONNECTED"),
    )
    # Two forced refreshes back to back: no forced-refresh cool-down here.
    _, stub = await make_auth.start(
        refresh_backoff_base_seconds=0.05, forced_refresh_cooldown_seconds=0
    )
    account = await connect(stub, "metrics-refresh", login="metrics-refresh-user")
    refreshed = await get_token(stub, "metrics-refresh", stale=account.generation)
    assert refreshed.generation == account.generation + 1

    caplog.set_level(logging.WARNING, logger="keyrelay.auth")
    oidc.set_fault("status503", count=1)
    try:
        served = await get_token(stub, "metrics-refresh", stale=refreshed.generation)
    finally:
        oidc.clear_fault()
    assert served.generation == refreshed.generation  # the still-valid token
    (failed,) = [
        r for r in caplog.records if r.getMessage() == "token refresh failed; account kept"
    ]
    assert failed.levelno == logging.WARNING  # transient: a warning
    assert failed.__dict__["kind"] == "TRANSIENT"

    assert oidc.revoke_user("metrics-refresh-user") >= 1

    codes: list[grpc.StatusCode] = []

    async def rejected() -> bool:
        # Until the backoff after the 503 has passed, the old token is served.
        try:
            await get_token(stub, "metrics-refresh", stale=refreshed.generation)
        except aio.AioRpcError as exc:
            codes.append(exc.code())
            return True
        return False

    await eventually(rejected)
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION]
    assert counts.delta() == [1, 1, 1, 1, 3, 1, 1, 1, 1]


async def test_user_disconnect_appends_one_disconnected_event(make_auth: AuthFactory) -> None:
    counts = Counts(events("DISCONNECTED"))
    _, stub = await make_auth.start()
    await connect(stub, "metrics-bye")
    for _ in range(2):  # the second changes nothing, so no second event
        await stub.Disconnect(
            auth_pb2.DisconnectRequest(account_id="metrics-bye"), metadata=admin_md()
        )
    assert counts.delta() == [1]


async def test_waiting_for_another_replicas_lock_is_counted(make_auth: AuthFactory) -> None:
    counts = Counts(("keyrelay_auth_lock_waits_total", {}), refreshes("refreshed"))
    running, stub = await make_auth.start()
    account = await connect(stub, "metrics-lock")
    owner = await running.store.try_lock("metrics-lock", 30)  # "another replica" holds it
    assert owner is not None
    waiting = asyncio.create_task(get_token(stub, "metrics-lock", stale=account.generation))

    async def counted() -> bool:
        return counts.delta()[0] >= 1

    await eventually(counted)
    assert not waiting.done()
    await running.store.release_lock("metrics-lock", owner)
    reply = await waiting
    assert reply.generation == account.generation + 1
    waits, refreshed = counts.delta()
    assert waits >= 1
    assert refreshed == 1


async def test_invalid_client_is_misconfigured_and_logged_at_error_level(
    make_auth: AuthFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counts = Counts(refreshes("misconfigured"), events("REFRESH_FAILED"))
    (tmp_path / "good").write_text("test-secret\n")
    (tmp_path / "bad").write_text("wrong-secret!\n")
    good_stub = await start_confidential(make_auth, tmp_path / "good")
    bad_stub = await start_confidential(make_auth, tmp_path / "bad")
    caplog.set_level(logging.INFO, logger="keyrelay.auth")
    account = await connect(good_stub, "metrics-misconf", login="metrics-misconf")
    served = await get_token(bad_stub, "metrics-misconf", stale=account.generation)
    assert served.generation == account.generation  # kept, and its token still served
    with pytest.raises(aio.AioRpcError) as refused:
        await exchange_with(bad_stub, "metrics-misconf-2")
    assert rpc_code(refused.value) == grpc.StatusCode.FAILED_PRECONDITION

    assert counts.delta() == [1, 1]
    by_message = {r.getMessage(): r for r in caplog.records}
    refresh = by_message["token refresh failed; account kept"]
    assert refresh.levelno == logging.ERROR
    assert refresh.__dict__["kind"] == "MISCONFIGURED"
    exchange = by_message["code exchange failed"]
    assert exchange.levelno == logging.ERROR
    assert exchange.__dict__["error"] == "invalid_client"


async def start_confidential(
    factory: AuthFactory, secret_file: Path
) -> auth_pb2_grpc.AuthServiceAsyncStub:
    """A replica using the confidential client with that secret (stopped by the factory)."""
    data = auth_config_data(factory.redis_url, factory.oidc, prefix=factory.prefix)
    data["providers"][PROVIDER] |= {
        "client_id": CONFIDENTIAL_CLIENT_ID,
        "client_secret": {"file": str(secret_file)},
    }
    running = await start_server(parse_auth_config(data, auth_env()))
    factory.running.append(running)
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    factory.channels.append(channel)
    return auth_pb2_grpc.AuthServiceStub(channel)


async def exchange_with(stub: auth_pb2_grpc.AuthServiceAsyncStub, account: str) -> None:
    flow = await stub.StartFlow(
        auth_pb2.StartFlowRequest(account_id=account, provider=PROVIDER), metadata=admin_md()
    )
    redirect = complete_login(flow.authorize_url, login=account)
    await stub.SubmitCode(
        auth_pb2.SubmitCodeRequest(flow_id=flow.flow_id, code=redirect), metadata=admin_md()
    )
