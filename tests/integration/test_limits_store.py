"""The shared limits counters (``gateway.limits_store``) against a real Redis 7 with ACLs.

Every store here connects as the gateway's ACL user (``acl_rules``: the limits
keys and the commands the scripts need, nothing else), except where a test
reads counters directly or plays the auth service (the default user). Time is
injected: the next window is ``now + 60``, not a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from keyrelay.gateway.core.ratelimit import Subject, counted_tokens, micro_usd, window
from keyrelay.gateway.core.usage import Usage
from keyrelay.gateway.limits_store import (
    ACL_COMMANDS,
    GRANT_SECONDS,
    GRANT_TICKETS,
    LimitsStore,
    LimitsUnavailable,
    UsageRecord,
    acl_rules,
)
from keyrelay.limit_rules import Budget, BudgetUnit, Limits, Period
from tests.support.redis_server import RedisServer, gateway_user
from tests.support.tcp_proxy import ReplyDroppingProxy

PREFIX = "lt:"
PASSWORD = "gw-secret"
GATEWAY_USER = gateway_user(PREFIX, PASSWORD)
# The start of a real minute, so expiries (durations from now) are what they are in use.
NOW = float((int(time.time()) // 60 + 1) * 60)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("limits-redis"), acl_user=GATEWAY_USER).start()
    yield server
    server.stop()


@pytest.fixture
async def store(acl_redis: RedisServer) -> AsyncIterator[LimitsStore]:
    running = LimitsStore.from_url(acl_redis.acl_url, prefix=PREFIX, timeout=2.0)
    yield running
    await running.close()


@pytest.fixture
def direct(acl_redis: RedisServer) -> Iterator[redis.Redis]:
    """The default (unrestricted) user, to look at the counters."""
    with acl_redis.client() as client:
        yield client


def subject(kind: str = "key", **limits: object) -> Subject:
    return Subject(kind, f"{kind}-{secrets.token_hex(4)}", Limits.from_dict(limits), "test")


def counter(direct: redis.Redis, s: Subject, name: str, now: float = NOW) -> int:
    label = window(Period.MINUTE, now).label
    return int(direct.get(f"{PREFIX}limits:{s.kind}:{s.id}:{name}:{label}") or 0)


def leases(direct: redis.Redis, s: Subject) -> int:
    return int(direct.zcard(f"{PREFIX}limits:{s.kind}:{s.id}:leases"))


@pytest.fixture
async def reader(acl_redis: RedisServer) -> AsyncIterator[LimitsStore]:
    """The auth service's side: reads usage (HGETALL, SMEMBERS) as the default user."""
    running = LimitsStore.from_url(acl_redis.url, prefix=PREFIX)
    yield running
    await running.close()


async def day_usage(reader: LimitsStore, s: Subject, now: float = NOW) -> UsageRecord:
    [record] = await reader.usage(s.kind, s.id, [window(Period.DAY, now).label])
    return record


# -- 3 processes, 300 requests, 60 admitted ---------------------------------------------

# One gateway worker: its own store and connections; 100 admits at once when told "go".
WORKER = """
import asyncio, json, sys
from keyrelay.gateway.core.ratelimit import Subject
from keyrelay.limit_rules import Limits
from keyrelay.gateway.limits_store import LimitsStore

url, prefix, key_id, now, count = sys.argv[1:6]
key = Subject("key", key_id, Limits(requests_per_minute=60), "three-workers")
warm = Subject("key", key_id + "-warm", Limits(requests_per_minute=10**6))

async def main():
    store = LimitsStore.from_url(url, prefix=prefix, timeout=5.0)
    await asyncio.gather(*(store.admit([warm], float(now)) for _ in range(20)))  # connections
    print("ready", flush=True)
    sys.stdin.readline()
    admissions = await asyncio.gather(*(store.admit([key], float(now)) for _ in range(int(count))))
    print(json.dumps([[a.decision.admitted, a.decision.retry_after] for a in admissions]))
    await store.close()

asyncio.run(main())
"""


