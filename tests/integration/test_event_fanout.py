"""WatchEvents fans out inside one replica (issue 9, row 1): one reader of the stream,
bounded queues, cuts, history, Redis restarts, and the gateway's resume after a cut.

Tests that count Redis clients or kill Redis start a Redis of their own, so that
``CLIENT LIST`` sees only this replica's connections. Events are written with a
``RedisStore`` on the test's stream (the same scripts the service runs); refresh
failures with a long reason make large events, so that flow control fills quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from prometheus_client import REGISTRY

from keyrelay.auth.config import parse_encryption_keys
from keyrelay.auth.core.fanout import parse_event_id
from keyrelay.auth.store.crypto import TokenCipher
from keyrelay.auth.store.redis_store import RedisStore, StoredTokens
from keyrelay.auth.v1 import EVENTS_CURSOR_METADATA, auth_pb2, auth_pb2_grpc
from keyrelay.gateway.tokens import TokenClient
from tests.conftest import AuthFactory
from tests.integration.test_auth_flow import connect
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer
from tests.support.stack import ENCRYPTION_KEYS, GATEWAY_TOKEN, PROVIDER, admin_md, gateway_md

EV = auth_pb2.AccountEvent
WAIT_SECONDS = 60.0
# auth.events_subscriber_queue of the tests that cut: small, yet roomy enough that a
# reader in this busy process never falls that far behind a burst of writes.
QUEUE = 256
BIG_REASON = "x" * 4000  # ~4 KB per event: gRPC's flow-control window fills in ~1,000


class Subscriber:
    """One WatchEvents stream read in the background: its events and how it ended."""

    def __init__(self, stub: auth_pb2_grpc.AuthServiceAsyncStub, after_event_id: str = "") -> None:
        self.events: list[auth_pb2.AccountEvent] = []
        self.error: aio.AioRpcError | None = None
        self.call = stub.WatchEvents(
            auth_pb2.WatchEventsRequest(after_event_id=after_event_id), metadata=gateway_md()
        )
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.call:
                self.events.append(event)
        except aio.AioRpcError as exc:
            self.error = exc

    async def cursor(self) -> str:
        metadata = dict(await self.call.initial_metadata() or ())
        value = metadata.get(EVENTS_CURSOR_METADATA, "")
        assert isinstance(value, str)
        return value

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def eventually(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def open_store(redis_url: str, prefix: str) -> RedisStore:
    cipher = TokenCipher(parse_encryption_keys(ENCRYPTION_KEYS, "test"))
    return RedisStore.from_url(redis_url, cipher, prefix=prefix, events_stream=f"{prefix}events")


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    store = open_store(redis_server.url, prefix)
    yield store
    await store.close()


async def connect_account(store: RedisStore, account_id: str) -> None:
    """An account connected straight in Redis (one CONNECTED event, generation 1)."""
    await store.connect(
        account_id,
        provider=PROVIDER,
        scopes=["openid"],
        tokens=StoredTokens("access", "refresh"),
        token_type="Bearer",
        expires_at=time.time() + 3600,
        now=time.time(),
    )


async def write_failures(
    store: RedisStore, account_id: str, count: int, reason: str = BIG_REASON
) -> None:
    """``count`` REFRESH_FAILED events (of ~4 KB by default) for a connected account."""
    for _ in range(count):
        assert await store.record_refresh_failure(
            account_id, expected_generation=1, reason=reason, retry_at=0.0, now=time.time()
        )


async def stream_ids(store: RedisStore, after: str = "0-0") -> list[str]:
    """Every event id in the stream after ``after``, in order."""
    ids: list[str] = []
    while True:
        batch = await store.read_history(after, 1000)
        ids += [e.event_id for e in batch]
        if len(batch) < 1000:
            return ids
        after = batch[-1].event_id


def redis_clients(server: RedisServer) -> int:
    """Connections to ``server`` other than the one asking."""
    with server.client() as client:
        return len(client.client_list()) - 1


async def test_a_thousand_subscribers_on_one_replica_leave_gettoken_and_redis_alone(
    tmp_path: Path, oidc: OidcServer, prefix: str
) -> None:
    """Row 1: 99 streams each held a pooled connection in a blocking XREAD; the pool
    (100) ran dry and every GetToken failed with UNAVAILABLE (MaxConnectionsError)."""
    own_redis = RedisServer(tmp_path / "redis").start()
    factory = AuthFactory(own_redis.url, oidc, prefix)
    subscribers: list[Subscriber] = []
    channels: list[aio.Channel] = []
    try:
        running, stub = await factory.start()
        await connect(stub, "fan", login="fan-user")
        channels = [aio.insecure_channel(f"127.0.0.1:{running.port}") for _ in range(8)]
        stubs = [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels]
        subscribers = [Subscriber(stubs[i % len(stubs)]) for i in range(1000)]
        cursors = await asyncio.gather(*(s.cursor() for s in subscribers))

        for _ in range(20):
            token = await stub.GetToken(
                auth_pb2.GetTokenRequest(account_id="fan"), metadata=gateway_md(), timeout=10
            )
            assert token.access_token
        clients = redis_clients(own_redis)
        assert clients <= 10, f"{clients} Redis connections for 1,000 subscribers"
        # Every stream started and named its starting point.
        assert [s.error for s in subscribers if s.error is not None] == []
        assert all(cursors)

        await stub.Disconnect(auth_pb2.DisconnectRequest(account_id="fan"), metadata=admin_md())
        await eventually(
            "every subscriber received the DISCONNECTED event",
            lambda: all(len(s.events) == 1 for s in subscribers),
        )
        received = [s.events[0] for s in subscribers]
        assert len(received) == 1000
        assert {(e.kind, e.account_id) for e in received} == {(EV.DISCONNECTED, "fan")}
        assert [s.error for s in subscribers if s.error is not None] == []
        assert redis_clients(own_redis) <= 10
    finally:
        await asyncio.gather(*(s.close() for s in subscribers))
        for channel in channels:
            await channel.close()
        await factory.close()
        own_redis.stop()


async def test_a_subscriber_that_never_reads_is_cut_and_resumes_without_a_loss(
    make_auth: AuthFactory, store: RedisStore
) -> None:
    running, stub = await make_auth.start(events_subscriber_queue=QUEUE)
    await connect_account(store, "noisy")
    start = await store.last_event_id()
    readers = [Subscriber(stub, start) for _ in range(3)]
    # The slow one has a connection of its own: HTTP/2 flow control is per connection too.
    async with aio.insecure_channel(f"127.0.0.1:{running.port}") as slow_channel:
        slow = auth_pb2_grpc.AuthServiceStub(slow_channel).WatchEvents(
            auth_pb2.WatchEventsRequest(after_event_id=start), metadata=gateway_md()
        )
        assert dict(await slow.initial_metadata() or ())[EVENTS_CURSOR_METADATA] == start
        cut_before = metric("keyrelay_auth_watch_subscribers_cut_total")
        # Events until the slow subscriber's window and its queue are full and it is cut.
        deadline = time.monotonic() + WAIT_SECONDS
        while metric("keyrelay_auth_watch_subscribers_cut_total") == cut_before:
            assert time.monotonic() < deadline, "the subscriber that never reads was never cut"
            await write_failures(store, "noisy", 50)
            await asyncio.sleep(0.05)
        assert metric("keyrelay_auth_watch_subscribers_cut_total") == cut_before + 1
        await write_failures(store, "noisy", 10)  # after the cut: the others still get them
        written = await stream_ids(store, start)
        assert len(written) > QUEUE
        await eventually(
            "the readers received every event",
            lambda: all(len(r.events) == len(written) for r in readers),
        )
        for reader in readers:
            assert [e.event_id for e in reader.events] == written
            assert reader.error is None

        # Now it reads: what gRPC held for it, then the status that says why it ended.
        got: list[str] = []
        ended: aio.AioRpcError | None = None
        try:
            async for event in slow:
                got.append(event.event_id)
        except aio.AioRpcError as exc:
            ended = exc
        assert ended is not None
        assert ended.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"fell more than {QUEUE} events behind" in (ended.details() or "")
        assert "events_subscriber_queue" in (ended.details() or "")
        assert got == written[: len(got)]  # in order, no gap
        assert len(got) < len(written)

        resumed = Subscriber(stub, got[-1])
        await eventually(
            "the resumed subscriber caught up",
            lambda: len(got) + len(resumed.events) == len(written),
        )
        assert got + [e.event_id for e in resumed.events] == written  # nothing lost, no duplicate
        assert resumed.error is None
        await resumed.close()
    await asyncio.gather(*(r.close() for r in readers))


async def test_a_subscriber_from_an_old_cursor_gets_history_then_live_events_in_order(
    make_auth: AuthFactory, store: RedisStore
) -> None:
    await connect_account(store, "old")
    # Far more than the replica keeps in memory (the queue), and several history reads.
    await write_failures(store, "old", 600, reason="old")
    history = await stream_ids(store)
    cursor = history[9]
    history_before = metric("keyrelay_auth_watch_events_fanned_out_total", {"source": "history"})
    # The replica starts after them: they are in Redis only.
    _, stub = await make_auth.start(events_subscriber_queue=256)

    async def keep_writing() -> None:  # live events while it catches up, and after
        for _ in range(20):
            await write_failures(store, "old", 10, reason="new")
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(keep_writing())
    behind = Subscriber(stub, cursor)
    everything = Subscriber(stub, "0-0")
    await writer
    expected = await stream_ids(store, cursor)
    assert len(expected) == len(history) - 10 + 200
    await eventually("it caught up", lambda: len(behind.events) >= len(expected))
    await write_failures(store, "old", 5, reason="later")  # and live ones go on after that
    expected = await stream_ids(store, cursor)
    await eventually("it got the live events", lambda: len(behind.events) >= len(expected))
    await asyncio.sleep(0.2)  # room for a wrong extra event to show up
    assert [e.event_id for e in behind.events] == expected
    await eventually(
        "the one from 0-0 got everything", lambda: len(everything.events) >= len(history) + 205
    )
    assert [e.event_id for e in everything.events] == await stream_ids(store)
    assert behind.error is None
    assert everything.error is None
    served = metric("keyrelay_auth_watch_events_fanned_out_total", {"source": "history"})
    assert served > history_before  # some of it came from Redis history, not the ring
    await behind.close()
    await everything.close()


async def test_subscribers_beyond_the_limit_are_refused_until_one_leaves(
    make_auth: AuthFactory,
) -> None:
    _, stub = await make_auth.start(events_max_subscribers=3)
    refused_before = metric("keyrelay_auth_watch_subscribers_refused_total")
    admitted = [Subscriber(stub) for _ in range(3)]
    assert all(await asyncio.gather(*(s.cursor() for s in admitted)))
    extra = Subscriber(stub)
    await eventually("the fourth ended", extra.task.done)
    assert extra.error is not None
    assert extra.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already serves 3 WatchEvents subscribers" in (extra.error.details() or "")
    assert "events_max_subscribers" in (extra.error.details() or "")
    assert metric("keyrelay_auth_watch_subscribers_refused_total") == refused_before + 1

    await admitted[0].close()
    again = Subscriber(stub)
    deadline = time.monotonic() + WAIT_SECONDS
    while not await again.cursor():  # until the server has seen the first one go
        assert time.monotonic() < deadline
        await again.close()
        await asyncio.sleep(0.05)
        again = Subscriber(stub)
    assert again.error is None
    await asyncio.gather(*(s.close() for s in [*admitted[1:], again]))


async def test_subscribers_stay_connected_through_a_redis_restart(
    tmp_path: Path, oidc: OidcServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py retries a command for a few seconds; an outage longer than that ended
    every WatchEvents stream with UNAVAILABLE. Now the one reader waits it out."""
    caplog.set_level(logging.INFO, logger="keyrelay.auth.events")
    own_redis = RedisServer(tmp_path / "redis").start()
    factory = AuthFactory(own_redis.url, oidc, prefix)
    store = open_store(own_redis.url, prefix)
    subscribers: list[Subscriber] = []
    try:
        _, stub = await factory.start()
        await connect_account(store, "restart")
        subscribers = [Subscriber(stub) for _ in range(5)]
        assert all(await asyncio.gather(*(s.cursor() for s in subscribers)))
        await write_failures(store, "restart", 1)
        await eventually(
            "the first event arrived", lambda: all(len(s.events) == 1 for s in subscribers)
        )

        own_redis.kill()
        await eventually("the reader noticed", lambda: metric("keyrelay_auth_watch_reader_up") == 0)
        # Longer than redis-py's own retries (about 2.5 s): the reader really failed.
        await asyncio.sleep(4)
        own_redis.start()
        await write_failures(store, "restart", 2)

        await eventually(
            "the events written after the restart arrived",
            lambda: all(len(s.events) == 3 for s in subscribers),
        )
        assert [s.error for s in subscribers if s.error is not None] == []
        written = await stream_ids(store)
        for subscriber in subscribers:
            assert [e.event_id for e in subscriber.events] == written[1:]
        messages = [r.getMessage() for r in caplog.records]
        assert "event stream unreadable; WatchEvents subscribers wait, retrying" in messages
        assert "event stream readable again" in messages
        assert metric("keyrelay_auth_watch_reader_up") == 1
    finally:
        await asyncio.gather(*(s.close() for s in subscribers))
        await factory.close()
        await store.close()
        own_redis.stop()


