"""The pool's bounds: a deadline for the wait, a bounded queue, and the counts
behind the metrics (row 4 of issue 9: requests beyond ``max_connections``
waited forever).

The connections are held by answers that a test releases (``gated``), so
"the pool is full" is a fact on the wire, not a mock.
"""

from __future__ import annotations

import asyncio

import pytest

from keyrelay.gateway.core.errors import UPSTREAM_POOL_EXHAUSTED, GatewayError
from keyrelay.gateway.http.upstream import RETRY_AFTER_SECONDS, WAIT_BUCKETS, PoolStats, Upstreams
from tests.support.scripted_upstream import (
    Answer,
    Make,
    Request,
    ScriptedServer,
    json_answer,
    post,
    read,
    settle,
    stall,
)

# uvloop's clock counts whole milliseconds, cached per loop iteration.
TICK = 0.002


def gated(gate: asyncio.Event) -> Answer:
    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        await json_answer()(request, writer)

    return answer


def stats(upstreams: Upstreams) -> PoolStats:
    (only,) = upstreams.stats()
    return only


async def full_pool(make: Make, size: int, **overrides: object) -> tuple[
    ScriptedServer, Upstreams, asyncio.Event, list[asyncio.Task[tuple[int, bytes]]]
]:  # fmt: skip
    """A pool of ``size`` connections, each carrying a request held until the gate opens."""
    gate = asyncio.Event()
    server, upstreams = await make(gated(gate), max_connections=size, **overrides)
    holders = [asyncio.create_task(read(upstreams)) for _ in range(size)]
    await settle(lambda: len(server.requests) == size)
    return server, upstreams, gate, holders