def run_workers(url: str, key_id: str, now: float, workers: int, each: int) -> list[list[object]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, PREFIX, key_id, repr(now), str(each)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # all ready: go
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results: list[list[object]] = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            results += json.loads(out)
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_three_processes_admit_exactly_60_of_300(
    acl_redis: RedisServer, store: LimitsStore
) -> None:
    key_id = f"k3-{secrets.token_hex(4)}"
    now = NOW + 12.3
    results = await asyncio.to_thread(run_workers, acl_redis.acl_url, key_id, now, 3, 100)
    assert len(results) == 300
    assert sum(1 for admitted, _ in results if admitted) == 60
    # every refusal says when: the end of this minute, whole seconds, never 0
    assert {retry for admitted, retry in results if not admitted} == {48}

    # The next window admits again (and again exactly 60).
    key = Subject("key", key_id, Limits(requests_per_minute=60))
    later = await asyncio.gather(*(store.admit([key], now + 60) for _ in range(300)))
    assert sum(a.decision.admitted for a in later) == 60


# -- nothing half-counted ------------------------------------------------------------


async def test_a_subject_over_its_limit_counts_nothing_for_the_other(
    store: LimitsStore, direct: redis.Redis
) -> None:
    key = subject(requests_per_minute=5, concurrent_requests=100)
    account = subject("account", requests_per_minute=100, concurrent_requests=100)
    results = [await store.admit([key, account], NOW) for _ in range(15)]
    assert [a.decision.admitted for a in results] == [True] * 5 + [False] * 10
    assert counter(direct, key, "rpm") == 5
    assert counter(direct, account, "rpm") == 5
    assert leases(direct, key) == leases(direct, account) == 5
    refused = results[-1]
    assert refused.lease is None
    assert refused.decision.refused_by is not None
    assert refused.decision.refused_by.subject == key

    # the account over, the key under: the key's counters stay as they were
    other = subject(requests_per_minute=100)
    full = subject("account", requests_per_minute=1)
    assert (await store.admit([other, full], NOW)).decision.admitted
    assert not (await store.admit([other, full], NOW)).decision.admitted
    assert counter(direct, other, "rpm") == 1


# -- concurrency leases --------------------------------------------------------------


async def test_leases_are_released_by_finish(store: LimitsStore, direct: redis.Redis) -> None:
    key = subject(concurrent_requests=2)
    first, _second = [await store.admit([key], NOW) for _ in range(2)]
    third = await store.admit([key], NOW)
    assert not third.decision.admitted
    assert third.decision.retry_after == 1
    assert first.lease is not None
    assert await store.finish(first.lease, Usage(1, 1), 0.0, NOW + 1)
    assert leases(direct, key) == 1
    assert (await store.admit([key], NOW + 1)).decision.admitted


async def test_leases_of_a_worker_that_never_finishes_expire(acl_redis: RedisServer) -> None:
    short = LimitsStore.from_url(acl_redis.acl_url, prefix=PREFIX, lease_seconds=5)
    try:
        key = subject(concurrent_requests=3)
        for _ in range(3):
            assert (await short.admit([key], NOW)).decision.admitted
        assert not (await short.admit([key], NOW + 4.9)).decision.admitted
        after = await short.admit([key], NOW + 5.01)
        assert after.decision.admitted
        assert after.decision.checks[0].used == 0  # the three crashed leases are gone
    finally:
        await short.close()


# -- finish: idempotent, exact ----------------------------------------------------------


async def test_finish_records_usage_by_kind(
    store: LimitsStore, reader: LimitsStore, direct: redis.Redis
) -> None:
    key = subject(tokens_per_minute=1000, concurrent_requests=5)
    admission = await store.admit([key], NOW)
    assert admission.lease is not None
    usage = Usage(100, 50, 10, 7)
    assert await store.finish(admission.lease, usage, 0.25, NOW + 2)
    assert counter(direct, key, "tpm") == 160
    assert leases(direct, key) == 0
    assert await day_usage(reader, key) == UsageRecord(
        requests=1,
        input_tokens=100,
        output_tokens=50,
        cache_creation_input_tokens=10,
        cache_read_input_tokens=7,
        tokens=160,
        cost_micro_usd=250_000,
    )


async def test_a_batch_counts_from_its_requests_clock(
    store: LimitsStore, direct: redis.Redis
) -> None:
    """Expiries are durations from when the requests ended (the gateway's clock that
    chose their windows), not from when the batch went out: a batch of a worker
    whose clock is minutes behind keeps its counters (they were expired at once
    when the script counted from the send time: this failed in CI, where the
    tests' NOW was minutes away from the clock by then)."""
    behind = NOW - 600
    key = subject(tokens_per_minute=1000)
    admission = await store.admit([key], behind)
    assert admission.lease is not None
    assert await store.finish(admission.lease, Usage(10, 5), 0.0, behind)
    assert counter(direct, key, "tpm", behind) == 15


async def test_usage_recorded_counts_at_the_next_admission_of_the_worker(
    store: LimitsStore,
) -> None:
    """``record`` queues, and the next admission is checked behind it: the batch goes
    out first, in the same pipeline (it was behind the admission when the batch was
    sent from its task: the e2e budget test admitted a whole wave too many)."""
    warm = await store.admit([subject(requests_per_minute=5)], NOW)  # the scripts loaded
    assert warm.lease is not None
    await store.finish(warm.lease, Usage(1), 0.0, NOW)
    key = subject(budget={"amount": 100, "unit": "tokens", "period": "day"})
    route = (key,)
    first = await store.admit(route, NOW)
    assert first.lease is not None
    store.record(first.lease, Usage(input_tokens=100), 0.0, NOW)
    assert (await store.admit(route, NOW)).lease is None  # 100 used of 100


async def test_unpriced_and_unlimited(store: LimitsStore, reader: LimitsStore) -> None:
    free = subject()
    admission = await store.admit([free], NOW)
    assert not admission.round_trip  # nothing to check: no round trip
    assert admission.decision.admitted
    assert admission.decision.headers() == ()
    assert admission.lease is not None
    assert await store.finish(admission.lease, Usage(3, 4), None, NOW)
    record = await day_usage(reader, free)
    assert (record.requests, record.tokens, record.unpriced, record.cost_usd) == (1, 7, 1, 0.0)


@pytest.mark.parametrize("lost", ["admit", "finish"])
async def test_a_lost_reply_re_sent_counts_once(
    acl_redis: RedisServer, reader: LimitsStore, direct: redis.Redis, lost: str
) -> None:
    """The script ran, its reply was lost, redis-py re-sent it: counted once."""
    async with ReplyDroppingProxy("127.0.0.1", acl_redis.port) as proxy:
        url = proxy.url.replace("redis://", f"redis://gateway:{PASSWORD}@")
        through = LimitsStore.from_url(url, prefix=PREFIX, timeout=2.0)
        try:
            key = subject(requests_per_minute=10, concurrent_requests=10)
            warm = await through.admit([key], NOW)  # loads the scripts
            assert warm.lease is not None
            await through.finish(warm.lease, Usage(1), 0.0, NOW)
            script = through._admit if lost == "admit" else through._finish
            proxy.drop_reply_after(script.sha.encode())
            admission = await through.admit([key], NOW)
            assert admission.lease is not None
            await through.finish(admission.lease, Usage(1), 0.0, NOW)
            assert proxy.dropped == 1
        finally:
            await through.close()
    assert counter(direct, key, "rpm") == 2
    assert leases(direct, key) == 0
    assert (await day_usage(reader, key)).requests == 2


# -- tokens and budgets: exact sums, bounded overshoot ------------------------------------


@pytest.mark.parametrize("kind", ["tokens_budget", "usd_budget", "tokens_per_minute"])
async def test_concurrent_usage_is_exact_and_overshoot_bounded(
    store: LimitsStore, reader: LimitsStore, direct: redis.Redis, kind: str
) -> None:
    workers, max_in, max_out = 16, 400, 300
    if kind == "tokens_budget":
        key = subject(budget={"amount": 20_000, "unit": "tokens", "period": "day"})
        limit = 20_000
    elif kind == "usd_budget":
        key = subject(budget={"amount": 2.0, "unit": "usd", "period": "month"})
        limit = 2_000_000
    else:
        key = subject(tokens_per_minute=20_000)
        limit = 20_000
    account = subject("account", concurrent_requests=workers)
    rng = random.Random(11)
    finished: list[tuple[Usage, float]] = []
    admitted = refused = 0

    async def worker() -> None:
        nonlocal admitted, refused
        while True:
            admission = await store.admit([key, account], NOW)
            if admission.lease is None:
                refused += 1
                return
            admitted += 1
            await asyncio.sleep(rng.random() * 0.003)
            usage = Usage(rng.randint(1, max_in), rng.randint(1, max_out))
            cost = counted_tokens(usage) * 0.00001 * (1 + rng.random())  # ~0.001-0.014 USD
            await store.finish(admission.lease, usage, cost, NOW)
            finished.append((usage, cost))

    await asyncio.gather(*(worker() for _ in range(workers)))
    assert refused == workers
    assert admitted == len(finished)
    record = await day_usage(reader, key)
    tokens = sum(counted_tokens(u) for u, _ in finished)
    micro = sum(micro_usd(c) for _, c in finished)
    # no drift: what was recorded is exactly the sum of what was reported
    assert (record.requests, record.tokens, record.cost_micro_usd) == (len(finished), tokens, micro)
    used = {"tokens_budget": tokens, "usd_budget": micro}.get(kind, counter(direct, key, "tpm"))
    assert used == (tokens if kind != "usd_budget" else micro)
    # the limit was reached, and overshot by at most what was in flight (one request
    # per worker, each at most max_in + max_out tokens or its cost)
    largest = max(counted_tokens(u) if kind != "usd_budget" else micro_usd(c) for u, c in finished)
    assert limit <= used <= limit - 1 + workers * largest
    assert largest <= (max_in + max_out) * (1 if kind != "usd_budget" else 20)
    assert leases(direct, account) == 0


async def test_budget_refusal_says_which_and_when(store: LimitsStore) -> None:
    key = subject(budget={"amount": 1, "unit": "usd", "period": "day"})
    admission = await store.admit([key], NOW)
    assert admission.lease is not None
    await store.finish(admission.lease, Usage(10, 10), 1.5, NOW)
    refused = await store.admit([key], NOW + 1)
    assert refused.decision.budget_exhausted
    message = refused.decision.message()
    assert message is not None
    assert "daily budget of $1.00 ($1.50 used)" in message
    assert refused.decision.retry_after == window(Period.DAY, NOW).end - int(NOW + 1)
    # the next day admits again
    assert (await store.admit([key], window(Period.DAY, NOW).end + 1)).decision.admitted


# -- the gateway's Redis user ----------------------------------------------------------


def test_the_gateway_user_cannot_touch_token_keys(acl_redis: RedisServer) -> None:
    token_key = f"{PREFIX}account:x"
    with acl_redis.client() as admin:
        admin.hset(token_key, "tokens", "sealed")
        reader_sha = admin.script_load("return redis.call('HGETALL', KEYS[1])")
    gateway = redis.Redis.from_url(acl_redis.acl_url)
    try:
        assert gateway.ping()
        # a script of its own that names a token key inside (not in KEYS)
        sneaky_sha = gateway.script_load(f"return redis.call('GET', '{token_key}')")
        for attempt in (
            lambda: gateway.get(token_key),
            lambda: gateway.set(token_key, "x"),
            lambda: gateway.hgetall(token_key),
            lambda: gateway.hset(token_key, "tokens", "mine"),
            lambda: gateway.delete(token_key),
            lambda: gateway.eval("return redis.call('HGETALL', KEYS[1])", 1, token_key),
            lambda: gateway.evalsha(reader_sha, 1, token_key),
            lambda: gateway.evalsha(sneaky_sha, 0),
            lambda: gateway.keys("*"),
            lambda: gateway.scan(0),
        ):
            with pytest.raises(
                redis.exceptions.ResponseError, match=r"no permissions|can.t (run|access)"
            ):
                attempt()
    finally:
        gateway.close()
    with acl_redis.client() as admin:
        assert admin.hgetall(token_key) == {b"tokens": b"sealed"}


@pytest.mark.parametrize("dropped", ACL_COMMANDS)
async def test_every_acl_command_is_needed(
    tmp_path: Path, acl_redis: RedisServer, dropped: str
) -> None:
    """Without any one of ACL_COMMANDS, admit + finish (or the health PING) fails."""
    name = f"gw-{dropped.strip('+').replace('|', '-')}"
    rules = tuple(rule for rule in acl_rules(PREFIX, PASSWORD) if rule != dropped)
    with acl_redis.client() as admin:
        admin.execute_command("ACL", "SETUSER", name, *rules)
        admin.script_flush()  # so SCRIPT LOAD is needed too
    url = acl_redis.acl_url.replace("gateway:", f"{name}:")
    narrow = LimitsStore.from_url(url, prefix=PREFIX, timeout=2.0)
    every_limit = Limits(9, 9, 9, Budget(9, BudgetUnit.TOKENS, Period.DAY))
    key = Subject("key", f"narrow-{secrets.token_hex(4)}", every_limit)
    # Limits large enough for a grant: its tickets taken, then given back.
    large = Limits(10_000, 10**6, 10_000, Budget(10**6, BudgetUnit.TOKENS, Period.DAY))
    busy = Subject("key", f"busy-{secrets.token_hex(4)}", large)

    async def everything() -> None:
        await narrow.ping()  # the health check's command
        admission = await narrow.admit([key], NOW)
        assert admission.lease is not None
        await narrow.finish(admission.lease, Usage(1, 1), 0.1, NOW)
        assert (await narrow.admit([busy], NOW)).lease is not None
        assert narrow.tickets_held > 0
        await narrow.give_back()

    try:
        with pytest.raises(LimitsUnavailable, match=r"NOPERM|can.t run"):
            await everything()
    finally:
        await narrow.close()
        with acl_redis.client() as admin:
            admin.execute_command("ACL", "DELUSER", name)


# -- the store unreachable -------------------------------------------------------------


async def test_redis_killed_then_restarted(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", acl_user=GATEWAY_USER).start()
    timeout = 0.5
    outcomes: list[tuple[str, str]] = []
    store = LimitsStore.from_url(
        server.acl_url,
        prefix=PREFIX,
        timeout=timeout,
        observe=lambda op, outcome, _seconds: outcomes.append((op, outcome)),
    )
    key = subject(requests_per_minute=5)
    try:
        for _ in range(3):
            assert (await store.admit([key], NOW)).decision.admitted

        process = server._process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)  # hangs: every socket read waits
        try:
            started = time.monotonic()
            with pytest.raises(LimitsUnavailable, match="admit failed"):
                await store.admit([key], NOW)
            assert time.monotonic() - started < timeout + 0.3
        finally:
            os.kill(process.pid, signal.SIGCONT)

        server.kill()  # refuses: connections fail at once
        started = time.monotonic()
        with pytest.raises(LimitsUnavailable):
            await store.admit([key], NOW)
        assert time.monotonic() - started < timeout + 0.3
        assert ("admit", "error") in outcomes

        server.start()  # same port and data: AOF kept the count; the user is set up again
        with server.client() as admin:
            # 3, or 4 when Redis ran the admit it read before it was stopped
            counted = int(
                admin.get(f"{PREFIX}limits:key:{key.id}:rpm:{window(Period.MINUTE, NOW).label}")
                or 0
            )
        assert counted in (3, 4)
        results = [await store.admit([key], NOW) for _ in range(6 - counted)]
        assert [a.decision.admitted for a in results] == [True] * (5 - counted) + [False]
    finally:
        await store.close()
        server.stop()


# -- many keys -----------------------------------------------------------------------


async def test_a_thousand_keys(
    store: LimitsStore, reader: LimitsStore, direct: redis.Redis
) -> None:
    account = subject("account", requests_per_minute=10**6)
    keys = [subject(requests_per_minute=1, concurrent_requests=1) for _ in range(1000)]
    first = await asyncio.gather(*(store.admit([k, account], NOW) for k in keys))
    second = await asyncio.gather(*(store.admit([k, account], NOW) for k in keys))
    assert all(a.decision.admitted for a in first)
    assert not any(a.decision.admitted for a in second)
    assert counter(direct, account, "rpm") == 1000
    await asyncio.gather(
        *(store.finish(a.lease, Usage(1, 1), 0.001, NOW) for a in first if a.lease)
    )
    assert (await day_usage(reader, account)).requests == 1000
    on_day = await reader.subjects_on(window(Period.DAY, NOW).label)
    assert {(k.kind, k.id) for k in [*keys, account]} <= set(on_day)


# -- grants: admissions held ahead, never past a limit ------------------------------------


# A gateway passes each route's subjects tuple (the same object every time); so do
# these tests: the store keeps its plans and grants by that tuple.


def script_calls(direct: redis.Redis) -> int:
    stats = direct.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0))


