"""Redis Sentinel: the auth service follows a real failover to the promoted replica.

Real processes on loopback ports: a primary, its replica and one sentinel
(quorum 1, primary down after 1 s). The primary is SIGKILLed once the replica
holds every write; the sentinel promotes the replica and the same auth service,
configured only with the sentinel's address, serves and refreshes the same
account from the new primary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2
from tests.conftest import AuthFactory, rpc_code
from tests.integration.test_auth_flow import connect
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer, SentinelServer
from tests.support.stack import admin_md, gateway_md

FAILOVER_BOUND_SECONDS = 30.0
# The primary's first full sync to a replica starts at once instead of after 5 s.
NO_SYNC_DELAY = ("--repl-diskless-sync-delay", "0")


@dataclass
class Topology:
    primary: RedisServer
    replica: RedisServer
    sentinel: SentinelServer

    def url(self, service_name: str = "m") -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{service_name}"


def role(server: RedisServer) -> str:
    with server.client() as client:
        reply = client.execute_command("ROLE")
    return bytes(reply[0]).decode()


def replica_linked(replica: RedisServer) -> bool:
    with replica.client() as client:
        return bool(client.info("replication").get("master_link_status") == "up")


def wait_blocking(condition: Callable[[], bool], what: str, bound: float = 10.0) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {bound:g} s")
        time.sleep(0.02)


async def eventually(condition: Callable[[], bool], what: str, bound: float) -> None:
    """Polls a quick check, yielding to the event loop (the auth service runs on it)."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {bound:g} s")
        await asyncio.sleep(0.05)


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    primary = RedisServer(tmp_path / "primary", extra_args=NO_SYNC_DELAY).start()
    replica = RedisServer(
        tmp_path / "replica",
        extra_args=("--replicaof", "127.0.0.1", str(primary.port), *NO_SYNC_DELAY),
    )
    sentinel = SentinelServer(tmp_path / "sentinel", primary.port)
    try:
        replica.start()
        wait_blocking(lambda: replica_linked(replica), "the replica syncs")
        sentinel.start()
        wait_blocking(
            lambda: replica.port in sentinel.replica_ports(), "the sentinel finds the replica"
        )
        yield Topology(primary, replica, sentinel)
    finally:
        sentinel.stop()
        replica.stop()
        primary.stop()


async def test_a_failover_is_followed_to_the_promoted_replica(
    topology: Topology, oidc: OidcServer, prefix: str
) -> None:
    factory = AuthFactory(topology.url(), oidc, prefix)
    try:
        _, stub = await factory.start()
        account = await connect(stub, "failover", login="failover-user")
        before = await stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="failover"), metadata=gateway_md()
        )
        assert before.generation == account.generation
        with topology.primary.client() as primary:
            assert primary.execute_command("WAIT", 1, 2000) == 1  # the replica has every write

        topology.primary.kill()
        await eventually(
            lambda: topology.sentinel.master_port() == topology.replica.port,
            "the sentinel promotes the replica",
            FAILOVER_BOUND_SECONDS,
        )
        assert role(topology.replica) == "master"

        after = await stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="failover"), metadata=gateway_md(), timeout=30
        )
        assert after.access_token == before.access_token
        assert after.generation == account.generation
        state = await stub.GetAccount(
            auth_pb2.GetAccountRequest(account_id="failover"), metadata=admin_md()
        )
        assert state.status == auth_pb2.Account.CONNECTED
        assert state.generation == account.generation

        refreshed = await stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="failover", stale_generation=after.generation),
            metadata=gateway_md(),
        )
        assert refreshed.generation == after.generation + 1
        assert oidc.userinfo(refreshed.access_token).status_code == 200
        # The fenced write (a Lua script) landed on the new primary.
        assert role(topology.replica) == "master"
        with topology.replica.client() as new_primary:
            stored = new_primary.hget(f"{prefix}account:failover", "generation")
        assert stored == str(refreshed.generation).encode()
    finally:
        await factory.close()


async def test_an_unknown_service_name_is_unavailable_not_a_crash(
    topology: Topology, oidc: OidcServer, prefix: str
) -> None:
    factory = AuthFactory(topology.url("no-such-service"), oidc, prefix)
    try:
        _, stub = await factory.start()
        for _ in range(2):  # and the service stays up after the first failure
            with pytest.raises(aio.AioRpcError) as info:
                await stub.GetToken(
                    auth_pb2.GetTokenRequest(account_id="anyone"),
                    metadata=gateway_md(),
                    timeout=30,
                )
            assert rpc_code(info.value) == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in (info.value.details() or "")
    finally:
        await factory.close()
