"""The whole path: SDK → gateway → fake upstream, tokens from the real auth service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import pytest

from keyrelay.auth.rpc.server import RunningServer
from keyrelay.auth.v1 import auth_pb2_grpc
from tests.conftest import AuthFactory
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import OAUTH_KEY, RunningGateway, gateway_config, start_gateway
from tests.support.redis_server import RedisServer


@dataclass
class Stack:
    auth: RunningServer
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub
    upstream: FakeUpstream
    gateway: RunningGateway

    def client(self, key: str = OAUTH_KEY, **options: Any) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url=self.gateway.url, api_key=key, max_retries=0, **options
        )

    async def restart_gateway(self, **gateway: Any) -> None:
        await self.gateway.stop()
        self.gateway = await start_gateway(
            gateway_config(self.upstream.url, self.auth.port, **gateway)
        )


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = await FakeUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def stack(make_auth: AuthFactory, upstream: FakeUpstream) -> AsyncIterator[Stack]:
    auth, stub = await make_auth.start()
    await connect(stub, "acct", login="gateway-user")
    gateway = await start_gateway(gateway_config(upstream.url, auth.port))
    result = Stack(auth, stub, upstream, gateway)
    yield result
    await result.gateway.stop()


@pytest.fixture(scope="module")
def limits_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis for the limits store, with the gateway's ACL user (test_gateway_limits)."""
    from tests.e2e.test_gateway_limits import GATEWAY_USER

    server = RedisServer(tmp_path_factory.mktemp("gw-limits"), acl_user=GATEWAY_USER).start()
    yield server
    server.stop()
