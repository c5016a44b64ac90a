"""Gateway keys at runtime, the gateways' side (DESIGN §6.1): real parts only.

An auth replica process (real Redis, the test OAuth server), ``keyrelay gateway
serve`` processes with a limits store (a real Redis, as the gateway's ACL user),
the fake upstream, and the official SDK as the client:

- a key created on the auth service works on 3 workers within 1 s; revoked, it
  gets 401 on all 3 within 1 s; a worker restarted afterwards agrees;
- an update of its limits takes effect (2 requests a minute: the third is 429);
- an expired key gets 401 saying it expired;
- a runtime key with the hash of a config key, or naming a profile the gateway
  does not define, is not taken (and logged); the config key keeps working;
- a runtime key naming a pool is served by the pool's members on a gateway that
  has the pool, and refused (unknown_pool) by one that has not;
- the auth service down when a gateway starts: config keys serve, /readyz says
  the runtime keys are not loaded, and they arrive once the auth service is up.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import tomli_w
from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.gateway.keys import key_hash
from tests.e2e.test_gateway_limits import PREFIX, minute_with_room, url_file
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import (
    API_KEY_KEY,
    PLAIN_KEY,
    UPSTREAM_API_KEY,
    GatewayProcess,
    gateway_config_data,
)
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer, free_port
from tests.support.stack import ReplicaProcess, admin_md, auth_config_data

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
PROPAGATION_SECONDS = 1.0  # the bound: every worker within a second


@dataclass
class Fleet:
    tmp: Path
    replica: ReplicaProcess
    stub: auth_pb2_grpc.AuthServiceAsyncStub
    data: dict[str, Any]  # the gateways' config
    gateways: list[GatewayProcess]

    def add_gateway(self, name: str, data: dict[str, Any] | None = None) -> GatewayProcess:
        gateway = GatewayProcess.write(self.tmp, name, data or self.data)
        self.gateways.append(gateway)
        gateway.spawn()
        return gateway

    async def create(self, name: str, **fields: Any) -> auth_pb2.CreateKeyResponse:
        fields.setdefault("route", auth_pb2.KeyRoute(account_id="acct"))
        reply: auth_pb2.CreateKeyResponse = await self.stub.CreateKey(
            auth_pb2.CreateKeyRequest(name=name, **fields), metadata=admin_md()
        )
        return reply


@pytest.fixture
def replica(
    tmp_path: Path, redis_server: RedisServer, oidc: OidcServer, prefix: str
) -> Iterator[ReplicaProcess]:
    """An auth replica process's config on a port of its own; not started."""
    port = free_port()
    data = auth_config_data(redis_server.url, oidc, prefix=prefix, listen=f"127.0.0.1:{port}")
    path = tmp_path / "auth.toml"
    path.write_bytes(tomli_w.dumps(data).encode())
    process = ReplicaProcess(path, port, tmp_path / "auth.log")
    yield process
    process.stop()


def gateways_data(
    tmp: Path, upstream: FakeUpstream, auth_port: int, limits: RedisServer
) -> dict[str, Any]:
    data = gateway_config_data(upstream.url, auth_port)
    data["gateway"]["limits"] = {"redis_url": {"file": url_file(tmp, limits)}, "key_prefix": PREFIX}
    return data


@pytest.fixture
async def fleet(
    tmp_path: Path, replica: ReplicaProcess, upstream: FakeUpstream, limits_redis: RedisServer
) -> AsyncIterator[Fleet]:
    """An auth replica with the account "acct" connected, and 3 ready gateways."""
    replica.start()
    channel = aio.insecure_channel(replica.address)
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    await connect(stub, "acct", login="runtime-keys-user")
    data = gateways_data(tmp_path, upstream, replica.port, limits_redis)
    result = Fleet(tmp_path, replica, stub, data, [])
    try:
        for i in range(3):
            result.add_gateway(f"gateway-{i}")
        for gateway in result.gateways:
            gateway.wait_ready()
        yield result
    finally:
        for gateway in result.gateways:
            gateway.stop()
        await channel.close()


def sdk(gateway: GatewayProcess, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gateway.url, api_key=key, max_retries=0)


async def status_of(gateway: GatewayProcess, key: str) -> tuple[int, str]:
    """The status of one request with ``key`` through ``gateway``, and the error message."""
    async with sdk(gateway, key) as client:
        try:
            await client.messages.create(**SIMPLE)
        except anthropic.APIStatusError as exc:
            return exc.status_code, exc.message
    return 200, ""


async def until_all(
    gateways: list[GatewayProcess], key: str, status: int, started: float, limit: float = 5.0
) -> list[float]:
    """Polls each gateway with the SDK until it answers ``status``; the seconds since
    ``started`` (monotonic) at which each first did."""
    seen: dict[int, float] = {}
    while len(seen) < len(gateways):
        for i, gateway in enumerate(gateways):
            if i not in seen and (await status_of(gateway, key))[0] == status:
                seen[i] = time.monotonic() - started
        if time.monotonic() - started > limit:
            raise AssertionError(f"not {status} on every gateway after {limit} s: {seen}")
    return [seen[i] for i in range(len(gateways))]


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=2.0) as http:
        return await http.get(url)


