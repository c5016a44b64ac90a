"""Fixtures of the web side's tests: an auth service with ``[auth.web]`` on a known port.

The port is fixed per module so that the OAuth server can list the web callback among
its allowed redirect URIs before any service starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from keyrelay.auth.rpc.server import RunningServer, start_server
from tests.support.oidc import DEFAULT_REDIRECT_URI, OidcServer
from tests.support.redis_server import RedisServer, free_port
from tests.support.web import callback_uri, web_config


@pytest.fixture(scope="module")
def web_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def web_oidc(web_port: int) -> Iterator[OidcServer]:
    uris = (callback_uri(web_port), DEFAULT_REDIRECT_URI)
    with OidcServer.start(redirect_uris=uris) as server:
        yield server


@pytest.fixture
async def web_server(
    redis_server: RedisServer, web_oidc: OidcServer, prefix: str, web_port: int
) -> AsyncIterator[RunningServer]:
    config = web_config(redis_server.url, web_oidc, prefix=prefix, web_port=web_port)
    running = await start_server(config)
    yield running
    await running.stop(grace=0.5)
