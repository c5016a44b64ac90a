"""Cool-downs shared by every gateway worker (``gateway.cooldowns``), on a real Redis.

Every ``CoolDowns`` here is a "worker" of its own (its own ``RespClient``) and
connects as the gateway's ACL user exactly as the limits store's tests make it
(``acl_rules``: ``~<prefix>limits:*`` and ``ACL_COMMANDS``, nothing else); the
default user only plays the admin (reads keys, writes garbage, kills Redis).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest
import redis

from keyrelay.gateway.cooldowns import (
    MAX_SKEW_SECONDS,
    CoolDowns,
    CoolView,
    Observer,
    cool_key,
    parse_until,
)
from keyrelay.gateway.resp_client import RespClient
from tests.support.redis_server import RedisServer, gateway_user

PREFIX = "cd:"
BASE = f"{PREFIX}limits:"
PASSWORD = "gw-secret"
GATEWAY_USER = gateway_user(PREFIX, PASSWORD)
LOGGER = "keyrelay.gateway.cooldowns"


class Start(Protocol):
    def __call__(
        self,
        url: str,
        members: list[tuple[str, str]],
        *,
        poll_seconds: float = ...,
        prefix: str = ...,
        max_seconds: float = ...,
        observe: Observer | None = ...,
    ) -> CoolDowns: ...


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("cool-redis"), acl_user=GATEWAY_USER).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, to kill and start again."""
    server = RedisServer(tmp_path / "redis", acl_user=GATEWAY_USER).start()
    yield server
    server.stop()


@pytest.fixture
def admin(acl_redis: RedisServer) -> Iterator[redis.Redis]:
    with acl_redis.client() as client:
        yield client


@pytest.fixture
async def workers() -> AsyncIterator[Start]:
    """Starts "workers": a CoolDowns on a client of its own, its ``run`` a task. At the
    end each is closed; its ``run`` must have returned, without an exception."""
    made: list[tuple[CoolDowns, asyncio.Task[None], RespClient]] = []

    def start(
        url: str,
        members: list[tuple[str, str]],
        *,
        poll_seconds: float = 0.05,
        prefix: str = PREFIX,
        max_seconds: float = 3600.0,
        observe: Observer | None = None,
    ) -> CoolDowns:
        client = RespClient.from_url(url, timeout=0.5)
        cool = CoolDowns(
            client,
            prefix=prefix,
            members=members,
            poll_seconds=poll_seconds,
            max_seconds=max_seconds,
            observe=observe,
        )
        made.append((cool, asyncio.get_running_loop().create_task(cool.run()), client))
        return cool

    yield start
    for cool, task, client in made:
        started = time.monotonic()
        await cool.close()
        await asyncio.wait_for(task, 1.0)
        assert task.result() is None
        assert time.monotonic() - started < 1.0
        await client.close()


def new_pool(size: int) -> tuple[str, list[tuple[str, str]]]:
    pool = f"pool-{secrets.token_hex(4)}"
    return pool, [(pool, f"m{i}") for i in range(size)]