async def test_a_busy_key_is_admitted_with_tickets(store: LimitsStore, direct: redis.Redis) -> None:
    """Large limits: most admissions need no call; every ticket is counted first, and
    what is not used goes back."""
    key = subject(requests_per_minute=100_000, concurrent_requests=10_000)
    route = (key,)  # (a route's subjects: one tuple, as the gateway keeps)
    before = script_calls(direct)
    admissions = []
    for _ in range(300):
        admissions.append(await store.admit(route, NOW))
        await asyncio.sleep(0)  # (refills run between admissions, as between requests)
    assert all(a.lease is not None for a in admissions)
    calls = sum(a.round_trip for a in admissions)
    assert calls <= 10, calls  # 64 tickets a grant, refilled below 16
    assert script_calls(direct) - before <= 12
    held = store.tickets_held
    assert held > 0
    # Counted: every admission and every ticket held; leased: the same (none finished).
    assert counter(direct, key, "rpm") == 300 + held
    assert leases(direct, key) == 300 + held
    assert len({a.lease.id for a in admissions if a.lease}) == 300
    for a in admissions:
        assert a.lease is not None
        store.record(a.lease, Usage(1, 1), 0.0, NOW)
    await store.give_back()
    assert store.tickets_held == 0
    await store.close()  # sends what is queued
    assert counter(direct, key, "rpm") == 300
    assert leases(direct, key) == 0


