"""Readiness answers within its deadline, whatever Redis does (issue 9, row 7).

A Redis that hangs (SIGSTOP: connections are accepted, nothing is answered) is
worse for a probe than a dead one: every read waits for the socket timeout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from keyrelay.auth.rpc.server import RunningServer, start_server
from keyrelay.auth.service import STORE_ERROR_LINE
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer, free_port
from tests.support.web import web_config

# The time a prober gives the answer (the kubelet's timeoutSeconds for the gateway's
# probe): generous against the deadline (0.8 s), short against a hung Redis (10 s).
PROBE_TIMEOUT = 3.0
PROBES = 50


@pytest.fixture
async def hung_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    assert server._process is not None
    server._process.send_signal(signal.SIGCONT)
    server.stop()


def checks(result: str) -> float:
    value = REGISTRY.get_sample_value("keyrelay_auth_readiness_checks_total", {"result": result})
    return value or 0.0


async def test_web_readyz_answers_within_its_deadline_while_redis_hangs(
    hung_redis: RedisServer, oidc: OidcServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    web_port = free_port()
    running: RunningServer = await start_server(
        web_config(hung_redis.url, oidc, prefix=prefix, web_port=web_port)
    )
    caplog.set_level(logging.ERROR, logger="keyrelay.auth")
    readyz = f"http://127.0.0.1:{web_port}/readyz"
    try:
        async with (
            httpx.AsyncClient(timeout=PROBE_TIMEOUT) as http,
            aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        ):
            assert (await http.get(readyz)).status_code == 200
            assert hung_redis._process is not None
            hung_redis._process.send_signal(signal.SIGSTOP)
            before = checks("timeout")

            # A flood of probes: each answered in time, and they share the checks.
            answers = await asyncio.gather(
                *(http.get(readyz) for _ in range(PROBES)), return_exceptions=True
            )
            statuses = [
                a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers
            ]
            assert statuses == [503] * PROBES
            assert 1 <= checks("timeout") - before < PROBES / 5
            (line, *_) = [r for r in caplog.records if r.msg == STORE_ERROR_LINE]
            assert (vars(line)["operation"], vars(line)["error"]) == ("ping", "deadline")

            # The gRPC health (the Kubernetes probe) stays SERVING: docs/decisions.md.
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="keyrelay.auth.v1.AuthService"),
                timeout=PROBE_TIMEOUT,
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            hung_redis._process.send_signal(signal.SIGCONT)
            for _ in range(100):
                if (await http.get(readyz)).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("/readyz did not come back after Redis did")
    finally:
        await running.stop(grace=0.5)