async def readyz(gateway: GatewayProcess) -> tuple[int, dict[str, Any]]:
    response = await get(f"{gateway.url}/readyz")
    return response.status_code, json.loads(response.content)


async def test_create_and_revoke_reach_three_workers_within_a_second_and_a_restart_agrees(
    fleet: Fleet,
) -> None:
    workers = fleet.gateways
    for gateway in workers:
        status, body = await readyz(gateway)
        assert status == 200
        assert body["runtime_keys"] == "loaded"

    started = time.monotonic()
    created = await fleet.create("ci-bot")
    live = created.secret
    took = await until_all(workers, live, 200, started)
    print(f"created -> 200 on each worker after {[f'{t * 1000:.0f} ms' for t in took]}")
    assert max(took) <= PROPAGATION_SECONDS

    doomed = (await fleet.create("to-revoke")).secret
    await until_all(workers, doomed, 200, time.monotonic())
    started = time.monotonic()
    await fleet.stub.RevokeKey(
        auth_pb2.RevokeKeyRequest(key_id=(await key_id_of(fleet, doomed))), metadata=admin_md()
    )
    took = await until_all(workers, doomed, 401, started)
    print(f"revoked -> 401 on each worker after {[f'{t * 1000:.0f} ms' for t in took]}")
    assert max(took) <= PROPAGATION_SECONDS
    status, message = await status_of(workers[2], doomed)
    assert (status, "invalid gateway key" in message) == (401, True)

    # A worker restarted afterwards loads the same view.
    workers[0].stop()
    workers[0].spawn()
    workers[0].wait_ready()
    assert (await status_of(workers[0], doomed))[0] == 401
    assert (await status_of(workers[0], live))[0] == 200
    assert (await status_of(workers[0], PLAIN_KEY))[0] == 200  # config keys as ever
    assert (await readyz(workers[0]))[1]["runtime_key_count"] == 1


async def key_id_of(fleet: Fleet, secret: str) -> str:
    listed = await fleet.stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin_md())
    (found,) = [k.key_id for k in listed.keys if k.key_sha256 == key_hash(secret)]
    return found


async def test_an_update_of_limits_takes_effect_on_every_worker(fleet: Fleet) -> None:
    created = await fleet.create("limited-later")
    key = created.secret
    workers = fleet.gateways
    await until_all(workers, key, 200, time.monotonic())
    async with sdk(workers[0], key) as client:
        response = await client.messages.with_raw_response.create(**SIMPLE)
    assert "x-keyrelay-ratelimit-limit" not in response.headers  # no limits yet

    await fleet.stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(
            key_id=created.key.key_id, limits=auth_pb2.KeyLimits(requests_per_minute=2)
        ),
        metadata=admin_md(),
    )
    await asyncio.sleep(PROPAGATION_SECONDS)
    await minute_with_room(5, 58)  # the three requests in one UTC minute
    answers = []
    for gateway in workers:
        async with sdk(gateway, key) as client:
            try:
                response = await client.messages.with_raw_response.create(**SIMPLE)
                answers.append((200, response.headers["x-keyrelay-ratelimit-limit"]))
            except anthropic.RateLimitError as exc:
                answers.append((429, exc.message))
    assert answers[:2] == [(200, "2"), (200, "2")]
    assert answers[2][0] == 429
    assert "2 requests per minute" in answers[2][1]


async def test_an_expired_key_gets_401_saying_so(fleet: Fleet) -> None:
    expires = int(time.time()) + 2
    key = (await fleet.create("short-lived", expires_at=expires)).secret
    await until_all(fleet.gateways, key, 200, time.monotonic())
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.1)
    for gateway in fleet.gateways:  # no event: each worker checks at the request
        status, message = await status_of(gateway, key)
        assert status == 401
        assert "expired at" in message


async def test_a_key_naming_an_unknown_profile_is_not_taken_and_logged(fleet: Fleet) -> None:
    created = await fleet.create(
        "elsewhere", route=auth_pb2.KeyRoute(account_id="acct", profile="not-here")
    )
    await asyncio.sleep(PROPAGATION_SECONDS)
    for gateway in fleet.gateways:
        status, message = await status_of(gateway, created.secret)
        assert status == 401
        assert "profile 'not-here' is not defined on this gateway" in message
        log = gateway.log()
        assert "runtime key not taken" in log
        assert created.key.key_id in log
        assert "unknown_profile" in log
        metrics = (await get(f"{gateway.url}/metrics")).text
        assert 'keyrelay_gateway_runtime_keys_refused_total{reason="unknown_profile"} 1.0' in (
            metrics
        )


