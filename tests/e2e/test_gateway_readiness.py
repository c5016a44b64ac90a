"""The gateway's /readyz: what makes it fail, within its deadline (README, "Readiness").

Ready: an auth replica answers and takes this gateway's service token. Not
ready: no replica answers (503 ``auth service unreachable``) or the auth
service refuses the token (503, a misconfigured secret: the rollout should
stall). The auth service's store being down is not a reason
(tests/e2e/test_redis_outage.py).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from keyrelay.gateway.config import parse_gateway_config
from tests.conftest import AuthFactory
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import gateway_config_data, gateway_env, start_gateway
from tests.support.redis_server import free_port

# The kubelet's timeoutSeconds for the gateway's probe (deploy/base/gateway.yaml);
# the gateway's deadline is 0.8 s.
PROBE_TIMEOUT = 3.0


async def readyz(auth_port: int, upstream: FakeUpstream, **env: str) -> tuple[int, Any, float]:
    """(status, body, the readiness_checks counter of that result) of one probe."""
    data = gateway_config_data(upstream.url, auth_port)
    gateway = await start_gateway(parse_gateway_config(data, {**gateway_env(), **env}))
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT) as http:
            response = await http.get(f"{gateway.url}/readyz")
            metrics = (await http.get(f"{gateway.url}/metrics")).text
    finally:
        await gateway.stop()
    body = json.loads(response.text)
    counted = sum(
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "keyrelay_gateway_readiness_checks_total"
    )
    return response.status_code, body, counted


async def test_ready_when_an_auth_replica_answers(
    make_auth: AuthFactory, upstream: FakeUpstream
) -> None:
    auth, _ = await make_auth.start()
    status, body, counted = await readyz(auth.port, upstream)
    assert (status, body, counted) == (
        200,
        {
            "status": "ready",
            "store": "ok",
            "cached_tokens": 0,
            "runtime_keys": "loaded",
            "runtime_key_count": 0,
        },
        1,
    )


async def test_not_ready_when_the_auth_service_refuses_the_service_token(
    make_auth: AuthFactory, upstream: FakeUpstream
) -> None:
    auth, _ = await make_auth.start()
    status, body, _ = await readyz(auth.port, upstream, KR_GATEWAY_TOKEN="not-a-known-token")
    assert status == 503
    assert body["status"] == "the auth service refused this gateway's service token"


async def test_not_ready_when_no_auth_replica_answers(upstream: FakeUpstream) -> None:
    status, body, _ = await readyz(free_port(), upstream)
    assert (status, body["status"], body["store"]) == (503, "auth service unreachable", "unknown")
