"""A local cluster: 2 auth replicas, 3 gateway workers, one Redis, the real OAuth server.

Every part is its own process, all on 127.0.0.1: two ``keyrelay auth serve``,
three ``keyrelay gateway serve`` (each with both replicas as its gRPC target,
round-robin), the tests' Redis, the oidc-provider server; the fake upstream
runs in the test and asks the provider (userinfo) about every token it gets.
One account is connected through the real PKCE flow. Its access tokens live
ACCESS_TTL seconds, so they are refreshed several times while official SDK
clients (streaming and not) send traffic through all three gateways. One auth
replica is frozen, then SIGKILLed under traffic, and restarted on the same port
after a refresh happened without it; the test waits until every gateway's
channel has reconnected to it and one more refresh happened.

Retry allowance: none. The SDK clients run with ``max_retries=0`` (the SDK
would otherwise retry connection errors, 408/409/429 and 5xx twice), so every
request the cluster could not serve counts as a failure. The killed replica
has to be absorbed by the gateways' own gRPC client (round-robin over both
replicas, ``UNAVAILABLE`` retried on the other one).

When the kill lands: the victim is frozen (SIGSTOP) right after a
``REFRESHED`` event, when the three gateways evict their cached token and
fetch the new one, until every gateway is stuck on a ``GetToken`` it sent there
(or FREEZE_MAX passed); the SIGKILL then hits those calls in flight, so the
gateways' retry on the other replica is exercised, not only round-robin
skipping a dead address. Not inside a refresh's token-endpoint call: a replica
that dies after the provider rotated the refresh token but before it stored the
new one loses the grant at any provider that rotates refresh tokens; that case,
and a holder killed while its request is lost, are
``tests/integration/test_replicas.py``'s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.integration.test_auth_flow import connect
from tests.support.events import EventWatcher
from tests.support.fake_upstream import FakeUpstream, Recorded
from tests.support.gateway import (
    PLAIN_KEY,
    GatewayProcess,
    auth_client_data,
    gateway_config_data,
)
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

ACCESS_TTL = 6  # seconds an access token lives at the provider
AUTH_SKEW = 3  # the auth service refreshes when less than this is left
# Gateways cache a token until expires_at - GATEWAY_SKEW. Below AUTH_SKEW,
# because expires_at travels in whole seconds: a gateway asks only once the
# auth service refreshes, and still uses a token 2 s before the provider's expiry.
GATEWAY_SKEW = 2
GATEWAYS = 3
CLIENTS_PER_GATEWAY = 2
# Traffic runs until the test stops it; these only bound it if the test hangs.
# (A count alone ran out on a fast, quiet machine before the last refresh.)
TRAFFIC_SECONDS = 120.0
MAX_REQUESTS_PER_CLIENT = 20_000
PAUSE = 0.02  # seconds between one client's requests
# The victim is frozen (SIGSTOP) from the first refresh until every gateway is
# stuck on a GetToken it sent there (nothing answered for STALL seconds), at
# most FREEZE_MAX (well under the gateways' 10 s RPC timeout); then SIGKILLed,
# so the gateways' calls are in flight on it when it dies.
STALL = 0.5
FREEZE_MAX = 5.0
OUTAGE_REQUESTS = 5  # each gateway serves at least this many with the victim dead
WAIT = 20.0  # seconds any wait for the cluster may take before the test fails
ACCOUNT = "acct"
WORKER_HEADER = "x-keyrelay-worker"  # set by each gateway's profile: who sent it upstream
SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture(scope="module")
def cluster_oidc() -> Iterator[OidcServer]:
    with OidcServer.start(access_token_ttl=ACCESS_TTL) as server:
        yield server


@pytest.fixture
def processes() -> Iterator[list[ReplicaProcess | GatewayProcess]]:
    started: list[ReplicaProcess | GatewayProcess] = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.fixture
async def token_checking_upstream(
    upstream: FakeUpstream, cluster_oidc: OidcServer
) -> AsyncIterator[FakeUpstream]:
    async with httpx.AsyncClient() as http:

        async def check(token: str) -> bool:
            return await cluster_oidc.token_active(token, http)

        upstream.token_check = check
        yield upstream
        upstream.token_check = None


def gateway_data(upstream_url: str, auth_ports: list[int], worker: str) -> dict[str, Any]:
    data = gateway_config_data(upstream_url, None, account=ACCOUNT, token_skew_seconds=GATEWAY_SKEW)
    data["gateway"]["auth"] = auth_client_data(auth_ports)
    data["profiles"]["tagged"] = {"set_headers": {WORKER_HEADER: worker}}
    for key in data["keys"]:
        if key["name"] == "plain":
            key["profile"] = "tagged"
    return data


@dataclass
class Traffic:
    ok: Counter[tuple[int, bool]] = field(default_factory=Counter)  # (gateway, stream)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    last_ok: dict[int, float] = field(default_factory=dict)  # gateway -> monotonic time

    def served(self, gateway: int) -> int:
        return self.ok[gateway, False] + self.ok[gateway, True]

    async def wait_stalled(self, limit: float) -> set[int]:
        """Until every gateway answered nothing for STALL seconds, or ``limit`` passed."""
        deadline = time.monotonic() + limit
        while True:
            now = time.monotonic()
            stalled = {g for g, at in self.last_ok.items() if now - at >= STALL}
            if len(stalled) == GATEWAYS or now >= deadline:
                return stalled
            await asyncio.sleep(0.05)

    async def client(self, gateway: int, url: str, offset: int) -> None:
        async with anthropic.AsyncAnthropic(
            base_url=url, api_key=PLAIN_KEY, max_retries=0, timeout=30.0
        ) as client:
            give_up_at = time.monotonic() + TRAFFIC_SECONDS
            for n in range(MAX_REQUESTS_PER_CLIENT):
                if self.stop.is_set():
                    return
                if time.monotonic() > give_up_at:
                    break
                stream = (n + offset) % 2 == 1
                try:
                    if stream:
                        async with client.messages.stream(**SIMPLE) as events:
                            message = await events.get_final_message()
                    else:
                        message = await client.messages.create(**SIMPLE)
                except anthropic.APIError as exc:
                    self.failures.append(f"gateway {gateway}, stream={stream}: {exc!r}")
                else:
                    assert message.content[0].type == "text", message
                    self.ok[gateway, stream] += 1
                    self.last_ok[gateway] = time.monotonic()
                await asyncio.sleep(PAUSE)
            self.failures.append(f"gateway {gateway}: traffic ran out before the test stopped it")


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


def refreshed(watcher: EventWatcher) -> list[auth_pb2.AccountEvent]:
    return watcher.of(ACCOUNT, EV.REFRESHED)


def stat(stats: dict[str, Any], table: str, key: str) -> int:
    return int(stats[table].get(key, 0))


def gateway_metrics(gateway: GatewayProcess) -> dict[str, float]:
    """``/metrics`` as {"name{label=value,...}": value}."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


