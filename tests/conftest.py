"""Shared fixtures: one real Redis and one real OAuth server per test session.

Tests isolate themselves by key prefix instead of flushing, so the session's
Redis can be shared; a test that kills Redis starts its own.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from keyrelay.auth.rpc.server import RunningServer, start_server
from keyrelay.auth.v1 import auth_pb2_grpc
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer
from tests.support.stack import auth_config


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oidc() -> Iterator[OidcServer]:
    with OidcServer.start() as server:
        yield server


SHORT_TTL = 2


@pytest.fixture(scope="session")
def short_oidc() -> Iterator[OidcServer]:
    """An OAuth server whose access tokens live SHORT_TTL seconds."""
    with OidcServer.start(access_token_ttl=SHORT_TTL) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}:"


@pytest.fixture
async def auth_server(
    redis_server: RedisServer, oidc: OidcServer, prefix: str
) -> AsyncIterator[RunningServer]:
    running = await start_server(auth_config(redis_server.url, oidc, prefix=prefix))
    yield running
    await running.stop(grace=0.5)


@pytest.fixture
async def auth_stub(
    auth_server: RunningServer,
) -> AsyncIterator[auth_pb2_grpc.AuthServiceAsyncStub]:
    async with aio.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


class AuthFactory:
    """Starts in-process auth servers with config overrides; stops them at teardown."""

    def __init__(self, redis_url: str, oidc: OidcServer, prefix: str) -> None:
        self.redis_url, self.oidc, self.prefix = redis_url, oidc, prefix
        self.running: list[RunningServer] = []
        self.channels: list[aio.Channel] = []

    async def start(
        self, *, oidc: OidcServer | None = None, **auth: Any
    ) -> tuple[RunningServer, auth_pb2_grpc.AuthServiceAsyncStub]:
        config = auth_config(self.redis_url, oidc or self.oidc, prefix=self.prefix, **auth)
        running = await start_server(config)
        self.running.append(running)
        channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
        self.channels.append(channel)
        return running, auth_pb2_grpc.AuthServiceStub(channel)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for running in self.running:
            await running.stop(grace=0.5)


@pytest.fixture
async def make_auth(
    redis_server: RedisServer, oidc: OidcServer, prefix: str
) -> AsyncIterator[AuthFactory]:
    factory = AuthFactory(redis_server.url, oidc, prefix)
    yield factory
    await factory.close()


def rpc_code(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, aio.AioRpcError), exc
    return exc.code()


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