async def test_ticket_headers_count_down(store: LimitsStore) -> None:
    key = subject(requests_per_minute=1_000)  # a grant of (1000 - 1) // 64 = 15
    route = (key,)
    first = await store.admit(route, NOW)
    assert first.round_trip
    remaining = [
        int(dict((await store.admit(route, NOW)).headers)[b"x-keyrelay-ratelimit-remaining"])
        for _ in range(5)
    ]
    assert remaining == sorted(remaining, reverse=True)
    assert len(set(remaining)) == 5
    assert all(900 <= value < 999 for value in remaining)


@pytest.mark.parametrize("limits", [{"requests_per_minute": 127}, {"concurrent_requests": 100}])
async def test_small_limits_get_no_tickets(
    store: LimitsStore, direct: redis.Redis, limits: dict[str, int]
) -> None:
    """A limit under 2 x GRANT_SHARE is checked in the store at every admission."""
    key = subject("key", **limits)
    route = (key,)
    admissions = [await store.admit(route, NOW) for _ in range(20)]
    assert all(a.round_trip and a.lease is not None for a in admissions)
    assert store.tickets_held == 0


async def test_two_workers_with_tickets_admit_exactly_the_limit(
    acl_redis: RedisServer, direct: redis.Redis
) -> None:
    """Tickets are counted before they are used: two workers taking turns admit
    exactly the limit, and each is refused only once the other holds nothing."""
    key = subject(requests_per_minute=1_000)
    route = (key,)
    workers = [
        LimitsStore.from_url(acl_redis.acl_url, prefix=PREFIX, timeout=2.0) for _ in range(2)
    ]
    try:
        admitted = [0, 0]
        refused = [False, False]
        while not all(refused):
            for i, worker in enumerate(workers):
                admission = await worker.admit(route, NOW)
                refused[i] = admission.lease is None
                admitted[i] += admission.lease is not None
                await asyncio.sleep(0)
        assert sum(admitted) == 1_000, admitted
        assert min(admitted) > 100  # both took part
        assert [w.tickets_held for w in workers] == [0, 0]
        assert counter(direct, key, "rpm") == 1_000
    finally:
        for worker in workers:
            await worker.close()