async def test_a_wait_past_the_deadline_is_a_503_with_retry_after(make: Make) -> None:
    server, upstreams, gate, holders = await full_pool(make, 2, pool_timeout_seconds=0.3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(GatewayError) as caught:
        await asyncio.wait_for(read(upstreams), 30)  # generous: the deadline ends it
    waited = asyncio.get_running_loop().time() - started
    error = caught.value
    assert error.kind is UPSTREAM_POOL_EXHAUSTED
    assert (error.status, error.kind.type) == (503, "overloaded_error")
    assert error.retry_after == RETRY_AFTER_SECONDS
    assert "'up'" in error.message
    assert "upstreams.up.pool_timeout_seconds" in error.message
    assert waited >= 0.3 - TICK  # never before the deadline
    assert len(server.requests) == 2  # it never reached the upstream
    now = stats(upstreams)
    assert (now.open, now.in_use, now.idle, now.waiting) == (2, 2, 0, 0)
    assert now.rejected_timeout == 1
    # The wait is in the histogram's counts: two found a free slot, one waited >= 0.3 s.
    assert sum(now.wait_buckets) == 3
    assert now.wait_buckets[0] == 2
    assert sum(now.wait_buckets[: WAIT_BUCKETS.index(0.25) + 1]) == 2
    assert now.wait_sum >= 0.3 - TICK
    gate.set()
    assert [(await h)[0] for h in holders] == [200, 200]
    assert (await read(upstreams))[0] == 200  # the pool works again


async def test_a_waiter_served_before_its_deadline_waits_and_is_counted(make: Make) -> None:
    server, upstreams, gate, holders = await full_pool(make, 1, pool_timeout_seconds=60)
    waiting = asyncio.create_task(read(upstreams))
    await settle(lambda: stats(upstreams).waiting == 1)
    await asyncio.sleep(0.05)
    gate.set()
    assert (await waiting)[0] == 200
    assert (await holders[0])[0] == 200
    now = stats(upstreams)
    assert now.rejected_timeout == now.rejected_queue_full == 0
    assert now.waiting == 0
    assert sum(now.wait_buckets) == 2
    assert now.wait_buckets[0] == 1  # the holder; the waiter waited >= 0.05 s
    assert now.wait_sum >= 0.05 - TICK
    assert server.connections == 1  # the waiter got the holder's connection


async def test_beyond_max_waiting_a_request_is_refused_at_once(make: Make) -> None:
    server, upstreams, gate, holders = await full_pool(
        make, 1, pool_timeout_seconds=60, max_waiting=2
    )
    waiting = [asyncio.create_task(read(upstreams)) for _ in range(2)]
    await settle(lambda: stats(upstreams).waiting == 2)
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    # At once: the two in the queue still wait (their deadline is a minute away).
    assert not any(task.done() for task in waiting)
    assert caught.value.kind is UPSTREAM_POOL_EXHAUSTED
    assert caught.value.retry_after == RETRY_AFTER_SECONDS
    assert "upstreams.up.max_waiting" in caught.value.message
    assert stats(upstreams).rejected_queue_full == 1
    gate.set()
    assert [(await task)[0] for task in [*holders, *waiting]] == [200, 200, 200]
    assert len(server.requests) == 3


async def test_max_waiting_zero_means_no_queue(make: Make) -> None:
    _, upstreams, gate, holders = await full_pool(make, 1, max_waiting=0)
    with pytest.raises(GatewayError) as caught:
        await read(upstreams)
    assert caught.value.kind is UPSTREAM_POOL_EXHAUSTED
    gate.set()
    assert (await holders[0])[0] == 200


async def test_waiters_are_served_first_come_first_served(make: Make) -> None:
    _, upstreams, gate, holders = await full_pool(make, 1, pool_timeout_seconds=60)
    order: list[int] = []

    async def numbered(n: int) -> None:
        await read(upstreams)
        order.append(n)

    waiting = []
    for n in range(5):
        waiting.append(asyncio.create_task(numbered(n)))
        await settle(lambda n=n: stats(upstreams).waiting == n + 1)  # type: ignore[misc]
    gate.set()
    await asyncio.gather(*holders, *waiting)
    assert order == [0, 1, 2, 3, 4]


async def test_a_cancelled_waiter_leaves_the_queue(make: Make) -> None:
    _, upstreams, gate, holders = await full_pool(make, 1, pool_timeout_seconds=60)
    waiter = asyncio.create_task(read(upstreams))
    await settle(lambda: stats(upstreams).waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert stats(upstreams).waiting == 0
    gate.set()
    assert (await holders[0])[0] == 200
    assert stats(upstreams).open == 1


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_goes_to_the_next(
    make: Make,
) -> None:
    """A freed slot is counted for the first waiter as it is handed over; if that
    waiter is cancelled before it runs, the slot must reach the next one, not leak."""
    _, upstreams = await make(stall(), json_answer(), max_connections=1)
    held = await asyncio.wait_for(_headers_never_come(upstreams), 30)
    first = asyncio.create_task(read(upstreams))
    second = asyncio.create_task(read(upstreams))
    await settle(lambda: stats(upstreams).waiting == 2)
    held.cancel()  # the held request goes: its connection closes, its slot goes to `first`
    await asyncio.sleep(0)  # the holder's cancellation runs (it releases the connection)
    first.cancel()  # ... and `first` is cancelled before it could use the slot
    with pytest.raises(asyncio.CancelledError):
        await held
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await asyncio.wait_for(second, 30))[0] == 200
    now = stats(upstreams)
    assert (now.open, now.idle, now.waiting) == (1, 1, 0)


async def _headers_never_come(upstreams: Upstreams) -> asyncio.Task[object]:
    """A request that holds the only connection (the server never answers)."""
    task: asyncio.Task[object] = asyncio.create_task(post(upstreams))
    await settle(lambda: stats(upstreams).in_use == 1)
    return task


async def test_stats_follow_the_connections(make: Make) -> None:
    _, upstreams, gate, holders = await full_pool(make, 3, pool_timeout_seconds=60)
    assert (stats(upstreams).open, stats(upstreams).in_use, stats(upstreams).idle) == (3, 3, 0)
    gate.set()
    await asyncio.gather(*holders)
    now = stats(upstreams)
    assert (now.open, now.in_use, now.idle, now.waiting) == (3, 0, 3, 0)
    assert now.upstream == "up"
