"""``TokenClient.disconnected``: who marks an account, who clears the mark, and
which of two answers wins when a ``GetToken`` and an event cross.

A real grpc.aio server on 127.0.0.1 runs a small auth servicer: its ``GetToken``
holds every call until the test releases it (so a race is played in the order the
test chooses, not left to timing), and its ``WatchEvents`` sends what the test
puts on a queue, with or without the cursor metadata of today's auth service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import EVENTS_CURSOR_METADATA, auth_pb2
from keyrelay.gateway.tokens import (
    AUTH_SERVICE,
    UNREACHABLE_SECONDS,
    CachedToken,
    TokenClient,
    TokenError,
    watching,
)

EV = auth_pb2.AccountEvent
GATEWAY_TOKEN = "gateway-token-0123456789"
WAIT_SECONDS = 10.0
# A GetToken answer: a token of this generation, or the status an account that is
# not connected gets (the gateway's 401).
Answer = int | grpc.StatusCode
DISCONNECTED_ANSWER = grpc.StatusCode.FAILED_PRECONDITION
Context = aio.ServicerContext[Any, Any]


@dataclass
class HeldGetToken:
    """One ``GetToken`` that reached the server and waits for its answer."""

    account_id: str
    answer: asyncio.Future[Answer] = field(default_factory=asyncio.Future)

    def release(self, answer: Answer) -> None:
        self.answer.set_result(answer)


class HoldingAuth:
    """The two methods a gateway's TokenClient calls (the others are UNIMPLEMENTED)."""

    def __init__(self, *, cursor: bool = True) -> None:
        self.cursor = cursor  # False: a server that names no cursor (before the metadata)
        self.calls: asyncio.Queue[HeldGetToken] = asyncio.Queue()
        # Per WatchEvents stream, in order: the events it sends; None ends it (OK).
        self.streams: list[asyncio.Queue[auth_pb2.AccountEvent | None]] = []

    async def get_token(
        self, request: auth_pb2.GetTokenRequest, context: Context
    ) -> auth_pb2.GetTokenResponse:
        held = HeldGetToken(request.account_id)
        await self.calls.put(held)
        answer = await held.answer
        if isinstance(answer, grpc.StatusCode):
            await context.abort(answer, f"account {request.account_id!r} is disconnected")
        return auth_pb2.GetTokenResponse(
            access_token=f"access-{answer}",
            token_type="Bearer",
            expires_at=int(time.time()) + 3600,
            generation=answer,
        )

    async def watch_events(
        self, request: auth_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[auth_pb2.AccountEvent]:
        events: asyncio.Queue[auth_pb2.AccountEvent | None] = asyncio.Queue()
        self.streams.append(events)
        metadata = ((EVENTS_CURSOR_METADATA, request.after_event_id or "0-0"),)
        await context.send_initial_metadata(metadata if self.cursor else ())
        while (event := await events.get()) is not None:
            yield event


class Runs:
    """The client's listener: where each unbroken run of events started."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def key_changed(self, event: auth_pb2.AccountEvent) -> None:
        pass

    def run_started(self, cursor: str) -> None:
        self.started.append(cursor)


async def eventually(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def auth_server(auth: HoldingAuth) -> AsyncIterator[int]:
    """A grpc.aio server on 127.0.0.1 running ``auth``'s GetToken and WatchEvents
    (the other methods: UNIMPLEMENTED); yields its port."""
    server = aio.server()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetToken": grpc.unary_unary_rpc_method_handler(
            auth.get_token,
            request_deserializer=auth_pb2.GetTokenRequest.FromString,
            response_serializer=auth_pb2.GetTokenResponse.SerializeToString,
        ),
        "WatchEvents": grpc.unary_stream_rpc_method_handler(
            auth.watch_events,
            request_deserializer=auth_pb2.WatchEventsRequest.FromString,
            response_serializer=auth_pb2.AccountEvent.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTH_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def serving(auth: HoldingAuth, *, watch: bool = True) -> AsyncIterator[TokenClient]:
    """A TokenClient on a server running ``auth``, its event stream followed (once
    the first stream has started) unless ``watch`` is False."""
    async with auth_server(auth) as port:
        client = TokenClient(aio.insecure_channel(f"127.0.0.1:{port}"), GATEWAY_TOKEN)
        runs = Runs()
        client.listener = runs
        try:
            async with contextlib.AsyncExitStack() as stack:
                if watch:
                    await stack.enter_async_context(watching(client))
                    await eventually("the event stream started", lambda: len(runs.started) == 1)
                yield client
        finally:
            await client.close()


def event(event_id: str, kind: EV.Kind.ValueType, generation: int) -> auth_pb2.AccountEvent:
    return EV(event_id=event_id, account_id="acct", kind=kind, generation=generation)


async def send(client: TokenClient, auth: HoldingAuth, ev: auth_pb2.AccountEvent) -> None:
    """``ev`` on the event stream, returning once the client has applied it."""
    await auth.streams[-1].put(ev)
    await eventually(f"event {ev.event_id} applied", lambda: client._last_event_id == ev.event_id)


async def fetch(
    client: TokenClient, auth: HoldingAuth
) -> tuple[asyncio.Task[CachedToken], HeldGetToken]:
    """A ``get`` whose GetToken has reached the server and waits there."""
    task = asyncio.create_task(client.get("acct"))
    held = await asyncio.wait_for(auth.calls.get(), WAIT_SECONDS)
    assert held.account_id == "acct"
    return task, held


async def test_a_401_sent_before_the_reconnection_leaves_the_account_connected() -> None:
    auth = HoldingAuth()
    async with serving(auth) as client:
        await send(client, auth, event("1-0", EV.DISCONNECTED, 1))
        assert client.disconnected == {"acct"}
        task, held = await fetch(client, auth)  # sent while it is disconnected
        await send(client, auth, event("2-0", EV.CONNECTED, 2))
        assert client.disconnected == set()
        held.release(DISCONNECTED_ANSWER)  # the answer of before, arriving after
        with pytest.raises(TokenError) as caught:
            await task
        assert caught.value.status == 401  # this request fails: its answer said so
        assert client.disconnected == set()  # but the newer event keeps the account usable


async def test_a_token_sent_before_the_disconnection_leaves_the_account_disconnected() -> None:
    auth = HoldingAuth()
    async with serving(auth) as client:
        task, held = await fetch(client, auth)
        await send(client, auth, event("1-0", EV.DISCONNECTED, 2))
        assert client.disconnected == {"acct"}
        held.release(1)  # a token of before the disconnection
        token = await task
        assert token.generation == 1  # used once...
        assert client._cache == {}  # ...not cached (the floor, as before)
        assert client.disconnected == {"acct"}


async def test_a_401_sent_before_a_refresh_leaves_the_account_connected() -> None:
    auth = HoldingAuth()
    async with serving(auth) as client:
        task, held = await fetch(client, auth)
        await send(client, auth, event("1-0", EV.REFRESHED, 2))
        held.release(DISCONNECTED_ANSWER)
        with pytest.raises(TokenError):
            await task
        assert client.disconnected == set()


async def test_several_events_while_a_token_is_in_flight_the_last_one_decides() -> None:
    auth = HoldingAuth()
    async with serving(auth) as client:
        task, held = await fetch(client, auth)
        await send(client, auth, event("1-0", EV.REFRESHED, 2))
        await send(client, auth, event("2-0", EV.DISCONNECTED, 3))
        held.release(2)
        await task
        assert client.disconnected == {"acct"}


async def test_answers_with_no_event_in_flight_set_and_clear_the_mark() -> None:
    auth = HoldingAuth()
    async with serving(auth) as client:
        task, held = await fetch(client, auth)
        held.release(DISCONNECTED_ANSWER)
        with pytest.raises(TokenError):
            await task
        assert client.disconnected == {"acct"}  # a 401 marks it

        task, held = await fetch(client, auth)
        held.release(1)
        await task
        assert client.disconnected == set()  # a token clears it

        # An event applied before the fetch was sent is older than its answer.
        await send(client, auth, event("1-0", EV.CONNECTED, 2))
        task, held = await fetch(client, auth)
        held.release(DISCONNECTED_ANSWER)
        with pytest.raises(TokenError):
            await task
        assert client.disconnected == {"acct"}

        await send(client, auth, event("2-0", EV.DISCONNECTED, 3))
        task, held = await fetch(client, auth)
        held.release(4)
        await task
        assert client.disconnected == set()
        assert client._cache["acct"].generation == 4


async def test_a_restart_from_a_server_naming_no_cursor_forgets_the_marks() -> None:
    auth = HoldingAuth(cursor=False)
    async with serving(auth, watch=False) as client:
        runs = client.listener
        assert isinstance(runs, Runs)
        task, held = await fetch(client, auth)  # before any event stream
        held.release(DISCONNECTED_ANSWER)
        with pytest.raises(TokenError):
            await task
        assert client.disconnected == {"acct"}

        async with watching(client):
            await eventually("the first stream started", lambda: runs.started == [""])
            assert client.disconnected == {"acct"}  # the first stream forgets nothing

            await auth.streams[0].put(None)  # it ends; the next one names no cursor either
            await eventually("the stream restarted", lambda: runs.started == ["", ""])
            # What happened in between is unknown: a reconnection may be among it.
            assert client.disconnected == set()


async def test_a_401_sent_before_a_restart_without_cursor_does_not_mark_again() -> None:
    """The restart forgot every mark because a reconnection may have been missed:
    an answer sent before it is older than that, as it is older than an event."""
    auth = HoldingAuth(cursor=False)
    async with serving(auth, watch=False) as client:
        runs = client.listener
        assert isinstance(runs, Runs)
        async with watching(client):
            await eventually("the first stream started", lambda: runs.started == [""])
            task, held = await fetch(client, auth)
            await auth.streams[0].put(None)  # it ends; the next one names no cursor
            await eventually("the stream restarted", lambda: runs.started == ["", ""])
            held.release(DISCONNECTED_ANSWER)
            with pytest.raises(TokenError):
                await task
            assert client.disconnected == set()


async def test_an_unanswered_get_token_marks_the_auth_service_unreachable_for_a_while() -> None:
    """``unreachable_until``: set when the auth service did not answer a GetToken (a
    pool then tries first the members that need none), cleared by any answer, a
    refusal included; ``cached`` says which accounts need none."""
    auth = HoldingAuth()
    async with serving(auth) as client:
        assert client.unreachable_until == 0.0
        assert not client.cached("acct")
        task, held = await fetch(client, auth)
        before = time.time()
        held.release(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(TokenError) as caught:
            await task
        assert caught.value.status == 503
        assert before + UNREACHABLE_SECONDS <= client.unreachable_until
        assert client.unreachable_until <= time.time() + UNREACHABLE_SECONDS
        assert client.disconnected == set()  # unreachable is not disconnected

        task, held = await fetch(client, auth)
        held.release(DISCONNECTED_ANSWER)  # an answer, if a refusal
        with pytest.raises(TokenError):
            await task
        assert client.unreachable_until == 0.0

        task, held = await fetch(client, auth)
        held.release(grpc.StatusCode.DEADLINE_EXCEEDED)
        with pytest.raises(TokenError):
            await task
        assert client.unreachable_until > time.time()
        task, held = await fetch(client, auth)
        held.release(1)
        await task
        assert client.unreachable_until == 0.0
        assert client.cached("acct")
