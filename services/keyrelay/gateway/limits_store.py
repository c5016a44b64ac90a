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
    L lease:<id>       string  after an admission, the tickets it granted (ADMIT_MARK_MS);
    L lease:batch-<id> string  after a batch of finishes (FINISH_MARK_MS): a re-sent
                               call counts once

Counters are only kept for limits a subject has (an unlimited key costs no
round trip at admission); usage is always recorded. USD are integer
micro-dollars (no float drift). Windows are chosen by the caller's ``now``
(the gateways' clocks, NTP-synchronised); expiries are durations from that
``now`` (``PEXPIRE``), so Redis's own clock never matters, and minute counters
outlive their minute by MINUTE_SLACK_MS so a worker whose clock lags finds them.

The store unreachable, slow or refusing (ACL): every call raises
``LimitsUnavailable`` within ``timeout`` seconds, never hangs (the client,
``gateway/resp_client.py``: one auto-pipelined connection, one deadline timer,
a call re-sent once when the connection drops, which the marks of admissions and
batches make safe). What then happens (allow or deny) is the gateway's policy. Everything of
a call but the lease and ``now`` is encoded once per subjects and minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from keyrelay.gateway.core.ratelimit import (
    HEADER_LIMIT,
    HEADER_REMAINING,
    HEADER_RESET,
    Check,
    Counters,
    Decision,
    LimitKind,
    Subject,
    counted_tokens,
    decide,
    micro_usd,
    window,
)
from keyrelay.gateway.core.usage import Usage
from keyrelay.gateway.resp_client import (
    DEFAULT_MAX_PENDING,
    RedisUnavailable,
    Reply,
    ReplyError,
    RespClient,
    Script,
    bulk,
    bulks,
    encode,
)
from keyrelay.limit_rules import BudgetUnit, Period
from keyrelay.usage_layout import UsageRecord

__all__ = [
    "ACL_COMMANDS",
    "ADMIT_MARK_MS",
    "DEFAULT_MAX_FINISHES",
    "FINISH_BATCH",
    "FINISH_DELAY",
    "FINISH_MARK_MS",
    "FINISH_RETRIES",
    "GRANT_REFILL_BELOW",
    "GRANT_SECONDS",
    "GRANT_SHARE",
    "GRANT_TICKETS",
    "Admission",
    "Lease",
    "LimitsStore",
    "LimitsUnavailable",
    "UsageRecord",
    "acl_rules",
]

# A re-sent admit (the client re-sends once after a broken connection) finds the
# lease admitted; a batch of finishes re-sent within FINISH_MARK_MS counts once
# (re-sent within the call's timeout, or at the retries, seconds later).
ADMIT_MARK_MS: Final = 60_000
FINISH_MARK_MS: Final = 60_000
MINUTE_SLACK_MS: Final = 120_000
DEFAULT_LEASE_SECONDS: Final = 600.0
DEFAULT_RETENTION_DAYS: Final = 400
DEFAULT_TIMEOUT: Final = 0.5
# Grants (see ``LimitsStore``): tickets one grant reserves at most; the share of what
# is left of a limit a grant may take (1/GRANT_SHARE: limits under 2x it are never
# granted, every admission of theirs is a round trip); how long a ticket stays
# usable; and below how many tickets left the next grant is fetched ahead.
GRANT_TICKETS: Final = 128
GRANT_SHARE: Final = 64
GRANT_SECONDS: Final = 1.0
GRANT_REFILL_BELOW: Final = 64
# Finishes: the most in one batch; how long the first of a batch waits for others;
# the pauses before a batch the store did not
# take is sent again (it counts once however often it arrives); the most waiting
# (queued, in flight, or to be sent again) before more are dropped.
FINISH_BATCH: Final = 512
FINISH_DELAY: Final = 0.01
FINISH_RETRIES: Final = (1.0, 4.0)
DEFAULT_MAX_FINISHES: Final = 10_000

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
# ARGV: [1] now (epoch ms), [2] lease id, [3] tickets wanted (a grant, see
#       ``Grants``), [4] '1' to admit this request, '0' for a grant alone, [5] the
#       lease's TTL (ms), [6] ADMIT_MARK_MS, [7] when the minute counters expire
#       (epoch ms), then per subject (5 each): requests/min, tokens/min, concurrent,
#       budget limits (-1: none), the budget's usage field
# Returns {admitted (1, 0), then per subject requests, tokens, leases, budget used
# before this call (0 when not limited), then the tickets granted}; {2, tickets}
# for a re-sent copy of a call that went through.
_ADMIT = """
local mark = redis.call('GET', KEYS[1])
if mark then return {2, tonumber(mark)} end
local now, want, self = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n = (#KEYS - 1) / 4
local reply = {1}
local grant = want
for i = 0, n - 1 do
  local k, a = 1 + i * 4, 7 + i * 5
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
  if rl >= 0 then grant = math.min(grant, math.floor((rl - used[1] - self) / GRANT_SHARE)) end
  if cl >= 0 then grant = math.min(grant, math.floor((cl - used[3] - self) / GRANT_SHARE)) end
  if (tl >= 0 and used[2] * GRANT_SHARE >= tl) or (bl >= 0 and used[4] * GRANT_SHARE >= bl) then
    grant = 0
  end
  for j = 1, 4 do reply[#reply + 1] = used[j] end
end
if reply[1] == 0 or grant < 0 then grant = 0 end
reply[#reply + 1] = grant
if reply[1] == 0 then return reply end
local take = self + grant
if take > 0 then
  local minute_ttl = tonumber(ARGV[7]) - now
  local expiry = now + tonumber(ARGV[5])
  local members = {}
  if self == 1 then members[1] = expiry; members[2] = ARGV[2] end
  for j = 1, grant do
    members[#members + 1] = expiry
    members[#members + 1] = ARGV[2] .. '#' .. j
  end
  for i = 0, n - 1 do
    local k, a = 1 + i * 4, 7 + i * 5
    if tonumber(ARGV[a + 1]) >= 0 then
      redis.call('INCRBY', KEYS[k + 1], take)
      redis.call('PEXPIRE', KEYS[k + 1], minute_ttl)
    end
    if tonumber(ARGV[a + 3]) >= 0 then
      redis.call('ZADD', KEYS[k + 3], unpack(members))
      redis.call('PEXPIRE', KEYS[k + 3], ARGV[5])
    end
  end
end
redis.call('SET', KEYS[1], grant, 'PX', ARGV[6])
return reply
""".replace("GRANT_SHARE", str(GRANT_SHARE))

# Tickets a worker did not use, given back: KEYS: the requests-minute counters of
# the subjects with requests/min, then the leases zsets of those with concurrency;
# ARGV: [1] how many counters, [2] the tickets' count, then the tickets.
_GIVE_BACK = """
local counters, count = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, counters do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], -count) end
end
for i = counters + 1, #KEYS do redis.call('ZREM', KEYS[i], unpack(ARGV, 3)) end
return 1
"""

# Finishes, in batches: requests that ended, grouped by plan (subjects and minute).
# KEYS: [1] the batch's mark, then per group: the day's index of subjects, then per
#       subject (4 each): tokens-minute counter, leases zset, day usage hash, month
#       usage hash
# ARGV: [1] FINISH_MARK_MS, [2] the number of groups; then per group: subjects,
#       requests, its now (epoch ms: when its last request ended, the clock its
#       expiries are from), when they expire (epoch ms): the tokens-minute
#       counters, the day hashes and the index, the month hashes; then per subject
#       (3 each): '1' if tokens/min limited, '1' if it holds leases, its index
#       member; then per request its lease id and usage, 7 integers separated by
#       spaces: input, output, cache creation, cache read, counted tokens, cost
#       (micro-USD), unpriced (0 or 1)
# Returns 1 when recorded, 0 when this batch was recorded before (a re-sent copy:
# the mark is set first, and a script runs whole). A group's usage is summed here:
# one HINCRBY per field and hash, one ZREM of all its leases.
_FINISH = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
local fields = {'input_tokens', 'output_tokens', 'cache_creation_input_tokens',
  'cache_read_input_tokens', 'tokens', 'cost_micro_usd', 'unpriced'}
local k, a = 2, 3
for g = 1, tonumber(ARGV[2]) do
  local n, requests, now = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local ttl = {tonumber(ARGV[a + 3]) - now, tonumber(ARGV[a + 4]) - now,
    tonumber(ARGV[a + 5]) - now}
  local subject_a = a + 6
  local request_a = subject_a + 3 * n
  local sum, ids = {0, 0, 0, 0, 0, 0, 0}, {}
  for j = 0, requests - 1 do
    ids[j + 1] = ARGV[request_a + 2 * j]
    local f = 1
    for v in string.gmatch(ARGV[request_a + 2 * j + 1], '%-?%d+') do
      sum[f] = sum[f] + tonumber(v)
      f = f + 1
    end
  end
  for i = 0, n - 1 do
    local sk, sa = k + 1 + 4 * i, subject_a + 3 * i
    if ARGV[sa] == '1' and sum[5] ~= 0 then
      redis.call('INCRBY', KEYS[sk], string.format('%.0f', sum[5]))
      redis.call('PEXPIRE', KEYS[sk], ttl[1])
    end
    if ARGV[sa + 1] == '1' then redis.call('ZREM', KEYS[sk + 1], unpack(ids)) end
    for h = 2, 3 do
      redis.call('HINCRBY', KEYS[sk + h], 'requests', requests)
      for f = 1, 7 do
        if sum[f] ~= 0 then
          redis.call('HINCRBY', KEYS[sk + h], fields[f], string.format('%.0f', sum[f]))
        end
      end
      redis.call('PEXPIRE', KEYS[sk + h], ttl[h])
    end
    redis.call('SADD', KEYS[k], ARGV[sa + 2])
  end
  redis.call('PEXPIRE', KEYS[k], ttl[2])
  k = k + 1 + 4 * n
  a = request_a + 2 * requests
end
return 1
"""


class LimitsUnavailable(Exception):
    """The limits store did not answer in time, or refused (connection, timeout, ACL)."""


# Lease and Admission: one of each per limited request, so plain slotted classes
# (a frozen dataclass's __init__ costs twice as much); nothing changes them.
@dataclass(slots=True)
class Lease:
    """An admitted request, to be finished once with what it used."""

    id: str
    subjects: tuple[Subject, ...]
    admitted_at: float


@dataclass(slots=True)
class Admission:
    """The decision, the lease to finish (None when refused), the time the store took
    (0.0 and ``round_trip`` False when admitted without a call: no subject has a
    counter to check, or with a ticket), and the decision's
    ``x-keyrelay-ratelimit-*`` headers, encoded. With a ticket, ``decision`` is the
    one at the grant's counters, and the headers this worker's estimate now."""

    decision: Decision
    lease: Lease | None
    seconds: float
    round_trip: bool
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _encoded(decision: Decision) -> tuple[tuple[bytes, bytes], ...]:
    return tuple([(name.encode(), value.encode()) for name, value in decision.headers()])


# (operation, outcome, seconds): "admit" allowed | limited | budget | error;
# "finish" recorded | repeated | error. For metrics, wired by the gateway.
Observer = Callable[[str, str, float], None]


def _adds(check: Check) -> int:
    """What a ticket taken adds to this check's counter (``_Grant``'s estimate)."""
    if check.kind is LimitKind.TOKENS:
        return _TOKENS
    budget = check.subject.limits.budget
    if check.kind is LimitKind.BUDGET and budget is not None:
        return _MICRO_USD if budget.unit is BudgetUnit.USD else _TOKENS
    return _TAKEN


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _budget_field(subject: Subject) -> str:
    budget = subject.limits.budget
    return "cost_micro_usd" if budget is None or budget.unit is BudgetUnit.USD else "tokens"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


_ADMIT_SCRIPT: Final = Script(_ADMIT)
_GIVE_BACK_SCRIPT: Final = Script(_GIVE_BACK)
_FINISH_SCRIPT: Final = Script(_FINISH)
_PING: Final = encode("PING")
_FINISH_MARK: Final = bulk(b"%d" % FINISH_MARK_MS)
_ONE: Final = bulk(b"1")
_HEADER_LIMIT: Final = HEADER_LIMIT.encode()
_HEADER_REMAINING: Final = HEADER_REMAINING.encode()
_HEADER_RESET: Final = HEADER_RESET.encode()
_ZERO: Final = bulk(b"0")
# Plans kept (one per subjects tuple in use, the current minute's): beyond, all go.
_PLANS_KEPT: Final = 4096


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything of a call for these subjects that is the same all minute: the
    encoded commands but for the lease and ``now`` (and usage, for finish)."""

    subjects: tuple[Subject, ...]
    minute: int  # minutes since the epoch
    limited: bool  # some subject has a limit: admit makes the call
    # ``decide``'s checks for counters of 0 (their windows are the minute's), and
    # where each one's counter is in the admit script's reply.
    checks: tuple[Check, ...]
    used_at: tuple[int, ...]
    admit_head: bytes  # EVALSHA sha numkeys
    admit_keys: bytes  # the subjects' keys (after the lease mark)
    admit_args: bytes  # constant arguments, then the subjects'
    # A group of finishes of these subjects in the finish script: its keys (the
    # day's index, then the subjects'), its arguments after the counts (expiries,
    # then the subjects'), and how many of each.
    finish_keys: bytes
    finish_args: bytes
    finish_key_count: int
    finish_arg_count: int
    # Grants: whether this plan's limits are large enough for them; the end of the
    # minute (epoch s); for each check, what a ticket adds to its counter (one of
    # _TAKEN, _TOKENS, _MICRO_USD); the checks of usage (tokens, budgets) a ticket
    # needs under half their limit: (reply index, limit, adds); and the keys a
    # grant's unused tickets are given back to.
    grantable: bool
    minute_end: float
    adds: tuple[int, ...]
    gates: tuple[tuple[int, int, int], ...]
    request_counters: tuple[str, ...]
    lease_sets: tuple[str, ...]