async def test_tickets_stop_early_for_usage_limits(store: LimitsStore) -> None:
    """Tokens are known only at the end: tickets are used while the tokens read plus
    this worker's own since are under 1/GRANT_SHARE of the limit (what other
    workers use meanwhile goes unseen); then every admission asks the store."""
    key = subject(requests_per_minute=100_000, tokens_per_minute=64_000)
    route = (key,)
    first = await store.admit(route, NOW)
    assert first.lease is not None
    assert first.round_trip
    second = await store.admit(route, NOW)
    assert second.lease is not None
    assert not second.round_trip  # a ticket
    store.record(second.lease, Usage(input_tokens=999), 0.0, NOW)
    assert not (await store.admit(route, NOW)).round_trip  # 999 x 64 < 64,000
    store.record(second.lease, Usage(input_tokens=1), 0.0, NOW)  # now at 1/64
    third = await store.admit(route, NOW)
    assert third.round_trip


async def test_tickets_go_back_when_they_expire(store: LimitsStore, direct: redis.Redis) -> None:
    key = subject(requests_per_minute=100_000, concurrent_requests=10_000)
    route = (key,)
    now = time.time()  # (the grant's timer runs on the loop's clock)
    admission = await store.admit(route, now)
    assert admission.lease is not None
    assert store.tickets_held > 0
    assert counter(direct, key, "rpm", now) > 1
    await asyncio.sleep(GRANT_SECONDS + 0.3)
    assert store.tickets_held == 0
    assert counter(direct, key, "rpm", now) == 1
    assert leases(direct, key) == 1  # the admission's own lease


