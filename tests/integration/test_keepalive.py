"""The gateway's channel and the auth server agree on HTTP/2 keepalive pings.

The gateway pings (``gateway.auth.keepalive_seconds``) to find a dead connection
under an event stream that may carry no data for hours. gRPC servers answer pings
more frequent than their ``min_ping_interval_without_data`` (5 min by default) with
``GOAWAY too_many_pings``: with the defaults of both sides every idle stream was cut
every few minutes. Here the intervals are shrunk (1 s pings) so that "several ping
intervals" fit in a test; the second case keeps gRPC's own server default and shows
the cut the agreement prevents.
"""

from __future__ import annotations

import asyncio

import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.gateway.tokens import open_channel
from tests.conftest import AuthFactory
from tests.integration.test_auth_flow import connect
from tests.support.stack import gateway_md

PING_SECONDS = 1.0
IDLE_SECONDS = 6.0  # six ping intervals with no data on the stream


async def idle_stream_outcome(make_auth: AuthFactory, server_min_ping: float) -> str:
    """Opens an event stream as a gateway does, leaves it idle, then sends one event
    through it. Returns "delivered" or the status that ended the stream."""
    running, stub = await make_auth.start(min_client_ping_interval_seconds=server_min_ping)
    channel = open_channel(f"127.0.0.1:{running.port}", keepalive_seconds=PING_SECONDS)
    try:
        watcher = auth_pb2_grpc.AuthServiceStub(channel)
        call = watcher.WatchEvents(auth_pb2.WatchEventsRequest(), metadata=gateway_md())
        await call.initial_metadata()
        reader = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({reader}, timeout=IDLE_SECONDS)
        if done:
            try:
                reader.result()
            except aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return "an event arrived on an idle stream"
        await connect(stub, "keepalive", login="keepalive-user")
        event = await asyncio.wait_for(reader, 10)
        assert isinstance(event, auth_pb2.AccountEvent), event
        assert event.account_id == "keepalive"
        call.cancel()
        return "delivered"
    finally:
        await channel.close()


async def test_an_idle_event_stream_outlives_many_pings(make_auth: AuthFactory) -> None:
    # The auth server permits pings twice as often as the gateway sends them.
    assert await idle_stream_outcome(make_auth, server_min_ping=PING_SECONDS / 2) == "delivered"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_grpc_default_server_policy_cuts_the_stream(make_auth: AuthFactory) -> None:
    """What the agreement prevents: 300 s is gRPC's default minimum ping interval."""
    outcome = await idle_stream_outcome(make_auth, server_min_ping=300)
    assert outcome.startswith("UNAVAILABLE"), outcome