async def test_a_runtime_key_naming_a_pool_is_served_by_its_members(fleet: Fleet) -> None:
    """``CreateKey`` with ``route.pool`` (issue 12): a gateway whose config has that
    pool serves the key through the pool's members (here an upstream API key and the
    connected account, round robin); one without it refuses the key (401 saying so,
    ``unknown_pool`` in the log and the metric)."""
    data = copy.deepcopy(fleet.data)
    data["pools"] = {
        "team": {
            "strategy": "round_robin",
            "members": [
                {"name": "spare", "api_key": {"env": "KR_UPSTREAM_KEY"}},
                {"account": "acct"},
            ],
        }
    }
    pooled = fleet.add_gateway("pooled", data)
    pooled.wait_ready()
    created = await fleet.create(
        "team-bot",
        route=auth_pb2.KeyRoute(pool="team"),
        limits=auth_pb2.KeyLimits(requests_per_minute=1000),
    )
    assert created.key.route.mode == "pool"
    await until_all([pooled], created.secret, 200, time.monotonic())
    async with sdk(pooled, created.secret) as client:
        for _ in range(3):
            await client.messages.create(**SIMPLE)
    metrics = (await get(f"{pooled.url}/metrics")).text
    for member in ("spare", "acct"):  # both members served
        labels = f'member="{member}",pool="team",result="served"'
        assert f"keyrelay_gateway_pool_attempts_total{{{labels}}}" in metrics, metrics
    assert "keyrelay_gateway_runtime_keys_refused_total{" not in metrics

    # The fleet's gateways have no pool "team": the key is not taken there.
    for gateway in fleet.gateways[:3]:
        status, message = await status_of(gateway, created.secret)
        assert status == 401
        assert "its pool 'team' is not defined on this gateway" in message
        assert "unknown_pool" in gateway.log()
        metrics = (await get(f"{gateway.url}/metrics")).text
        assert 'keyrelay_gateway_runtime_keys_refused_total{reason="unknown_pool"} 1.0' in metrics


async def test_a_runtime_key_cannot_shadow_a_config_key(
    fleet: Fleet, upstream: FakeUpstream
) -> None:
    created = await fleet.create("shadow")
    # A gateway whose config has a [[keys]] entry with that very hash (an api_key route).
    data = json.loads(json.dumps(fleet.data))
    data["keys"].append(
        {
            "name": "file-wins",
            "hash": created.key.key_sha256,
            "mode": "api_key",
            "api_key": {"env": "KR_UPSTREAM_KEY"},
        }
    )
    gateway = fleet.add_gateway("gateway-shadowed", data).wait_ready()
    assert (await status_of(gateway, created.secret))[0] == 200
    sent = upstream.last()
    assert sent.header("x-api-key") == UPSTREAM_API_KEY  # the config's route, not the oauth one
    assert sent.header("authorization") is None
    log = gateway.log()
    assert "runtime key not taken" in log
    assert "shadows_config" in log
    assert (await readyz(gateway))[1]["runtime_key_count"] == 0
    # The other workers (no such [[keys]] entry) serve it as the runtime key.
    assert (await status_of(fleet.gateways[0], created.secret))[0] == 200
    assert upstream.last().header("authorization") is not None


async def test_auth_down_at_start_config_keys_serve_and_runtime_keys_arrive_later(
    tmp_path: Path, replica: ReplicaProcess, upstream: FakeUpstream, limits_redis: RedisServer
) -> None:
    gateway = GatewayProcess.write(
        tmp_path, "gateway", gateways_data(tmp_path, upstream, replica.port, limits_redis)
    )
    gateway.spawn()
    channel: aio.Channel | None = None
    try:
        for _ in range(200):
            try:
                if (await get(f"{gateway.url}/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        status, body = await readyz(gateway)
        assert status == 503
        assert body["runtime_keys"] == "loading"
        # An api_key config key needs no auth service.
        assert (await status_of(gateway, API_KEY_KEY))[0] == 200

        replica.start()
        channel = aio.insecure_channel(replica.address)
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        await connect(stub, "acct", login="runtime-keys-late")
        created = await stub.CreateKey(
            auth_pb2.CreateKeyRequest(name="late", route=auth_pb2.KeyRoute(account_id="acct")),
            metadata=admin_md(),
        )
        # The load retries with backoff (at most 5 s, jittered): within 10 s.
        took = await until_all([gateway], created.secret, 200, time.monotonic(), limit=10.0)
        print(f"runtime key served {took[0]:.2f} s after it was created (auth came up late)")
        gateway.wait_ready(timeout=10)
        body = (await readyz(gateway))[1]
        assert (body["status"], body["runtime_keys"], body["runtime_key_count"]) == (
            "ready",
            "loaded",
            1,
        )
        assert "runtime keys loaded" in gateway.log()
    finally:
        gateway.stop()
        if channel is not None:
            await channel.close()
