"""The fan-out of account events to ``WatchEvents`` subscribers, free of I/O.

One reader per replica reads the Redis event stream and hands each batch to
:meth:`Fanout.append`; every subscriber of the replica takes its events from
here (:meth:`Fanout.take`), never from Redis. The I/O around it (the reader,
waking subscribers, reading history) is ``keyrelay.auth.events``.

**One ring, one position per subscriber.** The last ``capacity`` events read
are kept once, in a ring; a subscriber is a position in it. Its queue is the
span from its position to the head, so it is bounded by ``capacity`` events,
and the memory is that of one ring whatever the number of subscribers. When
an append pushes out an event a subscriber has not taken yet, the subscriber
has fallen more than ``capacity`` events behind: it is *cut* (``append``
returns it). Nothing is lost: the events are still in Redis, and it resumes
after the last event it received.

**Joining at a cursor** (``after``, a stream id ``<ms>-<seq>``, compared as the
pair of numbers)::

    after                                   served from
    ------------------------------------    -----------------------------------------
    none ("")                               the head; the starting point named to the
                                            subscriber is the last event read
    >= the ring's start (the id just        the ring, from the first event after it
    before its oldest event)
    > the last event read (another replica  the head; events up to ``after`` are
    read further already)                   skipped when they arrive
    < the ring's start                      Redis history first (``caught_up`` with
                                            each batch read), then the ring

A subscriber catching up from history joins the ring as soon as the last event
it was handed is at or after the ring's start: the ring holds every event after
its start, and the subscriber's position is the first event after what it was
handed, so there is neither a gap nor a duplicate. Every check and move happens
in one call, with nothing in between that could change the ring.

A subscriber's ``cursor`` is the id of the last event handed to it (or its
starting point); ``take`` never hands out an event at or before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = [
    "Event",
    "EventId",
    "Fanout",
    "NotReady",
    "Subscriber",
    "SubscriberLimit",
    "format_event_id",
    "parse_event_id",
]

EventId = tuple[int, int]


class Event(Protocol):
    @property
    def event_id(self) -> str: ...


E = TypeVar("E", bound=Event)


class SubscriberLimit(Exception):
    """The replica already serves ``max_subscribers`` subscribers."""


class NotReady(Exception):
    """The reader has not yet found the stream's end (Redis unreachable since start)."""


def parse_event_id(text: str) -> EventId:
    """``"1700000000000-3"`` → ``(1700000000000, 3)``; the caller checked the form."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_event_id(event_id: EventId) -> str:
    return f"{event_id[0]}-{event_id[1]}"


@dataclass(eq=False, slots=True)
class Subscriber:
    """One subscriber's bookkeeping; only ``Fanout`` changes it."""

    key: int
    starting_point: str  # the cursor named to the subscriber
    cursor: EventId  # the last event handed over, or the starting point
    position: int = 0  # sequence number of the next ring event to look at
    catching_up: bool = False  # behind the ring's start: served from Redis history
    cut: bool = False  # fell behind by more than the ring holds
    left: bool = False

    @property
    def history_cursor(self) -> str:
        """Where the next history read starts (exclusive)."""
        return format_event_id(self.cursor)


