"""Every test here runs twice: on asyncio's own loop and on uvloop, the gateway's loop
(their transports differ in details a protocol object sees)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
import uvloop

from keyrelay.gateway.http.upstream import Upstreams
from tests.support.scripted_upstream import Answer, Make, ScriptedServer, config


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Starts a scripted server and an ``Upstreams`` (one upstream, "up") aimed at it;
    ``overrides`` are ``UpstreamConfig`` fields."""
    made: list[tuple[ScriptedServer, Upstreams]] = []

    async def factory(
        *answers: Answer,
        ssl_context: ssl.SSLContext | None = None,
        base_path: str = "",
        **overrides: object,
    ) -> tuple[ScriptedServer, Upstreams]:
        server = await ScriptedServer(list(answers), ssl_context=ssl_context).start()
        scheme, host = ("https", "localhost") if ssl_context else ("http", "127.0.0.1")
        overrides["url"] = f"{scheme}://{host}:{server.port}{base_path}"
        upstreams = Upstreams({"up": config(server.port, **overrides)})
        await upstreams.start()
        made.append((server, upstreams))
        return server, upstreams

    yield factory
    for server, upstreams in made:
        await upstreams.close()
        await server.stop()
