"""The WatchEvents fan-out (``core/fanout.py``): joins, the bounded queue, cuts, history.

Table tests pin each row of the module's join table and each way a subscriber is cut
or spared; a hypothesis test then runs arbitrary interleavings of writes, reads,
joins, takes, history reads and leaves against a model of the Redis stream and checks
what WatchEvents promises: every subscriber gets exactly the stream's events after its
starting point, in order, without a gap or a duplicate, or is cut; a cut subscriber
that resumes after the last event it got gets the rest; no queue ever exceeds the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from keyrelay.auth.core.fanout import (
    EventId,
    Fanout,
    NotReady,
    Subscriber,
    SubscriberLimit,
    format_event_id,
    parse_event_id,
)


@dataclass(frozen=True)
class Ev:
    event_id: str


def ev(ms: int, seq: int = 0) -> Ev:
    return Ev(f"{ms}-{seq}")


def ids(events: list[Ev]) -> list[str]:
    return [e.event_id for e in events]


def synced(capacity: int = 4, max_subscribers: int = 10, end: str = "100-0") -> Fanout[Ev]:
    fanout: Fanout[Ev] = Fanout(capacity, max_subscribers)
    fanout.sync(end)
    return fanout


# -- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("0-0", (0, 0)), ("1700000000000-0", (1700000000000, 0)), ("5-12", (5, 12)), ("7", (7, 0))],
)
def test_event_ids_parse_to_comparable_pairs(text: str, parsed: EventId) -> None:
    assert parse_event_id(text) == parsed


def test_event_ids_compare_as_numbers_not_text() -> None:
    assert parse_event_id("9-0") < parse_event_id("10-0")
    assert parse_event_id("10-2") < parse_event_id("10-10")
    assert format_event_id(parse_event_id("10-10")) == "10-10"


# -- joining -------------------------------------------------------------------------------


def test_nobody_joins_before_the_reader_found_the_streams_end() -> None:
    fanout: Fanout[Ev] = Fanout(4, 10)
    with pytest.raises(NotReady):
        fanout.join()
    with pytest.raises(NotReady):
        fanout.join("1-0")
    fanout.sync("5-0")
    fanout.sync("9-0")  # only the first sync counts: the ring starts there
    assert fanout.join().starting_point == "5-0"


def test_without_a_cursor_the_starting_point_is_the_last_event_read() -> None:
    fanout = synced(end="100-0")
    assert fanout.join().starting_point == "100-0"
    fanout.append([ev(101), ev(102)])
    subscriber = fanout.join()
    assert subscriber.starting_point == "102-0"
    assert fanout.take(subscriber, 10) == []
    fanout.append([ev(103)])
    assert ids(fanout.take(subscriber, 10)) == ["103-0"]


def test_a_cursor_inside_the_ring_is_served_from_the_ring() -> None:
    fanout = synced(capacity=4, end="100-0")
    fanout.append([ev(101), ev(102), ev(103)])
    for after, expected in [
        ("100-0", ["101-0", "102-0", "103-0"]),  # the ring's start itself
        ("101-0", ["102-0", "103-0"]),
        ("101-5", ["102-0", "103-0"]),  # between two events
        ("103-0", []),
    ]:
        subscriber = fanout.join(after)
        assert subscriber.starting_point == after
        assert not subscriber.catching_up
        assert ids(fanout.take(subscriber, 10)) == expected


def test_a_cursor_ahead_of_the_reader_skips_what_it_already_has() -> None:
    fanout = synced(end="100-0")
    subscriber = fanout.join("102-0")  # another replica read 101 and 102 already
    assert not subscriber.catching_up
    fanout.append([ev(101), ev(102), ev(103)])
    assert ids(fanout.take(subscriber, 10)) == ["103-0"]


def test_a_cursor_before_the_ring_catches_up_from_history_then_joins() -> None:
    fanout = synced(capacity=4, end="100-0")
    subscriber = fanout.join("90-0")
    assert subscriber.catching_up
    assert subscriber.history_cursor == "90-0"
    assert fanout.take(subscriber, 10) == []
    fanout.append([ev(101), ev(102)])
    # The first history batch stops short of the ring's start: still catching up.
    assert ids(fanout.caught_up(subscriber, [ev(91), ev(95)], exhausted=False)) == [
        "91-0",
        "95-0",
    ]
    assert subscriber.catching_up
    assert subscriber.history_cursor == "95-0"
    # The next batch overlaps the ring: handed whole, then the ring goes on after it.
    handed = fanout.caught_up(subscriber, [ev(99), ev(100), ev(101)], exhausted=False)
    assert ids(handed) == ["99-0", "100-0", "101-0"]
    assert not subscriber.catching_up
    assert ids(fanout.take(subscriber, 10)) == ["102-0"]


def test_history_that_ends_before_the_ring_joins_at_the_rings_start() -> None:
    """Events between the cursor and the ring are gone from Redis (MAXLEN trimmed them,
    or Redis lost them): there is nothing to wait for."""
    fanout = synced(capacity=4, end="100-0")
    fanout.append([ev(101)])
    subscriber = fanout.join("50-0")
    assert fanout.caught_up(subscriber, [], exhausted=True) == []
    assert not subscriber.catching_up
    assert ids(fanout.take(subscriber, 10)) == ["101-0"]


def test_history_read_past_the_reader_skips_those_events_in_the_ring() -> None:
    fanout = synced(capacity=4, end="100-0")
    subscriber = fanout.join("99-0")
    handed = fanout.caught_up(subscriber, [ev(100), ev(101), ev(102)], exhausted=True)
    assert ids(handed) == ["100-0", "101-0", "102-0"]
    fanout.append([ev(101), ev(102), ev(103)])
    assert ids(fanout.take(subscriber, 10)) == ["103-0"]


def test_history_never_hands_an_event_twice() -> None:
    fanout = synced(end="100-0")
    subscriber = fanout.join("10-0")
    assert ids(fanout.caught_up(subscriber, [ev(11), ev(12)], exhausted=False)) == [
        "11-0",
        "12-0",
    ]
    assert ids(fanout.caught_up(subscriber, [ev(12), ev(13)], exhausted=False)) == ["13-0"]


def test_the_subscriber_limit_counts_everyone_and_frees_on_leave() -> None:
    fanout = synced(max_subscribers=2)
    first = fanout.join()
    fanout.join("1-0")  # catching up counts too
    with pytest.raises(SubscriberLimit):
        fanout.join()
    assert len(fanout) == 2
    assert fanout.catching_up == 1
    fanout.leave(first)
    fanout.leave(first)  # twice is harmless
    fanout.join()
    assert len(fanout) == 2


# -- the bounded queue and cuts ------------------------------------------------------------


def test_take_is_limited_and_in_order() -> None:
    fanout = synced(capacity=8)
    subscriber = fanout.join()
    fanout.append([ev(101), ev(102), ev(103)])
    assert fanout.pending(subscriber) == 3
    assert ids(fanout.take(subscriber, 2)) == ["101-0", "102-0"]
    assert fanout.pending(subscriber) == 1
    assert ids(fanout.take(subscriber, 2)) == ["103-0"]
    assert fanout.take(subscriber, 2) == []


def test_a_subscriber_more_than_capacity_behind_is_cut_and_the_others_are_not() -> None:
    fanout = synced(capacity=3)
    slow, fast = fanout.join(), fanout.join()
    assert fanout.append([ev(101), ev(102), ev(103)]) == []  # exactly full: kept
    assert ids(fanout.take(fast, 10)) == ["101-0", "102-0", "103-0"]
    assert fanout.pending(slow) == 3
    cut = fanout.append([ev(104)])
    assert cut == [slow]
    assert slow.cut
    assert len(fanout) == 1
    assert fanout.take(slow, 10) == []
    assert ids(fanout.take(fast, 10)) == ["104-0"]
    # It resumes after the last event it got, from the ring if that is still there.
    resumed = fanout.join(slow.history_cursor)
    assert resumed.catching_up
    assert ids(fanout.caught_up(resumed, [ev(101), ev(102)], exhausted=False)) == [
        "101-0",
        "102-0",
    ]
    assert ids(fanout.take(resumed, 10)) == ["103-0", "104-0"]


def test_one_event_taken_keeps_a_subscriber_in() -> None:
    fanout = synced(capacity=3)
    subscriber = fanout.join()
    fanout.append([ev(101), ev(102), ev(103)])
    fanout.take(subscriber, 1)
    assert fanout.append([ev(104)]) == []
    assert ids(fanout.take(subscriber, 10)) == ["102-0", "103-0", "104-0"]


def test_a_batch_larger_than_the_ring_cuts_a_waiting_subscriber() -> None:
    """The reader reads at most a quarter of the ring per XREAD (events.py) so that this
    never happens to a subscriber that keeps up."""
    fanout = synced(capacity=2)
    subscriber = fanout.join()
    assert fanout.append([ev(101), ev(102), ev(103)]) == [subscriber]


def test_a_subscriber_ahead_of_the_reader_is_not_cut_for_events_it_already_has() -> None:
    fanout = synced(capacity=2)
    ahead = fanout.join("104-0")
    assert fanout.append([ev(101), ev(102), ev(103), ev(104)]) == []
    assert fanout.take(ahead, 10) == []
    fanout.append([ev(105)])
    assert ids(fanout.take(ahead, 10)) == ["105-0"]


def test_subscribers_catching_up_are_never_cut_by_the_ring() -> None:
    fanout = synced(capacity=2)
    behind = fanout.join("1-0")
    assert fanout.append([ev(101), ev(102), ev(103)]) == []
    assert behind.catching_up
    assert fanout.pending(behind) == 0


def test_events_at_or_before_the_last_one_are_ignored() -> None:
    fanout = synced(end="100-0")
    subscriber = fanout.join()
    fanout.append([ev(100), ev(99), ev(101), ev(101)])
    assert ids(fanout.take(subscriber, 10)) == ["101-0"]
    assert fanout.last_id == "101-0"
    fanout.append([ev(99)])
    assert fanout.last_id == "101-0"  # the reader never goes back
    assert fanout.pending(subscriber) == 0


def test_a_subscriber_that_left_gets_nothing_and_is_never_cut() -> None:
    fanout = synced(capacity=1)
    subscriber = fanout.join()
    fanout.leave(subscriber)
    assert fanout.append([ev(101), ev(102)]) == []
    assert fanout.take(subscriber, 10) == []
    assert fanout.caught_up(subscriber, [ev(5)], exhausted=True) == []


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Fanout(0, 1)
    with pytest.raises(ValueError, match="at least 1"):
        Fanout(1, 0)


# -- the promise, against a model of the stream ----------------------------------------------


class Model:
    """The Redis stream, the reader's position in it, and what each subscriber received."""

    def __init__(self, capacity: int, before: int) -> None:
        self.stream: list[Ev] = [ev(1000 + i) for i in range(before)]
        self.read = len(self.stream)
        self.fanout: Fanout[Ev] = Fanout(capacity, 1000)
        self.fanout.sync(self.stream[-1].event_id if self.stream else "0-0")
        self.received: dict[int, list[str]] = {}
        self.after: dict[int, str] = {}
        self.subscribers: list[Subscriber] = []
        self.capacity = capacity
        self.history_joins = 0

    def write(self, count: int) -> None:
        base = parse_event_id(self.stream[-1].event_id)[0] + 1 if self.stream else 1000
        # Several events in one millisecond too: ids differ by sequence number.
        self.stream += [ev(base + i // 2, i % 2) for i in range(count)]

    def read_batch(self, count: int) -> None:
        batch = self.stream[self.read : self.read + count]
        self.read += len(batch)
        for subscriber in self.fanout.append(batch):
            assert subscriber.cut

    def join(self, choice: int) -> None:
        if choice == 0 or not self.stream:
            after = ""
        elif choice == 1:
            after = "0-0"
        elif choice == 2:  # ahead of the reader: the last written, maybe not read yet
            after = self.stream[-1].event_id
        else:
            after = self.stream[choice % len(self.stream)].event_id
        subscriber = self.fanout.join(after)
        self.subscribers.append(subscriber)
        self.received[subscriber.key] = []
        self.after[subscriber.key] = subscriber.starting_point

    def history(self, index: int, count: int) -> None:
        subscriber = self.subscribers[index % len(self.subscribers)]
        if not subscriber.catching_up:
            return
        cursor = parse_event_id(subscriber.history_cursor)
        newer = [e for e in self.stream if parse_event_id(e.event_id) > cursor][:count]
        handed = self.fanout.caught_up(subscriber, newer, exhausted=len(newer) < count)
        self.received[subscriber.key] += ids(handed)
        self.history_joins += not subscriber.catching_up

    def take(self, index: int, limit: int) -> None:
        subscriber = self.subscribers[index % len(self.subscribers)]
        self.received[subscriber.key] += ids(self.fanout.take(subscriber, limit))

    def expected(self, subscriber: Subscriber) -> list[str]:
        after = parse_event_id(self.after[subscriber.key])
        return [e.event_id for e in self.stream if parse_event_id(e.event_id) > after]

    def check(self) -> None:
        for subscriber in self.subscribers:
            got = self.received[subscriber.key]
            # In order, no gap, no duplicate: a prefix of what it is owed.
            assert got == self.expected(subscriber)[: len(got)]
            assert self.fanout.pending(subscriber) <= self.capacity

    def drain(self) -> None:
        """Reads everything and lets every subscriber take everything."""
        while self.read < len(self.stream) or any(
            not s.cut and not s.left and (s.catching_up or self.fanout.pending(s))
            for s in self.subscribers
        ):
            for index, subscriber in enumerate(self.subscribers):
                if subscriber.catching_up:
                    self.history(index, 3)
                self.take(index, self.capacity)
            self.read_batch(1)
            self.check()


OPERATIONS = st.one_of(
    st.tuples(st.just("write"), st.integers(1, 6)),
    st.tuples(st.just("read"), st.integers(1, 6)),
    st.tuples(st.just("join"), st.integers(0, 40)),
    st.tuples(st.just("history"), st.integers(0, 40), st.integers(1, 4)),
    st.tuples(st.just("take"), st.integers(0, 40), st.integers(1, 5)),
    st.tuples(st.just("leave"), st.integers(0, 40)),
)


@settings(max_examples=1000, deadline=None)
@given(
    capacity=st.integers(1, 6),
    before=st.integers(0, 5),
    operations=st.lists(OPERATIONS, max_size=60),
)
def test_every_subscriber_gets_exactly_its_events_or_is_cut_and_resumes(
    capacity: int, before: int, operations: list[tuple[str, int] | tuple[str, int, int]]
) -> None:
    model = Model(capacity, before)
    for operation in operations:
        kind, argument = operation[0], operation[1]
        if kind == "write":
            model.write(argument)
        elif kind == "read":
            model.read_batch(argument)
        elif kind == "join":
            model.join(argument)
        elif model.subscribers and kind == "history":
            model.history(argument, operation[2])  # type: ignore[misc]
        elif model.subscribers and kind == "take":
            model.take(argument, operation[2])  # type: ignore[misc]
        elif model.subscribers and kind == "leave":
            model.fanout.leave(model.subscribers[argument % len(model.subscribers)])
        model.check()
    model.drain()
    # What this example exercised (pytest --hypothesis-show-statistics).
    event(f"cut: {any(s.cut for s in model.subscribers)}")
    event(f"joined the ring from history: {model.history_joins > 0}")
    for subscriber in model.subscribers:
        got = model.received[subscriber.key]
        if subscriber.left:
            continue
        if not subscriber.cut:
            assert got == model.expected(subscriber)
            continue
        # Cut: it resumes after the last event it got and the rest arrives.
        resumed = model.fanout.join(got[-1] if got else model.after[subscriber.key])
        model.subscribers.append(resumed)
        model.received[resumed.key] = []
        model.after[resumed.key] = resumed.starting_point
        model.drain()
        assert not resumed.cut
        assert got + model.received[resumed.key] == model.expected(subscriber)
    assert len(model.fanout) == sum(1 for s in model.subscribers if not s.cut and not s.left)