class GatedCall:
    """A WatchEvents call whose events the gateway takes only while the gate is open:
    closed, the gateway stops reading (as a stalled worker would) and gRPC flow control
    fills up on the auth replica. Every event and status is the real call's."""

    def __init__(self, call: Any, gate: asyncio.Event) -> None:
        self._call, self._gate = call, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def __aiter__(self) -> AsyncIterator[auth_pb2.AccountEvent]:
        async for event in self._call:
            await self._gate.wait()
            yield event


async def test_the_gateway_resumes_after_a_cut_and_keeps_its_cache(
    make_auth: AuthFactory, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keyrelay.gateway.tokens")
    running, stub = await make_auth.start(events_subscriber_queue=QUEUE)
    await connect(stub, "cached", login="cached-user")
    await connect_account(store, "noisy")
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    client = TokenClient(channel, GATEWAY_TOKEN)
    gate = asyncio.Event()
    gate.set()
    real_watch = client._stub.WatchEvents
    calls: list[str] = []

    def gated_watch(request: auth_pb2.WatchEventsRequest, **kwargs: Any) -> GatedCall:
        calls.append(request.after_event_id)
        return GatedCall(real_watch(request, **kwargs), gate)

    client._stub.WatchEvents = gated_watch  # type: ignore[assignment]
    applied: list[str] = []
    apply = client.apply_event

    def counting_apply(event: auth_pb2.AccountEvent) -> None:
        applied.append(event.event_id)
        apply(event)

    client.apply_event = counting_apply  # type: ignore[method-assign]
    watcher = asyncio.create_task(client.watch())
    try:
        await eventually("the gateway subscribed", lambda: len(running.service.events.fanout) == 1)
        token = await client.get("cached")
        start = await store.last_event_id()
        gate.clear()  # the gateway stops reading
        cut_before = metric("keyrelay_auth_watch_subscribers_cut_total")
        deadline = time.monotonic() + WAIT_SECONDS
        while metric("keyrelay_auth_watch_subscribers_cut_total") == cut_before:
            assert time.monotonic() < deadline, "the stalled gateway was never cut"
            await write_failures(store, "noisy", 50)
            await asyncio.sleep(0.05)
        await write_failures(store, "noisy", 10)
        written = await stream_ids(store, start)
        gate.set()  # it reads again: the rest of the stream, RESOURCE_EXHAUSTED, a resume
        await eventually("the gateway applied every event", lambda: applied[-1:] == written[-1:])
        after_start = [i for i in applied if parse_event_id(i) > parse_event_id(start)]
        assert after_start == written  # every event once, in order
        assert len(calls) == 2  # one resume
        assert calls[1] in written  # after the last event it had applied
        assert client._last_event_id == written[-1]
        lost = [r for r in caplog.records if r.getMessage() == "event stream lost; reconnecting"]
        assert [getattr(r, "status", "") for r in lost] == ["RESOURCE_EXHAUSTED"]
        # REFRESH_FAILED events evict nothing, and the cut did not clear the cache.
        assert await client.get("cached") is not None
        assert client.rpcs == 1
        assert (await client.get("cached")).access_token == token.access_token
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await client.close()


async def test_a_stopping_replica_ends_its_streams_so_gateways_resume_elsewhere(
    redis_server: RedisServer, oidc: OidcServer, prefix: str
) -> None:
    factory = AuthFactory(redis_server.url, oidc, prefix)
    running, stub = await factory.start()
    subscribers = [Subscriber(stub) for _ in range(3)]
    assert all(await asyncio.gather(*(s.cursor() for s in subscribers)))
    # A long grace: the streams end because the hub ends them, not because it ran out.
    await running.stop(grace=30)
    factory.running.clear()
    for subscriber in subscribers:
        await subscriber.task
        assert subscriber.error is not None
        assert subscriber.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (subscriber.error.details() or "")
    await factory.close()


async def test_a_replica_started_while_redis_is_down_serves_watches_once_it_is_up(
    tmp_path: Path, oidc: OidcServer, prefix: str
) -> None:
    own_redis = RedisServer(tmp_path / "redis")  # not started yet
    factory = AuthFactory(own_redis.url, oidc, prefix)
    subscribers: list[Subscriber] = []
    try:
        _, stub = await factory.start()
        early = Subscriber(stub)
        await early.task
        assert early.error is not None
        assert early.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "has not been read yet" in (early.error.details() or "")

        own_redis.start()
        deadline = time.monotonic() + WAIT_SECONDS
        while True:  # as a gateway does: retry until the replica has read the stream
            subscriber = Subscriber(stub)
            if await subscriber.cursor():
                break
            assert time.monotonic() < deadline, "the reader never found the stream"
            await subscriber.close()
            await asyncio.sleep(0.1)
        subscribers.append(subscriber)
        store = open_store(own_redis.url, prefix)
        try:
            await connect_account(store, "late")
        finally:
            await store.close()
        await eventually("the event arrived", lambda: len(subscriber.events) == 1)
        assert subscriber.events[0].kind == EV.CONNECTED
    finally:
        await asyncio.gather(*(s.close() for s in subscribers))
        await factory.close()
        own_redis.stop()
