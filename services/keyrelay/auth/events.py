"""One reader of the event stream per replica, feeding every ``WatchEvents`` subscriber.

Each gateway process keeps one ``WatchEvents`` stream open. Reading Redis once per
stream held one pooled connection per subscriber in a blocking ``XREAD``: at 99
subscribers the pool (100) was dry and every ``GetToken`` failed. Now::

    Redis stream --XREAD BLOCK, one connection--> EventHub reader --append--> Fanout ring
                                                                                 |  take
    WatchEvents stream <-- Watch <-----------------------------------------------+
                           `-- behind the ring: XRANGE history, HISTORY_READERS at a time

* **Redis connections do not grow with subscribers**: the reader holds one pooled
  connection; subscribers that resume from before the ring read history with
  non-blocking ``XRANGE``, at most ``HISTORY_READERS`` at a time, each giving its
  connection back at once. The rest of the pool is ``GetToken``'s.
* **Bounded queues**: a subscriber may fall ``queue_events`` events behind (the ring,
  ``core/fanout.py``). Beyond, it is cut: ``on_cut`` (the servicer ends the call with
  ``RESOURCE_EXHAUSTED``) or ``FellBehind`` from the iterator. It resumes after the
  last event it received; the events are still in Redis.
* The reader reads at most a quarter of the ring per ``XREAD``, so one burst never
  cuts a subscriber that keeps up.
* **GetToken first**: a delivery costs the replica about 65 us of CPU (gRPC's write
  and its completion), on the event loop that answers GetToken. Subscribers are woken
  ``WAKE_SLICE`` at a time, the next slice when the last is back; while unary calls
  are in flight (``busy``) at most ``BUSY_WAKES_PER_SECOND`` (a round never longer
  than ``BUSY_ROUND_SECONDS``), so the fan-out of one event to a thousand
  subscribers is a steady share of the loop, not a 100 ms burst in front of every
  GetToken.
* **Redis outages**: the reader retries with jittered exponential backoff (logged
  when it starts failing, every ``OUTAGE_LOG_SECONDS`` while it fails, and when it
  reads again); subscribers stay connected and get the events written after Redis
  is back, from where the reader stopped.
* A subscriber never waits for Redis on its own: ``subscribe`` and the live feed
  are memory only. Only history reads can fail (``Unavailable``, the call ends and
  the subscriber resumes later), as can joining before the reader ever found the
  stream's end (Redis unreachable since the replica started).

The pure part (ring, positions, cuts, joins at a cursor) is ``core/fanout.py``;
this module is its driver: tasks, waking, Redis, metrics and logs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final

from redis.exceptions import RedisError

from keyrelay.auth import metrics
from keyrelay.auth.core.errors import Unavailable
from keyrelay.auth.core.fanout import Fanout, NotReady, Subscriber, SubscriberLimit
from keyrelay.auth.store.redis_store import EVENTS_BLOCK_MS, RedisStore, StoredEvent

log = logging.getLogger("keyrelay.auth.events")

HISTORY_READERS: Final = 2  # concurrent XRANGE reads for subscribers behind the ring
HISTORY_BATCH: Final = 200  # events per history read
TAKE_BATCH: Final = 64  # ring events a subscriber takes at once
RETRY_FIRST_SECONDS: Final = 0.1  # the reader's backoff after a failed read...
RETRY_CAP_SECONDS: Final = 5.0  # ...doubling up to this, jittered
OUTAGE_LOG_SECONDS: Final = 30.0  # "still failing" lines while the stream is unreadable
PEERS_LOGGED: Final = 5  # subscribers named in one "cut" line
STOP_RECANCEL_SECONDS: Final = 0.1
FIRST_READ_SECONDS: Final = 1.0  # start() waits this long for the stream's end
# Pacing of deliveries (EventHub._wake_paced), chosen with bench/auth_events.py:
WAKE_SLICE: Final = 16  # subscribers delivering at once
SLICE_WAIT_SECONDS: Final = 0.01  # the longest wait for a slice to be back (a stuck write)
# While unary calls are in flight, subscribers are woken at most this many per second...
BUSY_WAKES_PER_SECOND: Final = 2000.0
BUSY_ROUND_SECONDS: Final = 0.5  # ...unless that would make a round longer than this


def busy_pace(waiting: int) -> float:
    """Seconds per subscriber woken while unary calls are in flight, for a round of
    ``waiting``: BUSY_WAKES_PER_SECOND, faster when the round would last longer than
    BUSY_ROUND_SECONDS (a subscriber never waits more than a round behind)."""
    return min(1.0 / BUSY_WAKES_PER_SECOND, BUSY_ROUND_SECONDS / max(1, waiting))


class TooManySubscribers(Exception):
    """This replica already has ``max_subscribers`` (the servicer: RESOURCE_EXHAUSTED)."""


class FellBehind(Exception):
    """The subscriber fell more than the queue behind and was cut."""


class Watch:
    """One subscriber: an async iterator of events, and a context manager that leaves.

    ``starting_point`` is the event id the watch starts after (for the
    ``keyrelay-events-cursor`` metadata). ``on_cut``, if set, is called at once
    when the hub cuts it, with the message to give the client: a subscriber that
    does not read is cut while its call waits on flow control, so only an outside
    hand can end that call.
    """

    __slots__ = ("_batch", "_hub", "_task", "on_cut", "peer", "subscriber")

    def __init__(self, hub: EventHub, subscriber: Subscriber, peer: str) -> None:
        self._hub = hub
        self.subscriber = subscriber
        self._batch: collections.deque[StoredEvent] = collections.deque()
        self.peer = peer
        self.on_cut: Callable[[str], None] | None = None
        # The task reading this watch, looked up once: asyncio.current_task() costs a
        # getpid() syscall on Python 3.11, once per delivery otherwise.
        self._task: asyncio.Task[object] | None = None

    @property
    def starting_point(self) -> str:
        return self.subscriber.starting_point

    @property
    def cut(self) -> bool:
        return self.subscriber.cut

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> StoredEvent:
        hub = self._hub
        while True:
            if self._batch:
                return self._batch.popleft()
            if self.subscriber.cut:
                raise FellBehind(hub.cut_message)
            if hub.stopping or self.subscriber.left:
                raise Unavailable("this auth replica is shutting down; watch another one")
            if self.subscriber.catching_up:
                self._batch.extend(await hub.read_history(self.subscriber))
                continue
            taken = hub.fanout.take(self.subscriber, TAKE_BATCH)
            if taken:
                hub.live_handed += len(taken)  # into the metric at the next read (cheaper)
                self._batch.extend(taken)
                continue
            task = self._task
            if task is None:
                task = self._task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The call was cancelled during a history read and the cancellation
                # was dropped on the way (see EventHub.stop): do not wait for events.
                raise asyncio.CancelledError
            await hub.wait_for_events(self.subscriber.key)

    def close(self) -> None:
        self._hub.leave(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventHub:
    """The replica's one reader of the event stream and its subscribers."""

    def __init__(
        self,
        store: RedisStore,
        *,
        queue_events: int,
        max_subscribers: int,
        block_ms: int = EVENTS_BLOCK_MS,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._store = store
        self._busy = busy
        self.fanout: Fanout[StoredEvent] = Fanout(queue_events, max_subscribers)
        self._read_count = max(1, queue_events // 4)
        self._block_ms = block_ms
        self._waiters: dict[int, asyncio.Future[None]] = {}  # subscriber key -> its wake-up
        self._delivering: set[int] = set()  # woken in the current slice, not yet back
        self._slice_back: asyncio.Future[None] | None = None  # done when _delivering empties
        self.live_handed = 0  # live events handed out since the metric was last updated
        self._history_slots = asyncio.Semaphore(HISTORY_READERS)
        self._watches: dict[int, Watch] = {}
        self._reader: asyncio.Task[None] | None = None
        self._rng = random.Random()  # noqa: S311  # jitter, not secrets
        self.stopping = False
        self.cut_message = (
            f"this WatchEvents subscriber fell more than {queue_events} events behind "
            "(auth.events_subscriber_queue) and was cut; resume with after_event_id set "
            "to the last event received: nothing is lost"
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Finds the stream's end (so that the first subscribers are served, not told
        to come back), then reads on in a task. Redis down: the task keeps trying."""
        if self._reader is not None:
            return
        try:
            async with asyncio.timeout(FIRST_READ_SECONDS):
                self.fanout.sync(await self._store.last_event_id())
            metrics.WATCH_READER_UP.set(1)
        except (RedisError, TimeoutError) as exc:
            log.warning(
                "event stream unreadable at start; WatchEvents waits for Redis",
                extra={"error": type(exc).__name__},
            )
        self._reader = asyncio.create_task(self._read_forever(), name="keyrelay-events")

    async def stop(self) -> None:
        """Stops reading; every waiting subscriber ends with UNAVAILABLE."""
        self.stopping = True
        reader, self._reader = self._reader, None
        # Python 3.11's asyncio.wait_for (redis-py sends every command through one)
        # drops a cancellation that lands as the call it waits for completes
        # (CPython gh-86296): cancel until the reader has ended.
        while reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait({reader}, timeout=STOP_RECANCEL_SECONDS)
        self._wake_all()

    # -- subscribers ------------------------------------------------------------------

    def subscribe(self, after_event_id: str = "", *, peer: str = "") -> Watch:
        """A watch of the events after ``after_event_id`` ("": from now on)."""
        if self.stopping:
            raise Unavailable("this auth replica is shutting down; watch another one")
        try:
            subscriber = self.fanout.join(after_event_id)
        except NotReady:
            raise Unavailable(
                "the event stream has not been read yet (Redis unreachable since this "
                "replica started); retry shortly"
            ) from None
        except SubscriberLimit:
            metrics.WATCH_REFUSED.inc()
            raise TooManySubscribers(
                f"this auth replica already serves {self.fanout.max_subscribers} WatchEvents "
                "subscribers (auth.events_max_subscribers); retry, another replica may "
                "have room"
            ) from None
        watch = Watch(self, subscriber, peer)
        self._watches[subscriber.key] = watch
        metrics.WATCH_SUBSCRIBERS.inc()
        return watch

    def leave(self, watch: Watch) -> None:
        self._back(watch.subscriber.key)
        self.fanout.leave(watch.subscriber)
        if self._watches.pop(watch.subscriber.key, None) is not None:
            metrics.WATCH_SUBSCRIBERS.dec()

    async def wait_for_events(self, key: int) -> None:
        """Until the reader has new events (or stops) for a subscriber that has none."""
        self._back(key)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        try:
            await waiter
        finally:
            if self._waiters.get(key) is waiter:  # cancelled: forget it at once
                del self._waiters[key]

    async def read_history(self, subscriber: Subscriber) -> list[StoredEvent]:
        """The next events of a subscriber behind the ring, from Redis."""
        async with self._history_slots:
            if not subscriber.catching_up:  # cut or left while it waited for a slot
                return []
            try:
                events = await self._store.read_history(subscriber.history_cursor, HISTORY_BATCH)
            except RedisError as exc:
                raise Unavailable(
                    f"event history unreadable: token store (Redis) unavailable "
                    f"({type(exc).__name__}); resume shortly"
                ) from exc
        handed = self.fanout.caught_up(subscriber, events, exhausted=len(events) < HISTORY_BATCH)
        metrics.watch_events_fanned_out("history", len(handed))
        return handed

    # -- the reader -------------------------------------------------------------------

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    def _back(self, key: int) -> None:
        """A subscriber woken by ``_wake_paced`` is done delivering (it waits again, or left)."""
        delivering = self._delivering
        if key in delivering:
            delivering.discard(key)
            if not delivering and self._slice_back is not None and not self._slice_back.done():
                self._slice_back.set_result(None)

    async def _wake_paced(self) -> None:
        """Wakes the waiting subscribers WAKE_SLICE at a time, the next slice once the
        last is back waiting (its events written) or after SLICE_WAIT_SECONDS.

        A delivery costs the replica tens of microseconds of its event loop (mostly
        gRPC's write and the wake-up of its completion), and the loop is the one that
        answers GetToken. Waking a thousand subscribers at once put a thousand writes,
        then a thousand completions, in front of every GetToken in the loop's queue;
        paced, a GetToken waits behind at most one slice. While ``busy()`` (unary calls
        in flight) each slice also takes at least its share of the busy pace.
        The time limit keeps a subscriber whose write waits on flow control (a client
        that does not read) from holding the others: it stops counting, the hub goes
        on, and the ring cuts it if it stays behind.
        """
        waiters, self._waiters = list(self._waiters.items()), {}
        loop = asyncio.get_running_loop()
        spread = busy_pace(len(waiters))
        woken = 0
        try:
            while woken < len(waiters):
                batch = waiters[woken : woken + WAKE_SLICE]
                woken += len(batch)
                self._delivering = {key for key, waiter in batch if not waiter.done()}
                if not self._delivering:
                    continue
                self._slice_back = back = loop.create_future()
                started = loop.time()
                for _, waiter in batch:
                    if not waiter.done():
                        waiter.set_result(None)
                await asyncio.wait((back,), timeout=SLICE_WAIT_SECONDS)
                if self._busy():
                    rest = started + len(batch) * spread - loop.time()
                    if rest > 0:
                        await asyncio.sleep(rest)
        finally:  # stopped halfway: nobody is left waiting
            self._delivering = set()
            self._slice_back = None
            for _, waiter in waiters[woken:]:
                if not waiter.done():
                    waiter.set_result(None)

    async def deliver(self, events: list[StoredEvent]) -> None:
        """Adds events the reader read, cuts who fell behind, wakes the others."""
        # One counter update per read rather than per delivery: each update takes a
        # lock (about 5 us under cProfile, of some 140 us per delivery, client included).
        metrics.watch_events_fanned_out("live", self.live_handed)
        self.live_handed = 0
        cut = self.fanout.append(events)
        if cut:
            metrics.WATCH_CUT.inc(len(cut))
            watches = [w for w in (self._watches.pop(s.key, None) for s in cut) if w]
            log.warning(
                "WatchEvents subscribers cut: fell behind",
                extra={
                    "count": len(cut),
                    "queue_events": self.fanout.capacity,
                    "peers": [w.peer for w in watches[:PEERS_LOGGED]],
                },
            )
            metrics.WATCH_SUBSCRIBERS.dec(len(watches))
            for watch in watches:
                if watch.on_cut is not None:
                    watch.on_cut(self.cut_message)
        await self._wake_paced()

    async def _read_forever(self) -> None:
        delay = RETRY_FIRST_SECONDS
        failing_since: float | None = None
        failures = 0
        logged_at = 0.0
        while not self.stopping:
            try:
                if not self.fanout.synced:
                    self.fanout.sync(await self._store.last_event_id())
                events = await self._store.read_events(
                    self.fanout.last_id, block_ms=self._block_ms, count=self._read_count
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, or a bug: never stop reading
                now = time.monotonic()
                failures += 1
                if failing_since is None or now - logged_at >= OUTAGE_LOG_SECONDS:
                    log.warning(
                        "event stream unreadable; WatchEvents subscribers wait, retrying",
                        extra={
                            "error": type(exc).__name__,
                            "detail": str(exc)[:200],
                            "failures": failures,
                            "down_seconds": round(now - (failing_since or now), 1),
                            "subscribers": len(self.fanout),
                        },
                        exc_info=not isinstance(exc, RedisError),
                    )
                    logged_at = now
                if failing_since is None:
                    failing_since = now
                metrics.WATCH_READER_UP.set(0)
                await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
                delay = min(RETRY_CAP_SECONDS, delay * 2)
                continue
            if failing_since is not None:
                log.info(
                    "event stream readable again",
                    extra={
                        "down_seconds": round(time.monotonic() - failing_since, 1),
                        "failures": failures,
                        "after": self.fanout.last_id,
                    },
                )
                failing_since, failures, delay = None, 0, RETRY_FIRST_SECONDS
            metrics.WATCH_READER_UP.set(1)
            if events:
                await self.deliver(events)
