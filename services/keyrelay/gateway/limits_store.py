"""The shared counters of limits, budgets and usage, in Redis (DESIGN §6.2).

Every gateway worker counts here, so N workers admit exactly what one would:
``admit`` is one Lua script call that reads every counter of every subject (the
key and its account), and counts the request only when every check passes
(nothing is half-counted when one subject is over); ``finish`` is one call that
records what the request used. What the counters mean is decided in
``keyrelay.gateway.core.ratelimit`` (``decide``); the scripts only compare
``used < limit`` and count.

The algorithm is a fixed window per UTC minute (``INCR`` + ``PEXPIRE``): the
count is exact, the reset is a clear instant, and a refused client retrying
within the minute is refused again (GCRA would admit at the steady rate
meanwhile). Concurrency is a sorted set of leases scored by their expiry, so
the leases of a worker that died expire. Budgets read the usage hashes.

Keys (``L`` is ``<prefix>limits:``: a Redis ACL user restricted to ``~L*`` can
run all of it and reach nothing else; ``S`` is ``L<kind>:<id>``)::

    S:rpm:<minute>     string  requests admitted in that minute (minutes since the epoch)
    S:tpm:<minute>     string  tokens recorded in that minute (by requests ending in it)
    S:leases           zset    lease id -> expiry (epoch ms) of requests in flight
    S:day:<YYYY-MM-DD> hash    usage of that UTC day:   requests, input_tokens,
    S:month:<YYYY-MM>  hash    usage of that UTC month: output_tokens,
                               cache_creation_input_tokens, cache_read_input_tokens,
                               tokens (counted), cost_micro_usd, unpriced
    L days:<YYYY-MM-DD> set    "<kind>:<id>" of every subject with usage that day
    L lease:<id>       string  'a' after an admission (ADMIT_MARK_MS), 'f' after the
                               finish (FINISH_MARK_MS): a re-sent call counts once

Counters are only kept for limits a subject has (an unlimited key costs no
round trip at admission); usage is always recorded. USD are integer
micro-dollars (no float drift). Windows are chosen by the caller's ``now``
(the gateways' clocks, NTP-synchronised); expiries are durations from that
``now`` (``PEXPIRE``), so Redis's own clock never matters, and minute counters
outlive their minute by MINUTE_SLACK_MS so a worker whose clock lags finds them.

The store unreachable, slow or refusing (ACL): every call raises
``LimitsUnavailable`` within ``timeout`` seconds (socket timeouts of half of it,
one re-send, and a hard deadline), never hangs. What then happens (allow or
deny) is the gateway's policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keyrelay.gateway.core.ratelimit import (
    BudgetUnit,
    Counters,
    Decision,
    Period,
    Subject,
    counted_tokens,
    decide,
    micro_usd,
    window,
)
from keyrelay.gateway.core.usage import Usage

__all__ = [
    "ACL_COMMANDS",
    "ADMIT_MARK_MS",
    "FINISH_MARK_MS",
    "Admission",
    "Lease",
    "LimitsStore",
    "LimitsUnavailable",
    "UsageRecord",
    "acl_rules",
]

# A re-sent admit (redis-py re-sends once after a broken connection) finds the
# lease admitted; a finish re-sent within FINISH_MARK_MS counts once.
ADMIT_MARK_MS: Final = 60_000
FINISH_MARK_MS: Final = 600_000
MINUTE_SLACK_MS: Final = 120_000
DEFAULT_LEASE_SECONDS: Final = 600.0
DEFAULT_RETENTION_DAYS: Final = 400
DEFAULT_TIMEOUT: Final = 0.5
DEFAULT_MAX_CONNECTIONS: Final = 64

# Everything the gateway's Redis user needs, with ``~<prefix>limits:*`` (found
# with a real Redis 7: tests/integration/test_limits_store.py runs on exactly
# this): the two script commands, PING for health checks, and the commands the
# scripts call (Redis checks those against the caller's ACL too). Reading usage
# (HGETALL, SMEMBERS) is the auth service's business, not the gateway's.
ACL_COMMANDS: Final = (
    "+evalsha",
    "+script|load",
    "+ping",
    "+exists",
    "+get",
    "+set",
    "+incr",
    "+incrby",
    "+pexpire",
    "+hget",
    "+hincrby",
    "+zadd",
    "+zcard",
    "+zrem",
    "+zremrangebyscore",
    "+sadd",
)


def acl_rules(prefix: str, password: str) -> tuple[str, ...]:
    """The ``ACL SETUSER <name>`` rules of the gateway's user for ``prefix``."""
    return ("reset", "on", f">{password}", f"~{prefix}limits:*", "-@all", *ACL_COMMANDS)


