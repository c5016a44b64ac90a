"""Credential pools and single-account routes when the auth service fails them
(issue 12): a real auth service that stops, or a held ``GetToken``, the fake
upstream, and the official SDK as the client (``max_retries=0``).

- An auth outage does not empty a pool of its API-key members, and a request
  waits for the unreachable auth service once, not once per OAuth member.
- A refused token whose newer one is still being fetched when the client goes
  away: the upstream's 401 answer is released, not left holding its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.http import app as gateway_app
from keyrelay.gateway.keys import new_key
from tests.conftest import AuthFactory
from tests.e2e.test_gateway_limits import sdk
from tests.e2e.test_gateway_pools import (
    MESSAGE_START,
    OVERLOADED_EVENT,
    SIMPLE,
    in_process,
    member_of,
    pool_config,
    pool_gateway_data,
    read_stream,
    upstream_keys,
)
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream, Recorded, Scripted
from tests.support.gateway import (
    PLAIN_KEY,
    RunningGateway,
    auth_client_data,
    gateway_config,
    start_gateway,
)
from tests.support.redis_server import RedisServer
from tests.unit.gateway.test_gw_disconnected import (
    Context,
    HeldGetToken,
    HoldingAuth,
    auth_server,
)

ACCOUNTS = ("fault-a", "fault-b")
SPARE_KEY = "sk-spare-" + "0" * 24
DEADLINE = 3.0  # seconds, for anything polled


async def eventually(what: str, predicate: Callable[[], bool], within: float = DEADLINE) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)


async def ready(gateway: RunningGateway) -> bool:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=2.0) as http:
        return (await http.get("/readyz")).status_code == 200


def mixed_pool(
    tmp_path: Path,
    limits_redis: RedisServer,
    upstream: FakeUpstream,
    key: str,
    pool: str,
    auth: dict[str, Any],
) -> dict[str, Any]:
    """A gateway config serving ``key`` from a round-robin pool ``pool`` of the two
    OAuth members (``ACCOUNTS``) and one API-key member, ``spare``."""
    (tmp_path / "spare.key").write_text(SPARE_KEY + "\n")
    (tmp_path / "spare.key").chmod(0o600)
    members: list[dict[str, Any]] = [
        *({"account": account} for account in ACCOUNTS),
        {"name": "spare", "api_key": {"file": str(tmp_path / "spare.key")}},
    ]
    return pool_gateway_data(
        tmp_path, limits_redis, upstream, key, pool, members, strategy="round_robin", auth=auth
    )


async def gateway_after_an_auth_outage(
    tmp_path: Path,
    make_auth: AuthFactory,
    limits_redis: RedisServer,
    upstream: FakeUpstream,
    key: str,
    pool: str,
) -> RunningGateway:
    """A gateway serving ``key`` from a round-robin pool ``pool`` of two OAuth members
    (accounts connected at the real OAuth server) and one API-key member ``spare``,
    started against a real auth service that is then stopped: the auth service is
    down before the gateway fetched any token."""
    auth, stub = await make_auth.start()
    for account in ACCOUNTS:
        await connect(stub, account, login=f"user-{account}")
    data = mixed_pool(tmp_path, limits_redis, upstream, key, pool, auth_client_data([auth.port]))
    gateway = await in_process(data)
    try:
        # Up and talking to the auth service (runtime keys loaded)...
        deadline = time.monotonic() + DEADLINE
        while not await ready(gateway):
            assert time.monotonic() < deadline, "the gateway never became ready"
            await asyncio.sleep(0.02)
        # ...then the auth service goes away (stopped here, not again at teardown).
        make_auth.running.remove(auth)
        await auth.stop(grace=0)
        assert not await ready(gateway)  # /readyz: "auth service unreachable"
    except BaseException:
        await gateway.stop()
        raise
    return gateway


def pool_attempts(gateway: RunningGateway, pool: str, member: str, result: str) -> float:
    value = gateway.app.metrics.registry.get_sample_value(
        "keyrelay_gateway_pool_attempts_total",
        {"pool": pool, "member": member, "result": result},
    )
    return value or 0.0


async def test_an_auth_outage_does_not_empty_a_pool_of_its_api_key_members(
    tmp_path: Path, make_auth: AuthFactory, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    key = new_key()
    gateway = await gateway_after_an_auth_outage(
        tmp_path, make_auth, limits_redis, upstream, key, "outage"
    )
    try:
        async with sdk(gateway.url, key) as client:
            for _ in range(6):  # each turn of the rotation twice
                message = await client.messages.create(**SIMPLE)
                assert message.content
        assert len(upstream.requests) == 6
        assert {r.header("x-api-key") for r in upstream.requests} == {SPARE_KEY}
        assert all(r.header("authorization") is None for r in upstream.requests)
        assert pool_attempts(gateway, "outage", "spare", "served") == 6
        # Unreachable is not disconnected: the accounts stay in the pool for when
        # the auth service is back.
        assert gateway.app.tokens is not None
        assert gateway.app.tokens.disconnected == set()
    finally:
        await gateway.stop()


async def test_a_request_waits_for_an_unreachable_auth_service_once(
    tmp_path: Path, make_auth: AuthFactory, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """Round robin over [fault-a, fault-b, spare] turns the order by one per request
    (the first request starts at the second member): [b, spare, a], [spare, a, b],
    [a, b, spare], twice. The first request meets the outage at b and skips a (one
    wait per request); for ``UNREACHABLE_SECONDS`` after it, the members that would
    wait for the auth service go last, so spare serves the others at once: one
    GetToken in all. Asking each OAuth member would be b, -, a+b, b, -, a+b (6);
    one wait per request without the pause, b, -, a, b, -, a (4)."""
    key = new_key()
    gateway = await gateway_after_an_auth_outage(
        tmp_path, make_auth, limits_redis, upstream, key, "outage-once"
    )
    tokens = gateway.app.tokens
    assert tokens is not None
    try:
        rpcs = tokens.rpcs
        async with sdk(gateway.url, key) as client:
            for _ in range(6):
                await client.messages.create(**SIMPLE)
        tried = {
            account: pool_attempts(gateway, "outage-once", account, "no_credential")
            for account in ACCOUNTS
        }
        assert tried == {"fault-a": 0, "fault-b": 1}
        assert tokens.rpcs - rpcs == 1  # GetToken calls (gRPC's own retries inside each)
        assert tokens.unreachable_until > time.time()
        assert pool_attempts(gateway, "outage-once", "spare", "served") == 6
        assert {r.header("x-api-key") for r in upstream.requests} == {SPARE_KEY}
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: an auth
    service that hangs. Yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_hung_auth_service_costs_a_pool_one_timeout_not_one_per_request(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """The auth service accepts connections and never answers: a GetToken waits its
    whole timeout (1 s here). The first request whose turn starts at an OAuth member
    waits once, then spare serves; the next requests put the OAuth members last and
    are served by spare at once: one GetToken, where each OAuth-first turn waited
    before (3 of the 6 requests)."""
    key = new_key()
    async with silent_server() as port:
        auth = {**auth_client_data([port]), "timeout_seconds": 1}
        gateway = await in_process(mixed_pool(tmp_path, limits_redis, upstream, key, "hung", auth))
        tokens = gateway.app.tokens
        assert tokens is not None
        try:
            async with sdk(gateway.url, key, timeout=30) as client:
                for _ in range(6):
                    await client.messages.create(**SIMPLE)
            assert tokens.rpcs == 1
            assert pool_attempts(gateway, "hung", "fault-b", "no_credential") == 1
            assert pool_attempts(gateway, "hung", "spare", "served") == 6
        finally:
            await gateway.stop()


class RecordingAuth(HoldingAuth):
    """``HoldingAuth`` that also keeps each GetToken's ``stale_generation``, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stale_generations: list[int] = []

    async def get_token(
        self, request: auth_pb2.GetTokenRequest, context: Context
    ) -> auth_pb2.GetTokenResponse:
        self.stale_generations.append(request.stale_generation)
        return await super().get_token(request, context)