async def test_a_re_sent_grant_keeps_its_tickets(
    acl_redis: RedisServer, direct: redis.Redis
) -> None:
    """The admit script granted tickets, its reply was lost, the call was re-sent:
    the tickets are the same ones (from the lease mark), none counted twice."""
    async with ReplyDroppingProxy("127.0.0.1", acl_redis.port) as proxy:
        url = proxy.url.replace("redis://", f"redis://gateway:{PASSWORD}@")
        through = LimitsStore.from_url(url, prefix=PREFIX, timeout=2.0)
        key = subject(requests_per_minute=100_000, concurrent_requests=10_000)
        route = (key,)
        try:
            warm = await through.admit([subject(requests_per_minute=1)], NOW)  # loads it
            assert warm.lease is not None
            proxy.drop_reply_after(through._admit.sha.encode())
            admission = await through.admit(route, NOW)
            assert admission.lease is not None
            assert proxy.dropped == 1
            held = through.tickets_held
            assert held == GRANT_TICKETS
            assert counter(direct, key, "rpm") == 1 + held
            await through.give_back()
        finally:
            await through.close()
    assert counter(direct, key, "rpm") == 1
    assert leases(direct, key) == 1


# -- finishes in batches -------------------------------------------------------------------


async def test_finishes_go_in_batches(
    store: LimitsStore, reader: LimitsStore, direct: redis.Redis
) -> None:
    key = subject(requests_per_minute=100, concurrent_requests=100)
    route = (key,)
    admissions = [await store.admit(route, NOW) for _ in range(50)]
    before = script_calls(direct)
    results = await asyncio.gather(
        *(store.finish(a.lease, Usage(10, 2), 0.001, NOW) for a in admissions if a.lease)
    )
    assert results == [True] * 50
    assert script_calls(direct) - before == 1  # one batch
    record = await day_usage(reader, key)
    assert (record.requests, record.input_tokens, record.output_tokens) == (50, 500, 100)
    assert record.cost_usd == pytest.approx(0.05)
    assert leases(direct, key) == 0
    assert store.finishes_pending == 0