@dataclass(slots=True, eq=False)
class _Group:
    """Finishes of one plan waiting for the next batch: per request, its lease id and
    usage (RESP bulk strings), and who waits for it."""

    plan: _Plan
    now: float  # when its last request ended: the script's expiries count from it
    requests: list[bytes] = field(default_factory=list)
    waiters: list[asyncio.Future[bool] | None] = field(default_factory=list)


def _checks_at(plan: _Plan, counters: list[int]) -> tuple[Check, ...]:
    """The plan's checks with the counters of an admit reply (or a grant's snapshot
    of one): what ``decide`` makes for them (within the plan's minute every window
    is the same)."""
    return tuple(
        [
            Check(c.subject, c.kind, c.limit, counters[at], c.reset_at)
            for c, at in zip(plan.checks, plan.used_at, strict=True)
        ]
    )


def _reading(
    plan: _Plan, snapshot: list[int], now: float
) -> tuple[Decision, tuple[Check, int, int, int], bytes]:
    """A grant's decision at ``snapshot`` and what its headers are made from."""
    checks = _checks_at(plan, snapshot)
    decision = Decision(True, checks, now)
    tightest = decision.tightest
    assert tightest is not None  # a grant's plan has checks
    i = checks.index(tightest)
    taken = 1 if tightest.kind in (LimitKind.REQUESTS, LimitKind.CONCURRENT) else 0
    position = (plan.checks[i], plan.used_at[i], plan.adds[i], taken)
    return decision, position, tightest.shown(tightest.limit).encode()


