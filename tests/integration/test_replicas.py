"""Several auth-service replicas as separate processes, one Redis, the real OAuth server.

The counts come from the OAuth server itself (its token-endpoint statistics),
not from keyrelay: exactly one refresh per expiry, no refresh-token reuse.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.integration.test_auth_flow import connect
from tests.support.events import EventWatcher
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer
from tests.support.stack import (
    ReplicaProcess,
    admin_md,
    auth_config_data,
    gateway_md,
    write_replica_configs,
)

pytestmark = pytest.mark.slow
EV = auth_pb2.AccountEvent

HERD_TTL = 4  # seconds of access-token life at the provider for the herd test


@pytest.fixture(scope="module")
def herd_oidc() -> Iterator[OidcServer]:
    with OidcServer.start(access_token_ttl=HERD_TTL) as server:
        yield server


def start_replicas(
    tmp_path: Path, count: int, redis_url: str, oidc: OidcServer, prefix: str, **auth: Any
) -> list[ReplicaProcess]:
    data = auth_config_data(redis_url, oidc, prefix=prefix, **auth)
    replicas = write_replica_configs(tmp_path, count, data)
    for replica in replicas:
        replica.start()
    return replicas


@pytest.fixture
def replica_set() -> Iterator[list[ReplicaProcess]]:
    started: list[ReplicaProcess] = []
    yield started
    for replica in started:
        replica.stop()


class Channels:
    def __init__(self, replicas: list[ReplicaProcess]) -> None:
        self.channels = [aio.insecure_channel(r.address) for r in replicas]
        self.stubs = [auth_pb2_grpc.AuthServiceStub(c) for c in self.channels]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def refreshes(oidc: OidcServer) -> int:
    return int(oidc.stats()["token_calls"].get("refresh_token", 0))


async def test_herd_at_expiry_refreshes_once_per_expiry(
    tmp_path: Path,
    redis_server: RedisServer,
    herd_oidc: OidcServer,
    prefix: str,
    replica_set: list[ReplicaProcess],
) -> None:
    replica_set += start_replicas(tmp_path, 3, redis_server.url, herd_oidc, prefix, skew_seconds=1)
    channels = Channels(replica_set)
    await connect(channels.stubs[0], "herd", login="herd-user")
    stats_before = herd_oidc.stats()
    callers_per_round = 300
    rounds = 3
    seen_generations = []
    for round_no in range(rounds):
        account = await channels.stubs[0].GetAccount(
            auth_pb2.GetAccountRequest(account_id="herd"), metadata=admin_md()
        )
        # Wake just after the refresh point (expires_at - skew); proto times are whole seconds.
        await asyncio.sleep(max(0.0, account.access_token_expires_at + 0.05 - time.time()))
        calls = [
            channels.stubs[i % 3].GetToken(
                auth_pb2.GetTokenRequest(account_id="herd"), metadata=gateway_md(), timeout=30
            )
            for i in range(callers_per_round)
        ]
        results = await asyncio.gather(*calls)
        tokens = {r.access_token for r in results}
        generations = {r.generation for r in results}
        assert len(tokens) == 1, f"round {round_no}: {len(tokens)} different tokens"
        assert generations == {account.generation + 1}, (round_no, generations)
        seen_generations.append(generations.pop())
        for token in tokens:
            assert herd_oidc.userinfo(token).status_code == 200
        assert refreshes(herd_oidc) == refreshes_before(stats_before) + round_no + 1

    stats = herd_oidc.stats()
    assert stats["reuse_detected"] == stats_before["reuse_detected"]
    assert stats["grants_revoked"] == stats_before["grants_revoked"]
    assert seen_generations == [2, 3, 4]
    await channels.close()


def refreshes_before(stats: dict[str, Any]) -> int:
    return int(stats["token_calls"].get("refresh_token", 0))


async def test_slow_token_endpoint_holder_keeps_its_lease(
    tmp_path: Path,
    redis_server: RedisServer,
    oidc: OidcServer,
    prefix: str,
    replica_set: list[ReplicaProcess],
) -> None:
    """The endpoint takes 3x the lock TTL: the holder renews, nobody else calls it."""
    replica_set += start_replicas(
        tmp_path,
        3,
        redis_server.url,
        oidc,
        prefix,
        lock_ttl_seconds=1.0,
        token_timeout_seconds=10,
        refresh_deadline_seconds=10,
    )
    channels = Channels(replica_set)
    first = await connect(channels.stubs[0], "slow", login="slow-user")
    stats_before = oidc.stats()
    oidc.set_fault("delay", delay_ms=3000, count=1)
    try:
        calls = [
            channels.stubs[i % 3].GetToken(
                auth_pb2.GetTokenRequest(account_id="slow", stale_generation=first.generation),
                metadata=gateway_md(),
                timeout=30,
            )
            for i in range(60)
        ]
        results = await asyncio.gather(*calls)
    finally:
        oidc.clear_fault()
    assert {r.generation for r in results} == {first.generation + 1}
    assert len({r.access_token for r in results}) == 1
    assert refreshes(oidc) == refreshes_before(stats_before) + 1
    stats = oidc.stats()
    assert stats["reuse_detected"] == stats_before["reuse_detected"]
    account = await channels.stubs[1].GetAccount(
        auth_pb2.GetAccountRequest(account_id="slow"), metadata=admin_md()
    )
    assert account.status == auth_pb2.Account.CONNECTED
    assert oidc.userinfo(results[0].access_token).status_code == 200
    await channels.close()


async def test_holder_killed_mid_refresh_another_replica_takes_over(
    tmp_path: Path,
    redis_server: RedisServer,
    oidc: OidcServer,
    prefix: str,
    replica_set: list[ReplicaProcess],
) -> None:
    replica_set += start_replicas(
        tmp_path,
        2,
        redis_server.url,
        oidc,
        prefix,
        lock_ttl_seconds=2.0,
        token_timeout_seconds=20,
        refresh_deadline_seconds=20,
    )
    holder, survivor = replica_set
    channels = Channels(replica_set)
    first = await connect(channels.stubs[0], "killed", login="killed-user")
    stats_before = oidc.stats()
    # The holder's refresh request reaches the token endpoint and hangs there
    # (a request lost in the network: the provider never processes it).
    oidc.set_fault("hang", count=1)
    stale = auth_pb2.GetTokenRequest(account_id="killed", stale_generation=first.generation)
    doomed = channels.stubs[0].GetToken(stale, metadata=gateway_md(), timeout=30)
    deadline = time.monotonic() + 10
    while oidc.stats()["faulted"] == stats_before["faulted"]:
        assert time.monotonic() < deadline, "the holder never called the token endpoint"
        await asyncio.sleep(0.02)
    with redis_server.client() as client:
        assert client.exists(f"{prefix}lock:killed")
    holder.signal(signal.SIGKILL)
    oidc.clear_fault()
    with pytest.raises(aio.AioRpcError):
        await doomed

    token = await channels.stubs[1].GetToken(stale, metadata=gateway_md(), timeout=30)
    assert token.generation == first.generation + 1
    assert oidc.userinfo(token.access_token).status_code == 200
    stats = oidc.stats()
    assert stats["token_success"].get("refresh_token", 0) == (
        stats_before["token_success"].get("refresh_token", 0) + 1
    )
    assert stats["reuse_detected"] == stats_before["reuse_detected"]
    account = await channels.stubs[1].GetAccount(
        auth_pb2.GetAccountRequest(account_id="killed"), metadata=admin_md()
    )
    assert account.status == auth_pb2.Account.CONNECTED
    assert survivor.process is not None
    assert survivor.process.poll() is None
    await channels.close()


async def test_sigterm_stops_gracefully(
    tmp_path: Path,
    redis_server: RedisServer,
    oidc: OidcServer,
    prefix: str,
    replica_set: list[ReplicaProcess],
) -> None:
    replica_set += start_replicas(tmp_path, 1, redis_server.url, oidc, prefix)
    replica = replica_set[0]
    replica.signal(signal.SIGTERM)
    assert replica.process is not None
    assert replica.process.wait(timeout=15) == 0
    assert "shutting down" in replica.log()


async def test_revocation_seen_by_every_replica_disconnects_exactly_once(
    tmp_path: Path,
    redis_server: RedisServer,
    oidc: OidcServer,
    prefix: str,
    replica_set: list[ReplicaProcess],
) -> None:
    replica_set += start_replicas(tmp_path, 3, redis_server.url, oidc, prefix)
    channels = Channels(replica_set)
    first = await connect(channels.stubs[0], "gone", login="gone-user")
    watcher = EventWatcher(channels.stubs[2])
    await watcher.wait_for(lambda _: len(watcher.of("gone", EV.CONNECTED)) == 1)
    assert oidc.revoke_user("gone-user") >= 1
    calls = [
        channels.stubs[i % 3].GetToken(
            auth_pb2.GetTokenRequest(account_id="gone", stale_generation=first.generation),
            metadata=gateway_md(),
            timeout=30,
        )
        for i in range(90)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        assert isinstance(result, aio.AioRpcError), result
        assert result.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "keyrelay connect gone --provider testidp" in (result.details() or "")
    await watcher.wait_for(lambda _: len(watcher.of("gone", EV.DISCONNECTED)) == 1)
    await asyncio.sleep(0.5)  # room for a wrong second event to arrive
    assert len(watcher.of("gone", EV.DISCONNECTED)) == 1
    assert watcher.of("gone", EV.REFRESHED) == []
    await watcher.close()
    await channels.close()