async def test_cluster_survives_a_killed_auth_replica(
    tmp_path: Path,
    redis_server: RedisServer,
    cluster_oidc: OidcServer,
    prefix: str,
    token_checking_upstream: FakeUpstream,
    processes: list[ReplicaProcess | GatewayProcess],
) -> None:
    upstream = token_checking_upstream
    data = auth_config_data(redis_server.url, cluster_oidc, prefix=prefix, skew_seconds=AUTH_SKEW)
    replicas = write_replica_configs(tmp_path, 2, data)
    victim = replicas[0]  # replicas[1] survives
    ports = [replica.port for replica in replicas]
    gateways = [
        GatewayProcess.write(tmp_path, f"gateway-{i}", gateway_data(upstream.url, ports, f"g{i}"))
        for i in range(GATEWAYS)
    ]
    processes += [*replicas, *gateways]
    for process in processes:
        process.spawn()  # all at once: Python starts slowly on a busy machine
    for replica in replicas:
        await asyncio.to_thread(replica.wait_serving)
    for gateway in gateways:
        await asyncio.to_thread(gateway.wait_ready)

    channels = [aio.insecure_channel(replica.address) for replica in replicas]
    victim_stub, survivor_stub = (auth_pb2_grpc.AuthServiceStub(c) for c in channels)
    watcher = EventWatcher(survivor_stub)
    traffic = Traffic()
    tasks: list[asyncio.Task[None]] = []
    try:
        stats_before = cluster_oidc.stats()
        first = await connect(survivor_stub, ACCOUNT, login="cluster-user")
        assert first.generation == 1
        await watcher.wait_for(lambda _: len(watcher.of(ACCOUNT, EV.CONNECTED)) == 1)
        tasks = [
            asyncio.create_task(traffic.client(g, gateways[g].url, offset=c))
            for g in range(GATEWAYS)
            for c in range(CLIENTS_PER_GATEWAY)
        ]
        try:
            # The first refresh under traffic: the gateways now fetch the new token.
            await wait_until(lambda: len(refreshed(watcher)) >= 1, "a first refresh")
            victim.signal(signal.SIGSTOP)
            frozen_from = len(upstream.requests)
            stalled = await traffic.wait_stalled(FREEZE_MAX)
            victim.kill()  # SIGKILL
            frozen_until = len(upstream.requests)
            at_kill = [traffic.served(g) for g in range(GATEWAYS)]
            refreshes_at_kill = len(refreshed(watcher))
            # A refresh without the victim, and traffic through every gateway.
            await wait_until(
                lambda: len(refreshed(watcher)) > refreshes_at_kill, "a refresh during the outage"
            )
            await wait_until(
                lambda: all(
                    traffic.served(g) >= at_kill[g] + OUTAGE_REQUESTS for g in range(GATEWAYS)
                ),
                "traffic through every gateway during the outage",
            )
            during_outage = [traffic.served(g) - at_kill[g] for g in range(GATEWAYS)]
            # Back on the same port; then one more refresh with both replicas up.
            await asyncio.to_thread(victim.start)
            await wait_until(
                lambda: all(g.connected_to(victim.port) for g in gateways),
                "every gateway's channel reconnected to the restarted replica",
            )
            refreshes_at_restart = len(refreshed(watcher))
            await wait_until(
                lambda: len(refreshed(watcher)) > refreshes_at_restart,
                "a refresh after the restart",
            )
        finally:
            traffic.stop.set()
            await asyncio.gather(*tasks)

        # -- the clients: no failure at all (no SDK retries allowed) ----------------
        assert traffic.failures == []
        served = sum(traffic.ok.values())
        for g in range(GATEWAYS):
            assert traffic.ok[g, False] > 0
            assert traffic.ok[g, True] > 0
        assert all(n >= OUTAGE_REQUESTS for n in during_outage), during_outage

        # -- the account: connected, refreshed exactly once per expiry -------------
        account = await survivor_stub.GetAccount(
            auth_pb2.GetAccountRequest(account_id=ACCOUNT), metadata=admin_md()
        )
        assert account.status == auth_pb2.Account.CONNECTED
        generation = account.generation
        await watcher.wait_for(lambda _: len(refreshed(watcher)) >= generation - 1)
        events = watcher.of(ACCOUNT)
        assert [e.kind for e in events] == [EV.CONNECTED] + [EV.REFRESHED] * (generation - 1)
        assert [e.generation for e in events] == list(range(1, generation + 1))
        # Each generation lived until it was due: at least ACCESS_TTL - AUTH_SKEW,
        # less one second because event times are whole seconds.
        gaps = [b.at - a.at for a, b in pairwise(events)]
        assert all(gap >= ACCESS_TTL - AUTH_SKEW - 1 for gap in gaps), gaps
        assert generation >= 4  # refreshed before, during and after the outage

        stats = cluster_oidc.stats()

        def delta(table: str, key: str) -> int:
            return stat(stats, table, key) - stat(stats_before, table, key)

        assert delta("token_calls", "authorization_code") == 1
        assert delta("token_calls", "refresh_token") == generation - 1
        assert delta("token_success", "refresh_token") == generation - 1
        assert delta("token_errors", "invalid_grant") == 0
        for counter in ("reuse_detected", "code_replay_detected", "grants_revoked"):
            assert stats[counter] == stats_before[counter], counter

        # -- the upstream: one shared, valid token per generation -------------------
        requests = upstream.requests
        assert upstream.only() == requests  # all of them POST /v1/messages
        assert len(requests) == served  # no gateway retried: no token was refused
        assert [r for r in requests if r.refused] == []  # the provider accepted every one
        reigns = token_reigns(requests)
        assert 3 <= len(reigns) <= generation  # one token per generation, never more
        # A token is shared: every gateway sent it, unless its reign overlapped the
        # freeze (a gateway stuck on the victim may skip a generation) or it is the
        # last one (the traffic stopped). Tokens issued after the kill are checked.
        everyone = {f"g{i}" for i in range(GATEWAYS)}
        checked = [
            reign
            for reign in reigns[:-1]
            if reign.until <= frozen_from or reign.since >= frozen_until
        ]
        assert any(reign.since >= frozen_until for reign in checked), reigns
        assert all(reign.workers == everyone for reign in checked), reigns

        # -- the gateways agree: every answer a 200, no upstream auth retry ---------
        for gateway in gateways:
            metrics = await asyncio.to_thread(gateway_metrics, gateway)
            answered = {
                k: v for k, v in metrics.items() if k.startswith("keyrelay_gateway_requests_total")
            }
            assert all("status=200" in k for k, v in answered.items() if v), answered
            retries = sum(
                v
                for k, v in metrics.items()
                if k.startswith("keyrelay_gateway_upstream_auth_retries_total")
            )
            assert retries == 0

        # -- the restarted replica serves again -----------------------------------
        health = health_pb2_grpc.HealthStub(channels[0])
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        direct = await victim_stub.GetToken(
            auth_pb2.GetTokenRequest(account_id=ACCOUNT), metadata=gateway_md(), timeout=10
        )
        assert direct.generation >= generation
        assert cluster_oidc.userinfo(direct.access_token).status_code == 200
        again = await victim_stub.GetAccount(
            auth_pb2.GetAccountRequest(account_id=ACCOUNT), metadata=admin_md()
        )
        assert again.status == auth_pb2.Account.CONNECTED
        print(
            f"\ncluster: {served} requests, {generation - 1} refreshes, "
            f"{len(reigns)} tokens upstream, served during the outage {during_outage}, "
            f"stuck on the frozen victim: {sorted(stalled)}, "
            f"longest token wait per gateway (ms): {[token_wait(g) for g in gateways]}"
        )
    finally:
        for task in tasks:
            task.cancel()
        await watcher.close()
        for channel in channels:
            await channel.close()


@dataclass
class Reign:
    """One access token at the upstream: requests [since, until) in arrival order."""

    since: int
    until: int
    workers: set[str]


def token_reigns(requests: list[Recorded]) -> list[Reign]:
    """The tokens in the order the upstream first saw them, with who sent each."""
    reigns: dict[str, Reign] = {}
    for index, request in enumerate(requests):
        token = (request.header("authorization") or "").removeprefix("Bearer ")
        reign = reigns.setdefault(token, Reign(index, len(requests), set()))
        reign.workers.add(request.header(WORKER_HEADER) or "?")
    ordered = list(reigns.values())
    for reign, following in pairwise(ordered):
        reign.until = following.since
    return ordered


def token_wait(gateway: GatewayProcess) -> int:
    """The longest time one request spent outside its upstream call (access log)."""
    waits = [
        entry["duration_ms"] - entry["upstream_ms"]
        for line in gateway.log().splitlines()
        if '"keyrelay.gateway.access"' in line
        for entry in [json.loads(line)]
    ]
    return int(max(waits))
