"""Redis killed for 15 s under GetToken load, then restarted (issue 9, row 7).

The whole fleet in miniature: one auth replica as its own process (with its web
side), an in-process gateway worker holding a cached token, the anthropic SDK
as its client, and GetToken callers hammering the replica while Redis is gone.
What must hold while Redis is down:

- the replica logs what failed (operation, error class, Redis address), a
  bounded number of lines however many calls fail;
- its web ``/readyz`` answers within the probe's timeout, 503 (the store is
  down); its gRPC health stays SERVING (docs/decisions.md: a shared store's
  outage must not take every replica out of the Service);
- the gateway's ``/readyz`` stays 200 within its probe's timeout (an auth
  replica answers, the gateway's token is cached), and the SDK gets 200s.

And after Redis returns, everything recovers without a restart.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from keyrelay.auth.service import STORE_ERROR_LOG_INTERVAL_SECONDS
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import PLAIN_KEY, RunningGateway, gateway_config, start_gateway
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer, free_port
from tests.support.stack import (
    ReplicaProcess,
    auth_config_data,
    gateway_md,
    write_replica_configs,
)

OUTAGE_SECONDS = 15.0
# What a kubelet would wait for an answer: the gateway's readinessProbe has
# timeoutSeconds: 3 (deploy/base/gateway.yaml); the same is asked of the auth
# service's web /readyz. Generous against the deadlines (1 s, see README).
PROBE_TIMEOUT = 3.0
LOAD_CALLERS = 8
SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
STORE_ERROR = "token store (Redis) error"
STORE_BACK = "token store (Redis) answers again"


@dataclass
class Load:
    """GetToken callers in a loop, as gateways with cold caches would be."""

    stub: auth_pb2_grpc.AuthServiceAsyncStub
    codes: Counter[str] = field(default_factory=Counter)
    last_ok: float = 0.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._caller()) for _ in range(LOAD_CALLERS)]

    async def _caller(self) -> None:
        while True:
            try:
                await self.stub.GetToken(
                    auth_pb2.GetTokenRequest(account_id="acct"), metadata=gateway_md(), timeout=10
                )
            except aio.AioRpcError as exc:
                self.codes[exc.code().name] += 1
                await asyncio.sleep(0.05)
            else:
                self.codes["OK"] += 1
                self.last_ok = time.monotonic()
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def probe(http: httpx.AsyncClient, url: str) -> tuple[int | str, str]:
    """(status, body), or ("timeout", "") when no answer came within PROBE_TIMEOUT."""
    try:
        response = await http.get(url, timeout=PROBE_TIMEOUT)
    except httpx.TimeoutException:
        return "timeout", ""
    return response.status_code, response.text


async def health_of(channel: aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="keyrelay.auth.v1.AuthService"),
            timeout=PROBE_TIMEOUT,
        )
    except aio.AioRpcError as exc:
        return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def until(check: Any, what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(0.2)


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


async def test_redis_killed_under_get_token_load_is_visible_and_survived(
    tmp_path: Path, oidc: OidcServer, prefix: str, upstream: FakeUpstream
) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    web_port = free_port()
    data = auth_config_data(redis.url, oidc, prefix=prefix, web={"listen": f"127.0.0.1:{web_port}"})
    replica: ReplicaProcess = write_replica_configs(tmp_path, 1, data)[0]
    replica.start()
    auth_readyz = f"http://127.0.0.1:{web_port}/readyz"
    gateway: RunningGateway | None = None
    try:
        async with (
            aio.insecure_channel(replica.address) as channel,
            httpx.AsyncClient() as http,
        ):
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await connect(stub, "acct", login="outage-user")
            gateway = await start_gateway(gateway_config(upstream.url, replica.port))
            gateway_readyz = f"{gateway.url}/readyz"
            async with anthropic.AsyncAnthropic(
                base_url=gateway.url, api_key=PLAIN_KEY, max_retries=0, timeout=30
            ) as sdk:
                await sdk.messages.create(**SIMPLE)  # the gateway caches the token
                assert (await probe(http, auth_readyz))[0] == 200
                assert (await probe(http, gateway_readyz))[0] == 200

                load = Load(stub)
                load.start()
                await until(lambda: asyncio.sleep(0, load.codes["OK"] > 0), "load answered")

                redis.kill()
                killed_at = time.monotonic()
                auth_probes: list[int | str] = []
                gateway_probes: list[tuple[int | str, str]] = []
                health: list[str] = []
                sdk_results: list[int | str] = []
                while time.monotonic() - killed_at < OUTAGE_SECONDS:
                    auth_probes.append((await probe(http, auth_readyz))[0])
                    gateway_probes.append(await probe(http, gateway_readyz))
                    health.append(await health_of(channel))
                    try:
                        await sdk.messages.create(**SIMPLE)
                        sdk_results.append(200)
                    except anthropic.APIStatusError as exc:
                        sdk_results.append(exc.status_code)
                    except anthropic.APIConnectionError as exc:
                        sdk_results.append(type(exc).__name__)
                    await asyncio.sleep(0.3)
                failed_during = sum(n for code, n in load.codes.items() if code != "OK")

                redis.start()
                restarted_at = time.monotonic()

                async def auth_ready() -> bool:
                    return (await probe(http, auth_readyz))[0] == 200

                await until(auth_ready, "the auth service's /readyz back to 200")
                await until(
                    lambda: asyncio.sleep(0, load.last_ok > restarted_at),
                    "GetToken answering again",
                )
                await load.stop()
                recovered_at = time.monotonic()

                # The store takes writes again: a forced refresh, whose event reaches
                # the gateway's resumed watch (it evicts its cached token).
                current = await stub.GetToken(
                    auth_pb2.GetTokenRequest(account_id="acct"), metadata=gateway_md()
                )
                refreshed = await stub.GetToken(
                    auth_pb2.GetTokenRequest(
                        account_id="acct", stale_generation=current.generation
                    ),
                    metadata=gateway_md(),
                )
                assert refreshed.generation == current.generation + 1
                tokens = gateway.app.tokens
                assert tokens is not None

                async def evicted() -> bool:
                    cached = tokens._cache.get("acct")
                    return cached is None or cached.generation == refreshed.generation

                await until(evicted, "the REFRESHED event reached the gateway")
                await sdk.messages.create(**SIMPLE)
                assert upstream.last().header("authorization") == (
                    f"Bearer {refreshed.access_token}"
                )
                assert (await probe(http, gateway_readyz))[0] == 200
                assert await health_of(channel) == "SERVING"
                metrics = (await http.get(f"http://127.0.0.1:{web_port}/metrics")).text
                gateway_metrics = (await http.get(f"{gateway.url}/metrics")).text

        observed = (
            f"auth /readyz {Counter(auth_probes)}, gateway /readyz "
            f"{Counter(s for s, _ in gateway_probes)}, auth health {Counter(health)}, "
            f"SDK {Counter(sdk_results)}, GetToken {dict(load.codes)}"
        )
        # The outage was real: GetToken callers failed while Redis was down.
        assert failed_during > 0, observed
        # Readiness answered within the probe's timeout, every time, and told the truth.
        assert set(auth_probes) == {503}, observed
        assert {status for status, _ in gateway_probes} == {200}, observed
        assert any(json.loads(body)["store"] == "unavailable" for _, body in gateway_probes)
        assert all(json.loads(body)["cached_tokens"] == 1 for _, body in gateway_probes)
        assert set(health) == {"SERVING"}, observed
        # The gateway kept serving from its cached token.
        assert set(sdk_results) == {200}, observed

        lines = json_lines(replica.log())
        errors = [line for line in lines if line["msg"] == STORE_ERROR]
        assert errors, f"no store-error line in the auth log; {observed}"
        for line in errors:
            assert line["level"] == "error"
            assert line["address"] == f"redis://127.0.0.1:{redis.port}/0"
            assert line["operation"]  # the store operation, e.g. get_account
            assert line["error"] in (
                "ConnectionError",
                "TimeoutError",
                "BusyLoadingError",
                "deadline",
            )
        # Rate-limited: per operation and error, one line per interval at most.
        window = recovered_at - killed_at
        bound = math.ceil(window / STORE_ERROR_LOG_INTERVAL_SECONDS) + 1
        per_kind = Counter((line["operation"], line["error"]) for line in errors)
        assert max(per_kind.values()) <= bound, per_kind
        assert ("get_account", "ConnectionError") in per_kind, per_kind
        assert any(line["suppressed"] > 0 for line in errors), errors  # lines left out
        # However many calls failed, the recovery line counts them all.
        back = [line for line in lines if line["msg"] == STORE_BACK]
        assert back, "no line saying the store answers again"
        assert sum(line["errors"] for line in back) >= failed_during, (back, failed_during)

        store_errors = sample(metrics, "keyrelay_auth_store_errors_total", operation="get_account")
        assert store_errors >= failed_during
        not_ready = sample(metrics, "keyrelay_auth_readiness_checks_total", result="not_ready")
        timeouts = sample(metrics, "keyrelay_auth_readiness_checks_total", result="timeout")
        assert not_ready + timeouts > 0
        assert sample(gateway_metrics, "keyrelay_gateway_readiness_checks_total", result="ready")
    finally:
        if gateway is not None:
            await gateway.stop()
        replica.stop()
        redis.stop()