async def test_waiting_finishes_are_bounded(tmp_path: Path) -> None:
    """The store stopped: at most max_finishes wait; the rest are dropped at once and
    told; those waiting are dropped once their retries are over (or at close)."""
    server = RedisServer(tmp_path / "redis", acl_user=GATEWAY_USER).start()
    dropped: list[tuple[int, str]] = []
    store = LimitsStore.from_url(
        server.acl_url,
        prefix=PREFIX,
        timeout=0.3,
        max_finishes=5,
        on_dropped=lambda count, reason: dropped.append((count, reason)),
    )
    key = subject(requests_per_minute=100)
    route = (key,)
    try:
        admission = await store.admit(route, NOW)
        assert admission.lease is not None
        server.stop()
        taken = [store.record(admission.lease, Usage(1), 0.0, NOW) for _ in range(8)]
        assert taken == [True] * 5 + [False] * 3
        assert dropped == [(1, "full")] * 3
        assert store.finishes_pending == 5
        with pytest.raises(LimitsUnavailable, match="max_finishes"):
            await store.finish(admission.lease, Usage(1), 0.0, NOW)
    finally:
        started = time.monotonic()
        await store.close()
        assert time.monotonic() - started < 2.0  # bounded: no retry pause at close
        server.stop()
    assert store.finishes_pending == 0
    assert (5, "unavailable") in dropped
