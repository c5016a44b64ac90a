"""How the event hub paces its deliveries (issue 9: GetToken beside 1,000 subscribers).

A delivery costs the replica's event loop tens of microseconds, on the loop that
answers GetToken, so the hub wakes subscribers a slice at a time, waits for a slice
to be back before the next, never lets a stuck subscriber hold the others, and while
unary calls are in flight wakes at most ``BUSY_WAKES_PER_SECOND`` (a round at most
``BUSY_ROUND_SECONDS``). The hub runs
here against a real Redis; the subscribers are in-process watches whose "write" is a
sleep, so what is counted is the hub's own pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from keyrelay.auth import events
from keyrelay.auth.events import (
    BUSY_ROUND_SECONDS,
    BUSY_WAKES_PER_SECOND,
    WAKE_SLICE,
    EventHub,
    Watch,
    busy_pace,
)
from keyrelay.auth.store.redis_store import RedisStore
from tests.integration.test_event_fanout import (
    connect_account,
    eventually,
    open_store,
    write_failures,
)
from tests.support.redis_server import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    store = open_store(redis_server.url, prefix)
    await connect_account(store, "noise")
    yield store
    await store.close()


class Readers:
    """Reads watches in tasks; each event is "written" by ``write`` (an awaitable)."""

    def __init__(self) -> None:
        self.received: dict[int, int] = {}
        self.delivering = 0
        self.peak = 0
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, watch: Watch, write: Callable[[], asyncio.Future[None]]) -> None:
        async def read() -> None:
            async for _ in watch:
                self.delivering += 1
                self.peak = max(self.peak, self.delivering)
                try:
                    await write()
                finally:
                    self.delivering -= 1
                self.received[id(watch)] = self.received.get(id(watch), 0) + 1

        self.tasks.append(asyncio.create_task(read()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _hub(store: RedisStore, busy: Callable[[], bool] = lambda: False) -> EventHub:
    hub = EventHub(store, queue_events=256, max_subscribers=1000, block_ms=100, busy=busy)
    await hub.start()
    return hub


def _write_taking(seconds: float) -> Callable[[], asyncio.Future[None]]:
    return lambda: asyncio.ensure_future(asyncio.sleep(seconds))


async def test_at_most_a_slice_of_subscribers_delivers_at_once(store: RedisStore) -> None:
    hub = await _hub(store)
    readers = Readers()
    watches = [hub.subscribe() for _ in range(200)]
    try:
        for watch in watches:
            readers.start(watch, _write_taking(0.002))
        await asyncio.sleep(0.05)  # every reader waits for events
        await write_failures(store, "noise", 1, reason="one")
        await eventually("every subscriber has the event", lambda: len(readers.received) == 200)
        # Woken all at once (the old hub), all 200 were writing together.
        assert 2 <= readers.peak <= WAKE_SLICE
    finally:
        await readers.stop()
        for watch in watches:
            watch.close()
        await hub.stop()


async def test_a_subscriber_stuck_in_its_write_does_not_hold_the_others(
    store: RedisStore,
) -> None:
    hub = await _hub(store)
    readers = Readers()
    never = asyncio.get_running_loop().create_future()  # a write flow control never lets go
    stuck = hub.subscribe()  # first in line: it is in the first slice
    others = [hub.subscribe() for _ in range(3 * WAKE_SLICE)]
    try:
        readers.start(stuck, lambda: never)
        for watch in others:
            readers.start(watch, _write_taking(0.001))
        await asyncio.sleep(0.05)
        await write_failures(store, "noise", 2, reason="two")
        await eventually(
            "every other subscriber has both events",
            lambda: all(readers.received.get(id(w)) == 2 for w in others),
        )
        assert id(stuck) not in readers.received
    finally:
        never.cancel()
        await readers.stop()
        for watch in [stuck, *others]:
            watch.close()
        await hub.stop()


async def test_while_unary_calls_are_in_flight_a_round_is_spread(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 subscribers at 160 wakes a second: a round of 0.4 s (not shortened by the cap).
    monkeypatch.setattr(events, "BUSY_WAKES_PER_SECOND", 160.0)
    monkeypatch.setattr(events, "BUSY_ROUND_SECONDS", 10.0)
    calls_in_flight = True
    hub = await _hub(store, busy=lambda: calls_in_flight)
    readers = Readers()
    arrived: list[float] = []
    watches = [hub.subscribe() for _ in range(4 * WAKE_SLICE)]

    def write() -> asyncio.Future[None]:
        arrived.append(time.monotonic())
        return asyncio.ensure_future(asyncio.sleep(0))

    try:
        for watch in watches:
            readers.start(watch, write)
        await asyncio.sleep(0.05)
        await write_failures(store, "noise", 1, reason="spread")
        await eventually("every subscriber has the event", lambda: len(arrived) == len(watches))
        # Four slices, each taking at least a quarter of the round: the last slice
        # starts at least three quarters of it after the first (a lower bound only:
        # a sleep never ends early, however busy the machine).
        assert arrived[-1] - arrived[0] >= 0.75 * 0.4 - 0.01
    finally:
        calls_in_flight = False
        await readers.stop()
        for watch in watches:
            watch.close()
        await hub.stop()


@pytest.mark.parametrize("waiting", [0, 1, 16, 100, 1000, 4096, 100_000])
def test_the_busy_pace_never_makes_a_round_longer_than_its_cap(waiting: int) -> None:
    pace = busy_pace(waiting)
    assert pace <= 1.0 / BUSY_WAKES_PER_SECOND
    assert waiting * pace <= BUSY_ROUND_SECONDS + 1e-9
    if waiting * (1.0 / BUSY_WAKES_PER_SECOND) <= BUSY_ROUND_SECONDS:
        assert pace == 1.0 / BUSY_WAKES_PER_SECOND  # small rounds: the steady rate