async def eventually(check: Callable[[], bool], within: float) -> float:
    """Seconds until ``check()`` holds (looked at every 2 ms); fails after ``within``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within} s")
        await asyncio.sleep(0.002)
    return time.monotonic() - started


async def polled(*cools: CoolDowns, times: int = 1) -> None:
    """Until each has polled ``times`` more times (so its scripts are loaded)."""
    targets = [cool.polls + times for cool in cools]
    await eventually(lambda: all(c.polls >= t for c, t in zip(cools, targets, strict=True)), 2.0)


def written(*cools: CoolDowns) -> Callable[[], Awaitable[float]]:
    return lambda: eventually(lambda: all(cool.writes_pending == 0 for cool in cools), 2.0)


def sees(cool: CoolDowns, pool: str, member: str) -> Callable[[], bool]:
    """Whether ``cool`` has ``member`` of ``pool`` cooling now."""
    return lambda: member in cool.cooling(pool, time.time())


def ms(seconds: float) -> int:
    return round(seconds * 1000)


# -- (1) one worker notes, the others see it within 1 s; it ends at until --------------


async def test_a_cool_down_reaches_another_worker_within_a_second(
    acl_redis: RedisServer, admin: redis.Redis, workers: Start
) -> None:
    pool, members = new_pool(6)
    # The default poll period, as deployed: what is measured is what a worker sees.
    a = workers(acl_redis.acl_url, members, poll_seconds=0.25)
    b = workers(acl_redis.acl_url, members, poll_seconds=0.25)
    await polled(a, b)
    seen: list[float] = []
    for i in range(5):  # at five phases of b's polling
        await asyncio.sleep(0.047 * i)
        member = f"m{i}"
        now = time.time()
        until = now + 30
        started = time.monotonic()
        a.note(pool, member, until, now)
        assert time.monotonic() - started < 0.005  # no I/O on the caller's path
        assert a.cooling(pool, now)[member] == until  # this worker: at once
        seen.append(await eventually(sees(b, pool, member), 1.0))
        assert b.cooling(pool, time.time())[member] == pytest.approx(until, abs=0.001)
    print(f"propagation (poll_seconds=0.25): {', '.join(f'{s * 1000:.0f} ms' for s in seen)}")
    assert max(seen) < 1.0

    # It ends at until: in every worker, and the key vanishes from Redis.
    member = "m5"
    now = time.time()
    until = now + 0.6
    a.note(pool, member, until, now)
    await eventually(sees(b, pool, member), 1.0)
    key = cool_key(BASE, pool, member)
    assert int(admin.get(key) or 0) == ms(until)
    assert 0 < int(admin.pttl(key)) <= 600
    await asyncio.sleep(until - time.time() + 0.01)
    later = time.time()
    assert member not in a.cooling(pool, later)
    assert member not in b.cooling(pool, later)
    await polled(a, b)
    assert admin.exists(key) == 0
    assert set(b.cooling(pool, time.time())) == {"m0", "m1", "m2", "m3", "m4"}
    assert a.errors == b.errors == 0


# -- (2) a later until wins; an earlier one never shortens it ----------------------------


async def test_a_later_until_wins_and_an_earlier_one_does_not_shorten_it(
    acl_redis: RedisServer, admin: redis.Redis, workers: Start
) -> None:
    pool, members = new_pool(1)
    key = cool_key(BASE, pool, "m0")
    a = workers(acl_redis.acl_url, members)
    b = workers(acl_redis.acl_url, members, poll_seconds=60)  # polls at start only
    await polled(a, b)
    now = time.time()

    a.note(pool, "m0", now + 5, now)
    await written(a)()
    assert int(admin.get(key) or 0) == ms(now + 5)
    writes = a.writes
    a.note(pool, "m0", now + 2, now)  # earlier: nothing changes, nothing is sent
    # (as read back, in ms: maybe later by < 0.5 ms)
    assert a.cooling(pool, now)["m0"] == pytest.approx(now + 5, abs=0.001)
    assert a.writes_pending == 0
    assert a.writes == writes

    # b has not seen a's: its earlier note reaches the script, which keeps the later
    # one, and tells b, which takes it.
    assert b.cooling(pool, now) == {}
    b.note(pool, "m0", now + 3, now)
    assert b.cooling(pool, now)["m0"] == now + 3
    await written(b)()
    assert b.cooling(pool, now)["m0"] == pytest.approx(now + 5, abs=0.001)
    assert int(admin.get(key) or 0) == ms(now + 5)
    assert int(admin.pttl(key)) > 4000

    # A later one wins, in Redis and in every worker.
    b.note(pool, "m0", now + 8, now)
    await written(b)()
    assert int(admin.get(key) or 0) == ms(now + 8)
    assert int(admin.pttl(key)) > 7000
    await eventually(lambda: a.cooling(pool, time.time())["m0"] > now + 7, 1.0)
    assert a.errors == b.errors == 0


# -- (3) Redis killed: each worker keeps its own view; restarted: sharing resumes ------------


async def test_a_redis_outage_keeps_the_local_view_and_sharing_resumes(
    own_redis: RedisServer, workers: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    pool, members = new_pool(4)
    a = workers(own_redis.acl_url, members)
    b = workers(own_redis.acl_url, members)
    await polled(a, b)
    now = time.time()
    b.note(pool, "m0", now + 30, now)
    await eventually(sees(a, pool, "m0"), 1.0)

    own_redis.kill()
    now = time.time()
    started = time.monotonic()
    a.note(pool, "m1", now + 30, now)  # never raises, never waits
    cooling = a.cooling(pool, now)
    assert time.monotonic() - started < 0.005
    assert set(cooling) == {"m0", "m1"}
    await eventually(lambda: a.errors >= 3 and b.errors >= 3, 2.0)
    assert set(a.cooling(pool, time.time())) == {"m0", "m1"}  # what b noted, still honoured
    assert set(b.cooling(pool, time.time())) == {"m0"}
    assert a.writes_pending == 1  # m1, to be sent again
    # One warning per operation and worker at most (LOG_INTERVAL is 10 s).
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert 1 <= len(warnings) <= 4
    assert {getattr(r, "operation", None) for r in warnings} <= {"cool_poll", "cool_note"}

    own_redis.start()  # same port and data (AOF); the ACL user is set up again
    # The note made during the outage is written once Redis is back (the client
    # backs off at most 1 s between attempts) ...
    back = await eventually(sees(b, pool, "m1"), 3.0)
    print(f"shared {back * 1000:.0f} ms after the restart")
    # ... and new ones are shared as before.
    now = time.time()
    a.note(pool, "m2", now + 30, now)
    assert await eventually(sees(b, pool, "m2"), 1.0) < 1.0
    assert a.writes_pending == 0


# -- (4) whatever else is in the keys is ignored -------------------------------------------


async def test_values_that_are_no_cool_down_are_ignored(
    acl_redis: RedisServer, admin: redis.Redis, workers: Start
) -> None:
    pool, members = new_pool(12)
    max_seconds = 10.0
    now = time.time()
    garbage: dict[str, bytes] = {
        "m0": b"abc",
        "m1": b"-5000",
        "m2": b"%d.5" % ms(now + 5),
        "m3": b"%d" % ms(now + 100 * 365 * 86_400),  # a century ahead
        "m4": b"9" * 40,
        "m5": b"",
        "m6": b" %d" % ms(now + 5),
        "m7": b"%d" % ms(now - 10),  # over (not garbage: not counted)
        "m8": b"%d" % ms(now + 5),  # the one cool-down
        "m9": b"%d" % ms(now + max_seconds + MAX_SKEW_SECONDS / 2),  # clamped
    }
    for member, value in garbage.items():
        admin.set(cool_key(BASE, pool, member), value)
    admin.hset(cool_key(BASE, pool, "m10"), "until", ms(now + 5))  # not a string at all
    admin.rpush(cool_key(BASE, pool, "m11"), ms(now + 5))

    b = workers(acl_redis.acl_url, members, max_seconds=max_seconds)
    await polled(b, times=2)
    cooling = dict(b.cooling(pool, time.time()))
    assert set(cooling) == {"m8", "m9"}
    assert cooling["m8"] == pytest.approx(now + 5, abs=0.001)
    assert now + max_seconds - 1 < cooling["m9"] <= time.time() + max_seconds
    assert b.errors == 0
    assert b.ignored >= 2 * 7  # m0 to m6, at every poll

    # A note overwrites garbage of any kind.
    a = workers(acl_redis.acl_url, members, max_seconds=max_seconds)
    now = time.time()
    for member in ("m0", "m3", "m4", "m10", "m11"):
        a.note(pool, member, now + 4, now)
    await written(a)()
    for member in ("m0", "m3", "m4", "m10", "m11"):
        assert admin.get(cool_key(BASE, pool, member)) == b"%d" % ms(now + 4)
    await eventually(sees(b, pool, "m11"), 1.0)
    assert set(b.cooling(pool, time.time())) == {"m0", "m3", "m4", "m8", "m9", "m10", "m11"}
    assert a.errors == b.errors == 0


# -- (5) the ACL user suffices; every key is under the prefix ------------------------------


async def test_the_gateway_acl_user_suffices_and_keys_stay_under_the_prefix(
    acl_redis: RedisServer, admin: redis.Redis, workers: Start
) -> None:
    admin.acl_log_reset()
    admin.script_flush()  # the scripts are loaded by this user
    pool, members = new_pool(2)
    pool = f"{pool}:with%colon"  # escaped in the key
    members = [(pool, member) for _, member in members]
    seen: list[tuple[str, str]] = []
    a = workers(
        acl_redis.acl_url, members, observe=lambda op, outcome, _s: seen.append((op, outcome))
    )
    b = workers(acl_redis.acl_url, members)
    await polled(a, b)
    now = time.time()
    a.note(pool, "m1", now + 5, now)
    await eventually(sees(b, pool, "m1"), 1.0)
    assert a.errors == b.errors == 0
    assert ("cool_note", "written") in seen
    assert ("cool_poll", "ok") in seen
    assert admin.acl_log() == []  # nothing was refused
    keys = {key.decode() for key in admin.scan_iter()}
    assert keys
    assert all(key.startswith(f"{BASE}cool:") for key in keys)
    assert f"{BASE}cool:{pool.replace('%', '%25').replace(':', '%3A')}:m1" in keys
    assert a.key_prefix == f"{BASE}cool:"

    # A prefix the ACL user may not reach: refused, counted, never raised.
    other = workers(acl_redis.acl_url, members, prefix="elsewhere:")
    other.note(pool, "m0", now + 5, now)
    await eventually(lambda: other.errors >= 2, 2.0)
    assert other.cooling(pool, now) == {"m0": now + 5}
    assert admin.exists(cool_key("elsewhere:limits:", pool, "m0")) == 0
    assert admin.acl_log() != []


# -- the pure parts ---------------------------------------------------------------------


def test_parse_until_takes_only_digits_in_range() -> None:
    now = 1_700_000_000.0
    assert parse_until(b"%d" % ms(now + 5), now, 60) == pytest.approx(now + 5)
    assert parse_until(b"%d" % ms(now + 60 + MAX_SKEW_SECONDS / 2), now, 60) == now + 60
    for raw in (
        None,
        b"",
        b"x",
        b"-1",
        b"1.5",
        b"1e12",
        b"9" * 16,
        b"%d" % ms(now),
        b"%d" % ms(now + 60 + MAX_SKEW_SECONDS + 1),
        1_700_000_005_000,
        [b"1"],
    ):
        assert parse_until(raw, now, 60) is None, raw


def test_cool_view_keeps_the_latest_until_and_drops_the_past() -> None:
    view = CoolView(max_seconds=100)
    now = 1000.0
    assert view.note("p", "a", 1010.0, now) == 1010.0
    assert view.note("p", "a", 1005.0, now) is None  # earlier: kept as it was
    assert view.note("p", "b", 5000.0, now) == 1100.0  # capped
    assert view.note("p", "c", 999.0, now) is None  # over already
    assert view.note("p", "c", math.nan, now) is None
    assert view.note("p", "c", math.inf, now) is None
    first = view.cooling("p", now)
    assert first == {"a": 1010.0, "b": 1100.0}
    view.note("p", "c", 1020.0, now)
    assert first == {"a": 1010.0, "b": 1100.0}  # what was handed out does not change
    assert view.cooling("p", 1015.0) == {"b": 1100.0, "c": 1020.0}
    view.merge([(("p", "b"), 1050.0), (("p", "d"), 1030.0), (("q", "x"), None)], 1015.0)
    assert view.cooling("p", 1015.0) == {"b": 1100.0, "c": 1020.0, "d": 1030.0}
    view.merge([(("p", "c"), 1040.0)], 1025.0)
    assert view.cooling("p", 1025.0) == {"b": 1100.0, "c": 1040.0, "d": 1030.0}
    assert view.cooling("p", 2000.0) == {}
    assert view.cooling("q", now) == {}
    assert view.entries() == []


def test_cool_keys_of_different_members_differ() -> None:
    assert cool_key("k:limits:", "a:b", "c") != cool_key("k:limits:", "a", "b:c")
    assert cool_key("k:limits:", "a%3Ab", "c") != cool_key("k:limits:", "a:b", "c")
    assert cool_key("k:limits:", "pool", "acct-1") == "k:limits:cool:pool:acct-1"