# KEYS: [1] the lease mark, then per subject i (4 each): requests-minute counter,
#       tokens-minute counter, leases zset, usage hash of the budget's window
# ARGV: [1] now (epoch ms), [2] lease id, [3] lease expiry (epoch ms),
#       [4] ADMIT_MARK_MS, [5] minute counters' TTL (ms), [6] the lease's TTL (ms),
#       then per subject (5 each): requests/min, tokens/min, concurrent, budget
#       limits (-1: none), the budget's usage field
# Returns {admitted (1, 0, or 2 for a re-sent admission), then per subject
# requests, tokens, leases, budget used before this request (0 when not limited)}.
_ADMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
local now = tonumber(ARGV[1])
local n = (#KEYS - 1) / 4
local reply = {1}
for i = 0, n - 1 do
  local k, a = 1 + i * 4, 6 + i * 5
  local used = {0, 0, 0, 0}
  local rl, tl, cl, bl = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if rl >= 0 then used[1] = tonumber(redis.call('GET', KEYS[k + 1]) or '0') end
  if tl >= 0 then used[2] = tonumber(redis.call('GET', KEYS[k + 2]) or '0') end
  if cl >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    used[3] = redis.call('ZCARD', KEYS[k + 3])
  end
  if bl >= 0 then used[4] = tonumber(redis.call('HGET', KEYS[k + 4], ARGV[a + 5]) or '0') end
  if (rl >= 0 and used[1] >= rl) or (tl >= 0 and used[2] >= tl)
    or (cl >= 0 and used[3] >= cl) or (bl >= 0 and used[4] >= bl) then reply[1] = 0 end
  for j = 1, 4 do reply[#reply + 1] = used[j] end
end
if reply[1] == 0 then return reply end
for i = 0, n - 1 do
  local k, a = 1 + i * 4, 6 + i * 5
  if tonumber(ARGV[a + 1]) >= 0 then
    redis.call('INCR', KEYS[k + 1])
    redis.call('PEXPIRE', KEYS[k + 1], ARGV[5])
  end
  if tonumber(ARGV[a + 3]) >= 0 then
    redis.call('ZADD', KEYS[k + 3], ARGV[3], ARGV[2])
    redis.call('PEXPIRE', KEYS[k + 3], ARGV[6])
  end
end
redis.call('SET', KEYS[1], 'a', 'PX', ARGV[4])
return reply
"""

# KEYS: [1] the lease mark, [2] the day's index of subjects, then per subject i
#       (4 each): tokens-minute counter, leases zset, day usage hash, month usage hash
# ARGV: [1] FINISH_MARK_MS, [2] lease id, [3] tokens-minute TTL, [4] day hash TTL,
#       [5] month hash TTL, [6] index TTL (all ms),
#       [7..13] the usage: input, output, cache creation, cache read, counted
#       tokens, cost (micro-USD), unpriced (0 or 1),
#       then per subject (3 each): '1' if tokens/min limited, '1' if it holds a
#       lease, its index member
# Returns 1 when recorded, 0 when this lease was already finished.
_FINISH = """
if redis.call('GET', KEYS[1]) == 'f' then return 0 end
redis.call('SET', KEYS[1], 'f', 'PX', ARGV[1])
local fields = {'input_tokens', 'output_tokens', 'cache_creation_input_tokens',
  'cache_read_input_tokens', 'tokens', 'cost_micro_usd', 'unpriced'}
local n = (#KEYS - 2) / 4
for i = 0, n - 1 do
  local k, a = 2 + i * 4, 13 + i * 3
  if ARGV[a + 1] == '1' and ARGV[11] ~= '0' then
    redis.call('INCRBY', KEYS[k + 1], ARGV[11])
    redis.call('PEXPIRE', KEYS[k + 1], ARGV[3])
  end
  if ARGV[a + 2] == '1' then redis.call('ZREM', KEYS[k + 2], ARGV[2]) end
  for h = 3, 4 do
    redis.call('HINCRBY', KEYS[k + h], 'requests', 1)
    for j = 1, 7 do
      if ARGV[6 + j] ~= '0' then redis.call('HINCRBY', KEYS[k + h], fields[j], ARGV[6 + j]) end
    end
    redis.call('PEXPIRE', KEYS[k + h], ARGV[1 + h])
  end
  redis.call('SADD', KEYS[2], ARGV[a + 3])
end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"""


class LimitsUnavailable(Exception):
    """The limits store did not answer in time, or refused (connection, timeout, ACL)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """An admitted request, to be finished once with what it used."""

    id: str
    subjects: tuple[Subject, ...]
    admitted_at: float


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision, the lease to finish (None when refused), and the time the store
    took (0.0 and ``round_trip`` False when no subject has a counter to check)."""

    decision: Decision
    lease: Lease | None
    seconds: float
    round_trip: bool


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """The usage of one subject over one UTC day or month."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    tokens: int = 0
    cost_micro_usd: int = 0
    unpriced: int = 0

    @property
    def cost_usd(self) -> float:
        return self.cost_micro_usd / 1_000_000


_USAGE_FIELDS: Final = tuple(f.name for f in fields(UsageRecord))

# (operation, outcome, seconds): "admit" allowed | limited | budget | error;
# "finish" recorded | repeated | error. For metrics, wired by the gateway.
Observer = Callable[[str, str, float], None]


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _budget_field(subject: Subject) -> str:
    budget = subject.limits.budget
    return "cost_micro_usd" if budget is None or budget.unit is BudgetUnit.USD else "tokens"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class LimitsStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "keyrelay:",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        timeout: float = DEFAULT_TIMEOUT,
        observe: Observer | None = None,
    ) -> None:
        self._redis = client
        self._base = f"{prefix}limits:"
        self._lease_ms = _ms(lease_seconds)
        self._retention_ms = retention_days * 86_400_000
        self._timeout = timeout
        self._observe = observe
        self._admit = client.register_script(_ADMIT)
        self._finish = client.register_script(_FINISH)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "keyrelay:",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        observe: Observer | None = None,
    ) -> LimitsStore:
        """A client for ``url`` (``redis://user:password@host:port/0``) whose calls
        give up within ``timeout``: half of it per socket operation, one re-send.
        At most ``max_connections`` connections; a call waits (within ``timeout``)
        for a free one."""
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout / 2,
            socket_connect_timeout=timeout / 2,
            retry=Retry(NoBackoff(), retries=1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            socket_keepalive=True,
            health_check_interval=15,
        )
        return cls(
            redis.Redis.from_pool(pool),
            prefix=prefix,
            lease_seconds=lease_seconds,
            retention_days=retention_days,
            timeout=timeout,
            observe=observe,
        )

    @property
    def key_prefix(self) -> str:
        """Every key of the store starts with this (``<prefix>limits:``)."""
        return self._base

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        """Raises ``LimitsUnavailable`` unless the store answers (readiness, health)."""
        async with self._call("ping"):
            await self._redis.ping()

    def _subject_key(self, subject: Subject) -> str:
        return f"{self._base}{subject.kind}:{subject.id}"

    def _lease_key(self, lease_id: str) -> str:
        return f"{self._base}lease:{lease_id}"

    @contextlib.asynccontextmanager
    async def _call(self, operation: str) -> AsyncIterator[None]:
        """The one place store errors become ``LimitsUnavailable``, within the deadline."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            self._report(operation, "error", time.perf_counter() - started)
            raise LimitsUnavailable(
                f"limits store: {operation} failed after "
                f"{time.perf_counter() - started:.3f} s: {type(exc).__name__}: {exc}"
            ) from exc

    def _report(self, operation: str, outcome: str, seconds: float) -> None:
        if self._observe is not None:
            self._observe(operation, outcome, seconds)

    async def admit(self, subjects: Sequence[Subject], now: float) -> Admission:
        """Checks every limit of every subject and, only if all pass, counts the request.

        Raises ``LimitsUnavailable``."""
        subjects = tuple(subjects)
        lease = Lease(secrets.token_hex(12), subjects, now)
        if all(subject.limits.unlimited for subject in subjects):
            decision = decide(subjects, [Counters() for _ in subjects], now)
            self._report("admit", "allowed", 0.0)
            return Admission(decision, lease, 0.0, round_trip=False)
        minute = window(Period.MINUTE, now)
        keys = [self._lease_key(lease.id)]
        args: list[Any] = [
            _ms(now),
            lease.id,
            _ms(now) + self._lease_ms,
            ADMIT_MARK_MS,
            _ms(minute.end - now) + MINUTE_SLACK_MS,
            self._lease_ms,
        ]
        for subject in subjects:
            base = self._subject_key(subject)
            limits = subject.limits
            budget = limits.budget
            budget_window = window(budget.period if budget else Period.DAY, now)
            keys += [
                f"{base}:rpm:{minute.label}",
                f"{base}:tpm:{minute.label}",
                f"{base}:leases",
                f"{base}:{budget_window.period}:{budget_window.label}",
            ]
            args += [
                _limit(limits.requests_per_minute),
                _limit(limits.tokens_per_minute),
                _limit(limits.concurrent_requests),
                _limit(budget.amount if budget else None),
                _budget_field(subject),
            ]
        started = time.perf_counter()
        async with self._call("admit"):
            reply = cast(list[int], await self._admit(keys=keys, args=args))
        seconds = time.perf_counter() - started
        if reply[0] == 2:  # a re-sent copy of an admission that went through
            counters = [Counters() for _ in subjects]
        else:
            counters = [Counters(*reply[1 + 4 * i : 5 + 4 * i]) for i in range(len(subjects))]
        decision = decide(subjects, counters, now)
        if decision.admitted != (reply[0] != 0):  # pragma: no cover - the rule is the same
            raise LimitsUnavailable(f"limits store: the admit script disagrees: {reply!r}")
        outcome = (
            "allowed" if decision.admitted else "budget" if decision.budget_exhausted else "limited"
        )
        self._report("admit", outcome, seconds)
        return Admission(decision, lease if decision.admitted else None, seconds, round_trip=True)

    async def finish(self, lease: Lease, usage: Usage, cost_usd: float | None, now: float) -> bool:
        """Records what the request used and releases its lease; False when this
        lease was already finished (nothing counted twice). ``cost_usd`` None: a
        metered model without a price (counted as ``unpriced``).

        Raises ``LimitsUnavailable``."""
        minute, day = window(Period.MINUTE, now), window(Period.DAY, now)
        month = window(Period.MONTH, now)
        keys = [self._lease_key(lease.id), f"{self._base}days:{day.label}"]
        per_subject: list[Any] = []
        for subject in lease.subjects:
            base = self._subject_key(subject)
            keys += [
                f"{base}:tpm:{minute.label}",
                f"{base}:leases",
                f"{base}:day:{day.label}",
                f"{base}:month:{month.label}",
            ]
            limits = subject.limits
            per_subject += [
                "1" if limits.tokens_per_minute is not None else "0",
                "1" if limits.concurrent_requests is not None else "0",
                f"{subject.kind}:{subject.id}",
            ]
        args: list[Any] = [
            FINISH_MARK_MS,
            lease.id,
            _ms(minute.end - now) + MINUTE_SLACK_MS,
            _ms(day.end - now) + self._retention_ms,
            _ms(month.end - now) + self._retention_ms,
            _ms(day.end - now) + self._retention_ms,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
            counted_tokens(usage),
            micro_usd(cost_usd),
            1 if cost_usd is None else 0,
            *per_subject,
        ]
        started = time.perf_counter()
        async with self._call("finish"):
            recorded = bool(await self._finish(keys=keys, args=args))
        self._report(
            "finish", "recorded" if recorded else "repeated", time.perf_counter() - started
        )
        return recorded

    # -- reading usage (the auth service's admin side: HGETALL, SMEMBERS) ---------------

    async def usage(self, kind: str, subject_id: str, labels: Sequence[str]) -> list[UsageRecord]:
        """The usage of one subject for each label: ``YYYY-MM-DD`` (a day) or
        ``YYYY-MM`` (a month); zeros where nothing was recorded."""
        base = f"{self._base}{kind}:{subject_id}"
        async with self._call("usage"), self._redis.pipeline(transaction=False) as pipe:
            for label in labels:
                period = "day" if len(label) == 10 else "month"
                pipe.hgetall(f"{base}:{period}:{label}")
            replies = cast(list[dict[bytes, bytes]], await pipe.execute())
        return [
            UsageRecord(*(int(reply.get(name.encode(), b"0")) for name in _USAGE_FIELDS))
            for reply in replies
        ]

    async def subjects_on(self, day: str) -> list[tuple[str, str]]:
        """(kind, id) of every subject with usage recorded on ``day`` (``YYYY-MM-DD``)."""
        async with self._call("usage"):
            members = cast(set[bytes], await self._redis.smembers(f"{self._base}days:{day}"))
        found = (member.decode().partition(":") for member in members)
        return sorted((kind, subject_id) for kind, _, subject_id in found)