async def held_call(auth: HoldingAuth) -> HeldGetToken:
    return await asyncio.wait_for(auth.calls.get(), DEADLINE)


async def test_a_refused_tokens_answer_is_released_when_the_client_goes_away_meanwhile(
    upstream: FakeUpstream,
) -> None:
    """The upstream refuses the token (401) with a body still on its way; the gateway
    asks for a newer token and, while that GetToken waits, the client disconnects:
    the 401's connection is closed at once, not held until its body ends."""
    auth = RecordingAuth()
    body = json.dumps(
        {"type": "error", "error": {"type": "authentication_error", "message": "invalid token"}}
    ).encode()
    upstream.script = [Scripted(401, body)]
    upstream.chunker = lambda data: [data[:10], data[10:]]
    upstream.chunk_delay = 2.0  # the rest of the body 2 s after its head
    async with auth_server(auth) as port:
        gateway = await start_gateway(gateway_config(upstream.url, port))
        pools = gateway.app.upstreams
        held: HeldGetToken | None = None
        try:
            async with sdk(gateway.url, PLAIN_KEY) as client:
                request = asyncio.create_task(client.messages.create(**SIMPLE))
                (await held_call(auth)).release(1)  # the account's token, generation 1
                held = await held_call(auth)  # refused: a newer one, held here
                assert auth.stale_generations == [0, 1]
                assert upstream.requests[-1].header("authorization") == "Bearer access-1"
                (stats,) = pools.stats()
                assert stats.in_use == 1  # the 401, its body unread
                request.cancel()  # the client goes away
                with contextlib.suppress(asyncio.CancelledError):
                    await request
                await eventually(
                    "the refused answer's connection is released",
                    lambda: pools.stats()[0].in_use == 0,
                    within=0.3,  # (its body ends 2 s after its head: released, not ended)
                )
            # The fake upstream saw its connection closed under the rest of the body.
            await eventually("the upstream's write failed", lambda: upstream.aborted_streams == 1)
            assert len(upstream.requests) == 1  # no retry for a client that is gone
            gauge = gateway.app.metrics.registry.get_sample_value(
                "keyrelay_gateway_upstream_connections_in_use", {"upstream": "default"}
            )
            assert gauge == 0
        finally:
            if held is not None:
                held.release(2)
            await gateway.stop()