class Fanout(Generic[E]):
    """The ring of recent events and every subscriber's position in it.

    Sequence numbers count events appended since creation; the ring holds
    sequence numbers ``[first, head)`` at ``seq % capacity``.
    """

    def __init__(self, capacity: int, max_subscribers: int) -> None:
        if capacity < 1 or max_subscribers < 1:
            raise ValueError("capacity and max_subscribers must be at least 1")
        self.capacity = capacity
        self.max_subscribers = max_subscribers
        self._events: list[E | None] = [None] * capacity
        self._ids: list[EventId] = [(0, 0)] * capacity
        self._head = 0  # sequence number of the next event appended
        self._start: EventId = (0, 0)  # the id just before the ring's oldest event
        self._last: EventId = (0, 0)  # the id of the last event appended
        self._synced = False
        self._subscribers: dict[int, Subscriber] = {}
        self._next_key = 0

    # -- the reader's side ----------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced

    @property
    def last_id(self) -> str:
        """The id the reader reads after (the last event appended, or the stream's end)."""
        return format_event_id(self._last)

    @property
    def start_id(self) -> str:
        return format_event_id(self._start)

    def sync(self, stream_end: str) -> None:
        """The stream's end when the reader first read it: the ring starts there."""
        if not self._synced:
            self._start = self._last = parse_event_id(stream_end)
            self._synced = True

    @property
    def _first(self) -> int:
        return max(0, self._head - self.capacity)

    def append(self, events: Sequence[E]) -> list[Subscriber]:
        """Adds events read after ``last_id`` (in stream order); returns the subscribers
        this cut because an event they had not taken left the ring."""
        assert self._synced, "sync() before append()"
        for event in events:
            event_id = parse_event_id(event.event_id)
            if event_id <= self._last:
                continue  # never re-read in practice; a duplicate must not reach anyone
            slot = self._head % self.capacity
            if self._head >= self.capacity:
                self._start = self._ids[slot]  # the oldest event leaves the ring
            self._events[slot] = event
            self._ids[slot] = event_id
            self._head += 1
            self._last = event_id
        first = self._first
        cut: list[Subscriber] = []
        for subscriber in self._subscribers.values():
            if subscriber.catching_up or subscriber.position >= first:
                continue
            if subscriber.cursor >= self._start:
                # Everything that left the ring was at or before its cursor (it joined
                # ahead of the reader): nothing it needs is gone.
                subscriber.position = first
                continue
            subscriber.cut = True
            cut.append(subscriber)
        for subscriber in cut:
            del self._subscribers[subscriber.key]
        return cut

    # -- the subscribers' side -------------------------------------------------------

    def __len__(self) -> int:
        return len(self._subscribers)

    @property
    def catching_up(self) -> int:
        return sum(1 for s in self._subscribers.values() if s.catching_up)

    def join(self, after: str = "") -> Subscriber:
        """A new subscriber after ``after`` ("" = from now on); see the module's table.

        Raises ``NotReady`` before ``sync`` and ``SubscriberLimit`` when full.
        """
        if not self._synced:
            raise NotReady
        if len(self._subscribers) >= self.max_subscribers:
            raise SubscriberLimit
        cursor = parse_event_id(after) if after else self._last
        subscriber = Subscriber(self._next_key, after or format_event_id(cursor), cursor)
        self._next_key += 1
        if cursor >= self._start:
            subscriber.position = self._first_after(cursor)
        else:
            subscriber.catching_up = True
        self._subscribers[subscriber.key] = subscriber
        return subscriber

    def caught_up(self, subscriber: Subscriber, events: Sequence[E], *, exhausted: bool) -> list[E]:
        """A batch of history read after ``subscriber.history_cursor`` (in stream order):
        returns the events to hand over, and joins the ring when the subscriber reached
        it. ``exhausted``: the read returned everything the stream holds after the
        cursor (fewer than asked), so there is nothing more to catch up from."""
        if not subscriber.catching_up or subscriber.cut or subscriber.left:
            return []
        handed: list[E] = []
        for event in events:
            event_id = parse_event_id(event.event_id)
            if event_id > subscriber.cursor:
                handed.append(event)
                subscriber.cursor = event_id
        if exhausted or subscriber.cursor >= self._start:
            # Whatever lies between the cursor and the ring's start is not in the
            # stream any more (trimmed by MAXLEN, or lost with Redis): nothing to wait for.
            subscriber.catching_up = False
            subscriber.position = self._first_after(subscriber.cursor)
        return handed

    def take(self, subscriber: Subscriber, limit: int) -> list[E]:
        """Up to ``limit`` events the subscriber has not been handed, oldest first."""
        if subscriber.catching_up or subscriber.cut or subscriber.left:
            return []
        handed: list[E] = []
        position = subscriber.position
        # append() cuts or moves every subscriber whose next event leaves the ring.
        assert position >= self._head - self.capacity, "its next event left the ring uncut"
        while position < self._head and len(handed) < limit:
            slot = position % self.capacity
            position += 1
            event_id = self._ids[slot]
            if event_id > subscriber.cursor:
                event = self._events[slot]
                assert event is not None
                handed.append(event)
                subscriber.cursor = event_id
        subscriber.position = position
        return handed

    def pending(self, subscriber: Subscriber) -> int:
        """Ring events not yet looked at by the subscriber (its queue's length)."""
        if subscriber.catching_up or subscriber.cut or subscriber.left:
            return 0
        return self._head - subscriber.position

    def leave(self, subscriber: Subscriber) -> None:
        subscriber.left = True
        self._subscribers.pop(subscriber.key, None)

    def _first_after(self, cursor: EventId) -> int:
        """The sequence number of the first ring event after ``cursor`` (head if none)."""
        low, high = self._first, self._head
        while low < high:
            middle = (low + high) // 2
            if self._ids[middle % self.capacity] <= cursor:
                low = middle + 1
            else:
                high = middle
        return low