def _finish_reply(reply: Reply) -> bool:
    """The finish script's reply, checked: recorded now (1), or before (0)."""
    if reply in (0, 1):
        return reply == 1
    raise ReplyError(f"unexpected reply to the finish script: {reply!r:.200}")


# What a ticket taken adds to a check's counter, in a grant's estimate of it.
_TAKEN, _TOKENS, _MICRO_USD = 0, 1, 2


@dataclass(slots=True, eq=False)
class _Grant:
    """Tickets a worker holds for one plan (subjects and minute): each one a request
    already counted in every requests/min counter and a lease already in every
    concurrency set, so admitting with one needs no round trip. ``snapshot``: the
    admit reply that came with the newest tickets (the counters then); ``taken``,
    ``tokens``, ``micro_usd``: what this worker added since."""

    plan: _Plan
    tickets: list[str]
    snapshot: list[int]
    # The decision at the snapshot's counters; its tightest check (and where its
    # counter is, what a ticket adds to it, 1 if a ticket takes one of it), and
    # its limit as shown.
    decision: Decision
    tightest: tuple[Check, int, int, int]
    limit_shown: bytes
    expires: float = 0.0  # epoch s: no ticket is used from then on
    taken: int = 0
    tokens: int = 0
    micro_usd: int = 0
    refilling: bool = False
    timer: asyncio.TimerHandle | None = None

    @classmethod
    def at(cls, plan: _Plan, snapshot: list[int], now: float) -> _Grant:
        return cls(plan, [], snapshot, *_reading(plan, snapshot, now))

    def read(self, snapshot: list[int], now: float) -> None:
        """New counters: the snapshot, and what was added since is 0 again."""
        self.snapshot, self.taken, self.tokens, self.micro_usd = snapshot, 0, 0, 0
        self.decision, self.tightest, self.limit_shown = _reading(self.plan, snapshot, now)

    def usable(self) -> bool:
        """A ticket may be used: every usage counter (tokens, budget), as last read
        plus what this worker recorded since, is under 1/GRANT_SHARE of its limit."""
        snapshot = self.snapshot
        added = (self.taken, self.tokens, self.micro_usd)
        for at, limit, adds in self.plan.gates:  # (a loop: this runs per admission)
            if (snapshot[at] + added[adds]) * GRANT_SHARE >= limit:
                return False
        return True