# -- a pool key's stream, held for its first event -----------------------------------------


def stream_pool(
    tmp_path: Path, redis: RedisServer, upstream: FakeUpstream, name: str
) -> tuple[dict[str, Any], str, Callable[[Recorded], str], dict[str, str]]:
    """A round-robin pool ``name`` of three API-key members: the config's data, the
    gateway key, which member a recorded request went to, and the members' keys."""
    keys = upstream_keys(tmp_path)
    key = new_key()
    data = pool_config(
        tmp_path, redis, upstream, key, "round_robin", name=name, default_cool_down_seconds=30
    )
    return data, key, member_of(keys), keys


def streamed(key: str) -> dict[str, Any]:
    """An httpx request's body and headers: a streamed message for gateway ``key``."""
    return {
        "json": {**SIMPLE, "stream": True},
        "headers": {"x-api-key": key, "anthropic-version": "2023-06-01"},
    }


async def test_a_client_that_leaves_while_the_headers_wait_frees_the_upstream_connection(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """The first event is late (a comment, then 1.5 s of nothing): the client gives up
    while the gateway holds the headers; the upstream's answer is released at once,
    not kept until its stream ends."""
    data, key, _, _ = stream_pool(tmp_path, limits_redis, upstream, "hold-leave")
    gateway = await in_process(data)
    upstream.chunker = lambda body: [b": waiting\n\n", body]
    upstream.chunk_delay = 1.5
    pools = gateway.app.upstreams
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            request = asyncio.create_task(
                http.post(
                    "/v1/messages",
                    **streamed(key),
                )
            )
            await eventually("the upstream answered", lambda: pools.stats()[0].in_use == 1)
            await asyncio.sleep(0.1)  # the gateway now waits for the first event
            assert not request.done()  # (the headers are held)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
        await eventually("the held answer is released", lambda: pools.stats()[0].in_use == 0)
    finally:
        upstream.chunk_delay = 0.0
        await gateway.stop()


async def test_an_overload_event_cools_its_member_when_the_client_hangs_up_on_it(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """The SDK raises at the ``error`` event and hangs up before the upstream's stream
    ends (here 0.5 s later): the member cools down all the same."""
    data, key, member, keys = stream_pool(tmp_path, limits_redis, upstream, "hang-up")
    gateway = await in_process(data)
    overloaded = MESSAGE_START + OVERLOADED_EVENT
    cut = len(overloaded)
    upstream.by_api_key[keys["m1"]] = lambda _: Scripted(
        200, overloaded + b": end\n\n", content_type="text/event-stream"
    )
    upstream.chunker = lambda body: (
        [body[:cut], body[cut:]] if body.startswith(overloaded) else [body]
    )
    upstream.chunk_delay = 0.5  # (after every write: the other streams end 0.5 s late too)
    errors = 0
    try:
        for _ in range(6):
            try:
                await read_stream(gateway.url, key)
            except anthropic.APIStatusError:
                errors += 1
        seen = Counter(member(r) for r in upstream.requests)
        assert (errors, seen["m1"]) == (1, 1)
    finally:
        upstream.chunk_delay = 0.0
        await gateway.stop()


async def test_a_stream_that_breaks_before_its_first_event_gets_an_error_status(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """Nothing has reached the client while the headers wait: an answer cut before its
    first event is a 502 with an error body (which the SDKs retry), not a 200 whose
    stream holds only an error event."""
    data, key, _, keys = stream_pool(tmp_path, limits_redis, upstream, "early-cut")
    gateway = await in_process(data)
    for value in keys.values():
        upstream.by_api_key[value] = lambda _: Scripted(
            200, b"event: message_st", content_type="text/event-stream",
            framing="chunked", cut="reset",
        )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            response = await http.post(
                "/v1/messages",
                **streamed(key),
            )
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["type"] == "api_error"
        assert len(upstream.requests) == 1  # not another member: it was no overload
    finally:
        await gateway.stop()


async def test_comments_trickling_before_the_first_event_hold_the_headers_no_longer(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream, monkeypatch: Any
) -> None:
    """An upstream that sends comments and no event: after the hold's deadline (0.1 s
    here, 10 s in production) the stream goes to the client as it comes."""
    monkeypatch.setattr(gateway_app, "_HOLD_SECONDS", 0.1)
    data, key, _, _ = stream_pool(tmp_path, limits_redis, upstream, "trickle")
    gateway = await in_process(data)
    upstream.chunker = lambda body: [b": waiting\n\n"] * 15 + [body]
    upstream.chunk_delay = 0.1  # the first event 1.5 s after the headers
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            started = time.monotonic()
            async with http.stream(
                "POST",
                "/v1/messages",
                **streamed(key),
            ) as response:
                headers_after = time.monotonic() - started
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
        assert response.status_code == 200
        assert headers_after < 1.2  # before the first event (1.5 s)
        assert b": waiting" in body
        assert b"event: message_stop" in body
    finally:
        upstream.chunk_delay = 0.0
        await gateway.stop()