_INTS: Final = {int}
# Where a check's counter is among a subject's four in the admit script's reply.
_COUNTER_AT: Final = {
    LimitKind.REQUESTS: 0,
    LimitKind.TOKENS: 1,
    LimitKind.CONCURRENT: 2,
    LimitKind.BUDGET: 3,
}


def _admit_reply(reply: Reply, subjects: int) -> list[int]:
    """The admit script's reply, checked: {2, tickets}, or {0|1, then 4 per subject,
    then tickets}."""
    if (
        type(reply) is list
        and set(map(type, reply)) == _INTS
        and (
            (len(reply) == 2 + 4 * subjects and reply[0] in (0, 1))
            or (len(reply) == 2 and reply[0] == 2)
        )
        and 0 <= cast(int, reply[-1]) <= GRANT_TICKETS
    ):
        return cast(list[int], reply)
    raise ReplyError(f"unexpected reply to the admit script: {reply!r:.200}")


class LimitsStore:
    def __init__(
        self,
        client: RespClient,
        *,
        prefix: str = "keyrelay:",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        max_finishes: int = DEFAULT_MAX_FINISHES,
        observe: Observer | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
    ) -> None:
        """The store on ``client``; every call gives up within ``client.timeout``.
        ``on_dropped(count, reason)``: finishes given up ("full": ``max_finishes``
        were waiting; "unavailable": the store did not take them, retries included)."""
        if max_finishes < 1:
            raise ValueError(f"max_finishes must be at least 1, got {max_finishes}")
        self._client = client
        self._base = f"{prefix}limits:"
        self._lease_prefix = f"{self._base}lease:".encode()
        self._lease_ms = _ms(lease_seconds)
        self._retention_ms = retention_days * 86_400_000
        self._timeout = client.timeout
        self._observe = observe
        self._admit = _ADMIT_SCRIPT
        self._finish = _FINISH_SCRIPT
        self._plans: dict[int, _Plan] = {}
        # Subjects tuples with a usage-only subject added (``record``'s ``also``).
        self._with_also: dict[
            tuple[int, int], tuple[tuple[Subject, ...], Subject, tuple[Subject, ...]]
        ] = {}
        # Grants held, by id of their subjects tuple (one per plan in use), and the
        # tasks that fetch or give back tickets (referenced until done).
        self._grants: dict[int, _Grant] = {}
        self._chores: set[asyncio.Task[None]] = set()
        # Finishes queued for the next batch (by id of their plan), how many, how many
        # wait in all (queued, sent, to be sent again), and the batch's timer.
        self._queued: dict[int, _Group] = {}
        self._queued_count = 0
        self._finishes_pending = 0
        self._max_finishes = max_finishes
        self._send_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._on_dropped = on_dropped
        # Lease ids: unique, not secret (random per store, then counted).
        self._lease_base = secrets.token_hex(8)
        self._leases = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "keyrelay:",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        timeout: float = DEFAULT_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_finishes: int = DEFAULT_MAX_FINISHES,
        observe: Observer | None = None,
        on_dropped: Callable[[int, str], None] | None = None,
    ) -> LimitsStore:
        """A store on ``url`` (``redis://user:password@host:port/0``, ``rediss://``,
        ``unix://``): one connection, made on first use, every call answered or
        failed within ``timeout``; at most ``max_pending`` calls waiting at once
        (beyond: ``LimitsUnavailable`` at once). Raises ``ValueError`` for a bad URL."""
        return cls(
            RespClient.from_url(url, timeout=timeout, max_pending=max_pending),
            prefix=prefix,
            lease_seconds=lease_seconds,
            retention_days=retention_days,
            max_finishes=max_finishes,
            observe=observe,
            on_dropped=on_dropped,
        )

    @property
    def client(self) -> RespClient:
        """The store's connection (the pools' cool-downs share it)."""
        return self._client

    @property
    def key_prefix(self) -> str:
        """Every key of the store starts with this (``<prefix>limits:``)."""
        return self._base

    async def close(self) -> None:
        """Sends the finishes queued and gives back the tickets this worker holds (a
        batch the store does not take is not tried again), waits for them at most
        ``timeout``, then closes the connection."""
        self._closing = True
        self._send_finishes()
        with contextlib.suppress(LimitsUnavailable):
            await self.give_back()
        if self._chores:
            _, late = await asyncio.wait(self._chores, timeout=self._timeout)
            for task in late:
                task.cancel()
        await self._client.close()

    async def give_back(self) -> None:
        """Ends every grant now, giving its unused tickets back. Raises
        ``LimitsUnavailable`` when the store did not take them."""
        grants, self._grants = list(self._grants.values()), {}
        ended = [self._give_back(grant.plan, self._ended(grant)) for grant in grants]
        failed = [
            outcome
            for outcome in await asyncio.gather(*ended, return_exceptions=True)
            if isinstance(outcome, BaseException)
        ]
        if failed:
            raise failed[0]

    @property
    def tickets_held(self) -> int:
        """Tickets of grants this worker holds (metrics, tests)."""
        return sum(len(grant.tickets) for grant in self._grants.values())

    async def ping(self) -> None:
        """Raises ``LimitsUnavailable`` unless the store answers (readiness, health)."""
        started = time.perf_counter()
        try:
            _expect(await self._client.send(_PING, resend=True), (b"PONG",), "PING")
        except (RedisUnavailable, ReplyError) as exc:
            raise self._unavailable("ping", started, exc) from exc

    def _unavailable(self, operation: str, started: float, exc: Exception) -> LimitsUnavailable:
        """The one place store errors become ``LimitsUnavailable`` (and the error metric)."""
        seconds = time.perf_counter() - started
        self._report(operation, "error", seconds)
        return LimitsUnavailable(
            f"limits store: {operation} failed after {seconds:.3f} s: {type(exc).__name__}: {exc}"
        )

    def _report(self, operation: str, outcome: str, seconds: float) -> None:
        if self._observe is not None:
            self._observe(operation, outcome, seconds)

    def _plan(self, subjects: tuple[Subject, ...], now: float) -> _Plan:
        """The plan of these subjects for ``now``'s minute (made once a minute)."""
        plan = self._plans.get(id(subjects))
        minute = int(now // 60)
        if plan is not None and plan.subjects is subjects and plan.minute == minute:
            return plan
        if len(self._plans) >= _PLANS_KEPT:
            self._plans.clear()
        plan = self._plans[id(subjects)] = self._make_plan(subjects, now)
        return plan

    def _make_plan(self, subjects: tuple[Subject, ...], now: float) -> _Plan:
        minute, day = window(Period.MINUTE, now), window(Period.DAY, now)
        month = window(Period.MONTH, now)
        minute_ends = (minute.end * 1000) + MINUTE_SLACK_MS
        admit_keys: list[str] = []
        admit_args: list[str | int] = []
        finish_keys = [f"{self._base}days:{day.label}"]
        finish_args: list[str | int] = []
        for subject in subjects:
            base = f"{self._base}{subject.kind}:{subject.id}"
            limits = subject.limits
            budget = limits.budget
            budget_window = window(budget.period, now) if budget else day
            admit_keys += [
                f"{base}:rpm:{minute.label}",
                f"{base}:tpm:{minute.label}",
                f"{base}:leases",
                f"{base}:{budget_window.period}:{budget_window.label}",
            ]
            admit_args += [
                _limit(limits.requests_per_minute),
                _limit(limits.tokens_per_minute),
                _limit(limits.concurrent_requests),
                _limit(budget.amount if budget else None),
                _budget_field(subject),
            ]
            finish_keys += [
                f"{base}:tpm:{minute.label}",
                f"{base}:leases",
                f"{base}:day:{day.label}",
                f"{base}:month:{month.label}",
            ]
            finish_args += [
                "1" if limits.tokens_per_minute is not None else "0",
                "1" if limits.concurrent_requests is not None else "0",
                f"{subject.kind}:{subject.id}",
            ]
        admit_const = [self._lease_ms, ADMIT_MARK_MS, minute_ends]
        finish_const = [
            minute_ends,
            day.end * 1000 + self._retention_ms,
            month.end * 1000 + self._retention_ms,
        ]
        n_admit_keys, n_admit_args = 1 + len(admit_keys), 4 + len(admit_const) + len(admit_args)
        checks: list[Check] = []
        used_at: list[int] = []
        for i, subject in enumerate(subjects):  # decide's checks, subject by subject
            for check in decide([subject], [Counters()], now).checks:
                checks.append(check)
                used_at.append(1 + 4 * i + _COUNTER_AT[check.kind])
        adds = tuple(_adds(check) for check in checks)
        counted = (LimitKind.REQUESTS, LimitKind.CONCURRENT)
        return _Plan(
            subjects=subjects,
            minute=int(now // 60),
            limited=not all(subject.limits.unlimited for subject in subjects),
            checks=tuple(checks),
            used_at=tuple(used_at),
            admit_head=self._admit.head(n_admit_keys, n_admit_args),
            admit_keys=bulks(*admit_keys),
            admit_args=bulks(*admit_const, *admit_args),
            finish_keys=bulks(*finish_keys),
            finish_args=bulks(*finish_const, *finish_args),
            finish_key_count=len(finish_keys),
            finish_arg_count=len(finish_const) + len(finish_args),
            grantable=bool(checks)
            and all(c.limit >= 2 * GRANT_SHARE for c in checks if c.kind in counted),
            minute_end=float(minute.end),
            adds=adds,
            gates=tuple(
                (at, c.limit, add)
                for c, at, add in zip(checks, used_at, adds, strict=True)
                if c.kind not in counted
            ),
            request_counters=tuple(
                f"{self._base}{s.kind}:{s.id}:rpm:{minute.label}"
                for s in subjects
                if s.limits.requests_per_minute is not None
            ),
            lease_sets=tuple(
                f"{self._base}{s.kind}:{s.id}:leases"
                for s in subjects
                if s.limits.concurrent_requests is not None
            ),
        )

    async def admit(self, subjects: Sequence[Subject], now: float) -> Admission:
        """Checks every limit of every subject and, only if all pass, counts the request:
        with a ticket of this worker's grant when it holds one (no round trip), else
        one script call (which may bring a grant).

        Raises ``LimitsUnavailable``."""
        subjects = tuple(subjects)
        plan = self._plan(subjects, now)
        if not plan.limited:
            lease = Lease(self._lease_id(), subjects, now)
            decision = decide(subjects, [Counters() for _ in subjects], now)
            self._report("admit", "allowed", 0.0)
            return Admission(decision, lease, 0.0, round_trip=False, headers=_encoded(decision))
        want = 0
        if plan.grantable:
            grant = self._grants.get(id(subjects))
            if grant is not None and (grant.plan is not plan or now >= grant.expires):
                self._end_grant(grant)
                grant = None
            if grant is not None and grant.tickets and grant.usable():
                return self._with_ticket(grant, now)
            want = GRANT_TICKETS if grant is None or not grant.refilling else 0
        if self._queued:  # leases released go ahead of this admission
            self._send_finishes()
        lease_id = self._lease_id()
        started = time.perf_counter()
        try:
            reply = await self._call_admit(plan, lease_id, now, want, admit=True)
        except (RedisUnavailable, ReplyError) as exc:
            raise self._unavailable("admit", started, exc) from exc
        seconds = time.perf_counter() - started
        decision = self._decision(plan, reply, now)
        if reply[-1]:
            self._add_tickets(plan, lease_id, reply, now)
        outcome = (
            "allowed" if decision.admitted else "budget" if decision.budget_exhausted else "limited"
        )
        self._report("admit", outcome, seconds)
        admitted = Lease(lease_id, subjects, now) if decision.admitted else None
        return Admission(decision, admitted, seconds, round_trip=True, headers=_encoded(decision))

    def _lease_id(self) -> str:
        self._leases += 1
        return f"{self._lease_base}{self._leases:x}"

    async def _call_admit(
        self, plan: _Plan, lease_id: str, now: float, want: int, *, admit: bool
    ) -> list[int]:
        """The admit script's checked reply (``admit`` False: a grant alone)."""
        lid = lease_id.encode()
        command = b"".join(
            (
                plan.admit_head,
                bulk(self._lease_prefix + lid),
                plan.admit_keys,
                bulk(b"%d" % _ms(now)),
                bulk(lid),
                bulk(b"%d" % want),
                _ONE if admit else _ZERO,
                plan.admit_args,
            )
        )
        return _admit_reply(await self._admit.run(self._client, command), len(plan.subjects))

    @staticmethod
    def _decision(plan: _Plan, reply: list[int], now: float) -> Decision:
        """``decide`` for the counters in ``reply``, from the plan's checks."""
        if reply[0] == 2:  # a re-sent copy of an admission that went through
            return Decision(True, plan.checks, now)
        checks = _checks_at(plan, reply)
        return Decision(all(c.used < c.limit for c in checks), checks, now)

    # -- grants ---------------------------------------------------------------------------
    #
    # A worker that admits often for one plan takes tickets ahead: the admit script,
    # when every requests/min and concurrency limit has at least GRANT_SHARE times
    # more left than it grants, and every tokens/min and budget counter is under
    # half its limit, counts up to GRANT_TICKETS more requests (and leases, named
    # ``<lease id>#<n>``) and returns how many. Admitting with a ticket is local;
    # finishing it is the same call as any lease's. Tickets unused after
    # GRANT_SECONDS, at the minute's end, or at close go back (one script call).
    # So no limit is ever passed (every ticket was counted first); a key can be
    # refused early by what other workers hold, for at most GRANT_SECONDS, and only
    # by 1/GRANT_SHARE of what was left per grant. Usage limits use the counters
    # as last read plus this worker's own since: tickets stop at half the limit.

    def _with_ticket(self, grant: _Grant, now: float) -> Admission:
        plan = grant.plan
        ticket = grant.tickets.pop()
        grant.taken += 1
        if len(grant.tickets) < GRANT_REFILL_BELOW and not grant.refilling:
            grant.refilling = True
            self._chore(self._refill(grant, now))
        # The headers of the check that was tightest at the grant's counters, with
        # what this worker added since (the rest of the decision is the grant's).
        check, at, adds, taken = grant.tightest
        used = grant.snapshot[at] + (grant.taken, grant.tokens, grant.micro_usd)[adds]
        headers = (
            (_HEADER_LIMIT, grant.limit_shown),
            (_HEADER_REMAINING, check.shown(max(0, check.limit - used - taken)).encode()),
            (_HEADER_RESET, b"%d" % check.reset_seconds(now)),
        )
        self._report("admit", "allowed", 0.0)
        return Admission(grant.decision, Lease(ticket, plan.subjects, now), 0.0, False, headers)

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _refill(self, grant: _Grant, now: float) -> None:
        """More tickets for ``grant``'s plan, fetched before its last is used."""
        lease_id = self._lease_id()
        started = time.perf_counter()
        try:
            reply = await self._call_admit(grant.plan, lease_id, now, GRANT_TICKETS, admit=False)
        except (RedisUnavailable, ReplyError) as exc:
            self._unavailable("grant", started, exc)  # counted; admissions go to the store
            return
        finally:
            grant.refilling = False
        self._report("grant", "allowed", time.perf_counter() - started)
        if reply[-1]:
            self._add_tickets(grant.plan, lease_id, reply, now)

    def _add_tickets(self, plan: _Plan, lease_id: str, reply: list[int], now: float) -> None:
        count = reply[-1]
        grant = self._grants.get(id(plan.subjects))
        if grant is not None and grant.plan is not plan:
            self._end_grant(grant)
            grant = None
        if reply[0] == 2:
            # A re-sent call's reply has no counters: usage limits read as reached
            # (no ticket used for them), requests and leases as what the tickets hold.
            snapshot = [0] * (2 + 4 * len(plan.subjects))
            for at, limit, _ in plan.gates:
                snapshot[at] = limit
        else:
            snapshot = reply
        if grant is None:
            grant = self._grants[id(plan.subjects)] = _Grant.at(plan, snapshot, now)
        else:
            grant.read(snapshot, now)
        grant.tickets.extend(f"{lease_id}#{n}" for n in range(count, 0, -1))
        grant.expires = min(now + GRANT_SECONDS, plan.minute_end)
        if grant.timer is not None:
            grant.timer.cancel()
        loop = asyncio.get_running_loop()
        grant.timer = loop.call_later(max(0.0, grant.expires - now), self._end_grant, grant)

    def _end_grant(self, grant: _Grant) -> None:
        """The grant is over: its unused tickets go back (in a task of their own)."""
        key = id(grant.plan.subjects)
        if self._grants.get(key) is grant:
            del self._grants[key]
        tickets = self._ended(grant)
        if tickets:
            self._chore(self._give_back_quietly(grant.plan, tickets))

    @staticmethod
    def _ended(grant: _Grant) -> list[str]:
        """Stops ``grant``'s timer; its unused tickets, which it no longer holds."""
        if grant.timer is not None:
            grant.timer.cancel()
            grant.timer = None
        tickets, grant.tickets = grant.tickets, []
        return tickets

    async def _give_back_quietly(self, plan: _Plan, tickets: list[str]) -> None:
        with contextlib.suppress(LimitsUnavailable):  # counted and told by _give_back
            await self._give_back(plan, tickets)

    async def _give_back(self, plan: _Plan, tickets: list[str]) -> None:
        """Raises ``LimitsUnavailable``; lost tickets stay counted until the minute
        ends, their leases until they expire (lease_seconds)."""
        if not tickets:
            return
        keys = (*plan.request_counters, *plan.lease_sets)
        command = encode(
            "EVALSHA",
            _GIVE_BACK_SCRIPT.sha,
            len(keys),
            *keys,
            len(plan.request_counters),
            len(tickets),
            *tickets,
        )
        started = time.perf_counter()
        try:
            # Not re-sent: counting back twice would let a key past its limit.
            await _GIVE_BACK_SCRIPT.run(self._client, command, resend=False, hold=True)
        except (RedisUnavailable, ReplyError) as exc:
            raise self._unavailable("give_back", started, exc) from exc
        self._report("give_back", "recorded", time.perf_counter() - started)

    async def finish(self, lease: Lease, usage: Usage, cost_usd: float | None, now: float) -> bool:
        """``record``, then waits for its batch: True when recorded, False when the
        batch had been recorded before (a re-sent copy; nothing counts twice). A lease
        is finished once, by whoever was admitted with it.

        Raises ``LimitsUnavailable`` (not taken, or given up after the retries)."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not self.record(lease, usage, cost_usd, now, waiter):
            raise LimitsUnavailable(
                f"limits store: {self._finishes_pending} finishes are already waiting "
                f"(max_finishes = {self._max_finishes})"
            )
        return await waiter

    def record(
        self,
        lease: Lease,
        usage: Usage,
        cost_usd: float | None,
        now: float,
        waiter: asyncio.Future[bool] | None = None,
        *,
        also: Subject | None = None,
    ) -> bool:
        """Queues what an admitted request used, and the release of its lease, for the
        next batch (``cost_usd`` None: a metered model without a price, counted as
        ``unpriced``). False when ``max_finishes`` are already waiting: then it is
        dropped (``on_dropped``), and its lease expires. ``also``: a subject whose
        usage records this request too, without limits (a pool's member: the same
        object every time, so its plan is kept).

        A batch goes FINISH_DELAY after its first finish (or at FINISH_BATCH), and
        before any admit call of this worker (so the lease it released and the
        usage it recorded count at its next admission); it is sent again after the
        pauses of FINISH_RETRIES when the store did not take it."""
        if self._finishes_pending >= self._max_finishes:
            self._drop(1, "full")
            return False
        plan = self._plan(lease.subjects if also is None else self._with(lease, also), now)
        tokens, cost = counted_tokens(usage), micro_usd(cost_usd)
        grant = self._grants.get(id(lease.subjects))
        if grant is not None:  # its estimate of the usage counters
            grant.tokens += tokens
            grant.micro_usd += cost
        group = self._queued.get(id(plan))
        if group is None or group.plan is not plan:
            group = self._queued[id(plan)] = _Group(plan, now)
        elif now > group.now:
            group.now = now
        group.requests.append(
            bulk(lease.id.encode())
            + bulk(
                b"%d %d %d %d %d %d %d"
                % (
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_creation_input_tokens,
                    usage.cache_read_input_tokens,
                    tokens,
                    cost,
                    1 if cost_usd is None else 0,
                )
            )
        )
        group.waiters.append(waiter)
        self._queued_count += 1
        self._finishes_pending += 1
        if self._queued_count >= FINISH_BATCH:
            self._send_finishes()
        elif self._send_timer is None:
            self._send_timer = asyncio.get_running_loop().call_later(
                FINISH_DELAY, self._send_finishes
            )
        return True

    def _with(self, lease: Lease, also: Subject) -> tuple[Subject, ...]:
        """``lease.subjects`` and ``also``: one tuple per pair (plans are kept by it)."""
        key = (id(lease.subjects), id(also))
        found = self._with_also.get(key)
        if found is not None and found[0] is lease.subjects and found[1] is also:
            return found[2]
        if len(self._with_also) >= _PLANS_KEPT:
            self._with_also.clear()
        subjects = (*lease.subjects, also)
        self._with_also[key] = (lease.subjects, also, subjects)
        return subjects

    @property
    def finishes_pending(self) -> int:
        """Finishes queued, in flight, or waiting to be sent again (metrics, tests)."""
        return self._finishes_pending

    def _drop(self, count: int, reason: str) -> None:
        if self._on_dropped is not None:
            self._on_dropped(count, reason)

    def _send_finishes(self) -> None:
        """Everything queued, as one finish script call (a task delivers it)."""
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if not self._queued:
            return
        groups, self._queued = list(self._queued.values()), {}
        count, self._queued_count = self._queued_count, 0
        keys: list[bytes] = []
        args: list[bytes] = []
        n_keys, n_args = 1, 2
        for group in groups:
            plan, requests = group.plan, len(group.requests)
            keys.append(plan.finish_keys)
            args.append(
                bulk(b"%d" % len(plan.subjects))
                + bulk(b"%d" % requests)
                + bulk(b"%d" % _ms(group.now))
            )
            args.append(plan.finish_args)
            args += group.requests
            n_keys += plan.finish_key_count
            n_args += 3 + plan.finish_arg_count + 2 * requests
        batch = f"batch-{self._lease_id()}".encode()
        command = b"".join(
            (
                self._finish.head(n_keys, n_args),
                bulk(self._lease_prefix + batch),
                *keys,
                _FINISH_MARK,
                bulk(b"%d" % len(groups)),
                *args,
            )
        )
        waiters = [waiter for group in groups for waiter in group.waiters]
        # Sent now, not from the task: so it is in the pipeline ahead of any admit
        # call made after this (the admit's caller counts on its usage being there).
        try:
            first: asyncio.Future[Reply] | None = self._client.send(command, resend=True, hold=True)
        except RedisUnavailable:
            first = None  # (the task tries again, and counts the failure)
        self._chore(self._deliver(command, waiters, count, first))

    async def _deliver(
        self,
        command: bytes,
        waiters: list[asyncio.Future[bool] | None],
        count: int,
        first: asyncio.Future[Reply] | None,
    ) -> None:
        try:
            for pause in (*FINISH_RETRIES, None):
                started = time.perf_counter()
                try:
                    pending, first = first, None  # (a retry sends anew)
                    sent = await self._finish.run(self._client, command, hold=True, sent=pending)
                    recorded = _finish_reply(sent)
                except (RedisUnavailable, ReplyError) as exc:
                    error = self._unavailable("finish", started, exc)
                    # An error reply (NOPERM, a script error) would come again, and the
                    # script may have written part of the batch: no retry then.
                    if pause is None or self._closing or isinstance(exc, ReplyError):
                        self._drop(count, "unavailable")
                        for waiter in waiters:
                            if waiter is not None and not waiter.done():
                                waiter.set_exception(error)
                        return
                    await asyncio.sleep(pause)
                    continue
                self._report(
                    "finish", "recorded" if recorded else "repeated", time.perf_counter() - started
                )
                for waiter in waiters:
                    if waiter is not None and not waiter.done():
                        waiter.set_result(recorded)
                return
        finally:
            self._finishes_pending -= count

    # -- reading usage (the auth service's admin side: HGETALL, SMEMBERS) ---------------

    async def usage(self, kind: str, subject_id: str, labels: Sequence[str]) -> list[UsageRecord]:
        """The usage of one subject for each label: ``YYYY-MM-DD`` (a day) or
        ``YYYY-MM`` (a month); zeros where nothing was recorded."""
        base = f"{self._base}{kind}:{subject_id}"
        started = time.perf_counter()
        sent = [
            self._client.send(
                encode("HGETALL", f"{base}:{'day' if len(label) == 10 else 'month'}:{label}"),
                resend=True,
            )
            for label in labels
        ]
        try:
            replies = [_pairs(await reply) for reply in sent]
        except (RedisUnavailable, ReplyError) as exc:
            raise self._unavailable("usage", started, exc) from exc
        finally:
            await asyncio.gather(*sent, return_exceptions=True)  # none left unretrieved
        return [UsageRecord.from_hash(reply) for reply in replies]

    async def subjects_on(self, day: str) -> list[tuple[str, str]]:
        """(kind, id) of every subject with usage recorded on ``day`` (``YYYY-MM-DD``)."""
        started = time.perf_counter()
        try:
            members = _strings(
                await self._client.send(encode("SMEMBERS", f"{self._base}days:{day}"), resend=True),
                "SMEMBERS",
            )
        except (RedisUnavailable, ReplyError) as exc:
            raise self._unavailable("usage", started, exc) from exc
        found = (member.decode().partition(":") for member in members)
        return sorted((kind, subject_id) for kind, _, subject_id in found)


def _expect(reply: Reply, expected: tuple[Reply, ...], what: str) -> Reply:
    """``reply`` when it is one of ``expected``, else ``ReplyError``."""
    if reply in expected:
        return reply
    raise ReplyError(f"unexpected reply to {what}: {reply!r:.80}")


def _strings(reply: Reply, what: str) -> list[bytes]:
    if not isinstance(reply, list) or not all(isinstance(value, bytes) for value in reply):
        raise ReplyError(f"unexpected reply to {what}: {reply!r:.80}")
    return cast(list[bytes], reply)


def _pairs(reply: Reply) -> dict[bytes, bytes]:
    """An HGETALL reply (RESP2: field, value, ...) as a dict."""
    values = _strings(reply, "HGETALL")
    if len(values) % 2:
        raise ReplyError(f"unexpected reply to HGETALL: {reply!r:.80}")
    return dict(zip(values[::2], values[1::2], strict=True))
