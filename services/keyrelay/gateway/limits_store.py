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
``LimitsUnavailable`` within ``timeout`` seconds, never hangs (the client,
``gateway/resp_client.py``: one auto-pipelined connection, one deadline timer,
a call re-sent once when the connection drops, which the lease marks make
safe). What then happens (allow or deny) is the gateway's policy. Everything of
a call but the lease and ``now`` is encoded once per subjects and minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

from keyrelay.gateway.core.ratelimit import (
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
    bulk,
    encode,
)
from keyrelay.limit_rules import BudgetUnit, Period
from keyrelay.usage_layout import UsageRecord

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

# A re-sent admit (the client re-sends once after a broken connection) finds the
# lease admitted; a finish re-sent within FINISH_MARK_MS counts once.
ADMIT_MARK_MS: Final = 60_000
FINISH_MARK_MS: Final = 600_000
MINUTE_SLACK_MS: Final = 120_000
DEFAULT_LEASE_SECONDS: Final = 600.0
DEFAULT_RETENTION_DAYS: Final = 400
DEFAULT_TIMEOUT: Final = 0.5

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
# ARGV: [1] now (epoch ms), [2] lease id, [3] the lease's TTL (ms), [4] ADMIT_MARK_MS,
#       [5] when the minute counters expire (epoch ms), then per subject (5 each):
#       requests/min, tokens/min, concurrent, budget limits (-1: none), the budget's
#       usage field
# Returns {admitted (1, 0, or 2 for a re-sent admission), then per subject
# requests, tokens, leases, budget used before this request (0 when not limited)}.
_ADMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
local now = tonumber(ARGV[1])
local n = (#KEYS - 1) / 4
local reply = {1}
for i = 0, n - 1 do
  local k, a = 1 + i * 4, 5 + i * 5
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
local minute_ttl = tonumber(ARGV[5]) - now
for i = 0, n - 1 do
  local k, a = 1 + i * 4, 5 + i * 5
  if tonumber(ARGV[a + 1]) >= 0 then
    redis.call('INCR', KEYS[k + 1])
    redis.call('PEXPIRE', KEYS[k + 1], minute_ttl)
  end
  if tonumber(ARGV[a + 3]) >= 0 then
    redis.call('ZADD', KEYS[k + 3], now + tonumber(ARGV[3]), ARGV[2])
    redis.call('PEXPIRE', KEYS[k + 3], ARGV[3])
  end
end
redis.call('SET', KEYS[1], 'a', 'PX', ARGV[4])
return reply
"""

# KEYS: [1] the lease mark, [2] the day's index of subjects, then per subject i
#       (4 each): tokens-minute counter, leases zset, day usage hash, month usage hash
# ARGV: [1] now (epoch ms), [2] lease id, [3] the usage, 7 integers separated by
#       spaces: input, output, cache creation, cache read, counted tokens, cost
#       (micro-USD), unpriced (0 or 1); [4] FINISH_MARK_MS, then when they expire
#       (epoch ms): [5] the tokens-minute counters, [6] the day hashes and the
#       index, [7] the month hashes; then per subject (3 each): '1' if tokens/min
#       limited, '1' if it holds a lease, its index member
# Returns 1 when recorded, 0 when this lease was already finished.
_FINISH = """
if redis.call('GET', KEYS[1]) == 'f' then return 0 end
redis.call('SET', KEYS[1], 'f', 'PX', ARGV[4])
local now = tonumber(ARGV[1])
local fields = {'input_tokens', 'output_tokens', 'cache_creation_input_tokens',
  'cache_read_input_tokens', 'tokens', 'cost_micro_usd', 'unpriced'}
local usage = {}
for v in string.gmatch(ARGV[3], '%-?%d+') do usage[#usage + 1] = v end
local ttl = {tonumber(ARGV[5]) - now, tonumber(ARGV[6]) - now, tonumber(ARGV[7]) - now}
local n = (#KEYS - 2) / 4
for i = 0, n - 1 do
  local k, a = 2 + i * 4, 7 + i * 3
  if ARGV[a + 1] == '1' and usage[5] ~= '0' then
    redis.call('INCRBY', KEYS[k + 1], usage[5])
    redis.call('PEXPIRE', KEYS[k + 1], ttl[1])
  end
  if ARGV[a + 2] == '1' then redis.call('ZREM', KEYS[k + 2], ARGV[2]) end
  for h = 3, 4 do
    redis.call('HINCRBY', KEYS[k + h], 'requests', 1)
    for j = 1, 7 do
      if usage[j] ~= '0' then redis.call('HINCRBY', KEYS[k + h], fields[j], usage[j]) end
    end
    redis.call('PEXPIRE', KEYS[k + h], ttl[h - 1])
  end
  redis.call('SADD', KEYS[2], ARGV[a + 3])
end
redis.call('PEXPIRE', KEYS[2], ttl[2])
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


def _bulks(*values: str | int) -> bytes:
    return b"".join(bulk(str(value).encode()) for value in values)


class _Script:
    """A Lua script by its SHA-1: the start of every EVALSHA of it, and its SCRIPT LOAD."""

    def __init__(self, source: str) -> None:
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 -- Redis's name
        self.load = encode("SCRIPT", "LOAD", source)

    def head(self, keys: int, args: int) -> bytes:
        """``EVALSHA sha <keys>``, for a call of ``keys`` keys and ``args`` arguments."""
        return b"*%d\r\n" % (3 + keys + args) + _bulks("EVALSHA", self.sha, keys)


_ADMIT_SCRIPT: Final = _Script(_ADMIT)
_FINISH_SCRIPT: Final = _Script(_FINISH)
_PING: Final = encode("PING")
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
    finish_head: bytes
    finish_keys: bytes  # the day's index, then the subjects' keys
    finish_args: bytes


_INTS: Final = {int}
# Where a check's counter is among a subject's four in the admit script's reply.
_COUNTER_AT: Final = {
    LimitKind.REQUESTS: 0,
    LimitKind.TOKENS: 1,
    LimitKind.CONCURRENT: 2,
    LimitKind.BUDGET: 3,
}


def _admit_reply(reply: Reply, subjects: int) -> list[int]:
    """The admit script's reply, checked: {2}, or {0|1, then 4 per subject}."""
    if (
        type(reply) is list
        and set(map(type, reply)) == _INTS
        and (len(reply) == 1 + 4 * subjects or reply == [2])
        and reply[0] in (0, 1, 2)
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
        observe: Observer | None = None,
    ) -> None:
        """The store on ``client``; every call gives up within ``client.timeout``."""
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
        observe: Observer | None = None,
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
            observe=observe,
        )

    @property
    def key_prefix(self) -> str:
        """Every key of the store starts with this (``<prefix>limits:``)."""
        return self._base

    async def close(self) -> None:
        await self._client.close()

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

    async def _loaded(self, script: _Script, command: bytes, error: ReplyError) -> Reply:
        """After ``error`` to ``command`` (an EVALSHA of ``script``): not loaded (a
        restarted or flushed Redis), SCRIPT LOAD and the call again, pipelined."""
        if not str(error).startswith("NOSCRIPT"):
            raise error
        client = self._client
        loaded = client.send(script.load, resend=True)
        again = client.send(command, resend=True)
        # Both retrieved; a failed load (ACL) is the error to tell, not the NOSCRIPT after it.
        load_reply, reply = await asyncio.gather(loaded, again, return_exceptions=True)
        for outcome in (load_reply, reply):
            if isinstance(outcome, BaseException):
                raise outcome
        return cast(Reply, reply)

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
            FINISH_MARK_MS,
            minute_ends,
            day.end * 1000 + self._retention_ms,
            month.end * 1000 + self._retention_ms,
        ]
        n_admit_keys, n_admit_args = 1 + len(admit_keys), 2 + len(admit_const) + len(admit_args)
        n_finish_keys = 1 + len(finish_keys)
        n_finish_args = 3 + len(finish_const) + len(finish_args)
        checks: list[Check] = []
        used_at: list[int] = []
        for i, subject in enumerate(subjects):  # decide's checks, subject by subject
            for check in decide([subject], [Counters()], now).checks:
                checks.append(check)
                used_at.append(1 + 4 * i + _COUNTER_AT[check.kind])
        return _Plan(
            subjects=subjects,
            minute=int(now // 60),
            limited=not all(subject.limits.unlimited for subject in subjects),
            checks=tuple(checks),
            used_at=tuple(used_at),
            admit_head=self._admit.head(n_admit_keys, n_admit_args),
            admit_keys=_bulks(*admit_keys),
            admit_args=_bulks(*admit_const, *admit_args),
            finish_head=self._finish.head(n_finish_keys, n_finish_args),
            finish_keys=_bulks(*finish_keys),
            finish_args=_bulks(*finish_const, *finish_args),
        )

    async def admit(self, subjects: Sequence[Subject], now: float) -> Admission:
        """Checks every limit of every subject and, only if all pass, counts the request.

        Raises ``LimitsUnavailable``."""
        subjects = tuple(subjects)
        self._leases += 1
        lease_id = f"{self._lease_base}{self._leases:x}"
        lease = Lease(lease_id, subjects, now)
        plan = self._plan(subjects, now)
        if not plan.limited:
            decision = decide(subjects, [Counters() for _ in subjects], now)
            self._report("admit", "allowed", 0.0)
            return Admission(decision, lease, 0.0, round_trip=False)
        lid = lease_id.encode()
        now_ms = b"%d" % _ms(now)
        command = b"".join(
            (
                plan.admit_head,
                bulk(self._lease_prefix + lid),
                plan.admit_keys,
                bulk(now_ms),
                bulk(lid),
                plan.admit_args,
            )
        )
        started = time.perf_counter()
        try:
            try:
                sent = await self._client.send(command, resend=True)
            except ReplyError as exc:
                sent = await self._loaded(self._admit, command, exc)
            reply = _admit_reply(sent, len(subjects))
        except (RedisUnavailable, ReplyError) as exc:
            raise self._unavailable("admit", started, exc) from exc
        seconds = time.perf_counter() - started
        decision = self._decision(plan, reply, now)
        if decision.admitted != (reply[0] != 0):  # pragma: no cover - the rule is the same
            raise LimitsUnavailable(f"limits store: the admit script disagrees: {reply!r}")
        outcome = (
            "allowed" if decision.admitted else "budget" if decision.budget_exhausted else "limited"
        )
        self._report("admit", outcome, seconds)
        return Admission(decision, lease if decision.admitted else None, seconds, round_trip=True)

    @staticmethod
    def _decision(plan: _Plan, reply: list[int], now: float) -> Decision:
        """``decide`` for the counters in ``reply``, from the plan's checks (what
        ``decide`` makes, but for the counters; within the plan's minute every
        window is the same)."""
        if reply[0] == 2:  # a re-sent copy of an admission that went through
            return Decision(True, plan.checks, now)
        checks = tuple(
            [
                Check(c.subject, c.kind, c.limit, reply[at], c.reset_at)
                for c, at in zip(plan.checks, plan.used_at, strict=True)
            ]
        )
        return Decision(all(c.used < c.limit for c in checks), checks, now)

    async def finish(self, lease: Lease, usage: Usage, cost_usd: float | None, now: float) -> bool:
        """Records what the request used and releases its lease; False when this
        lease was already finished (nothing counted twice). ``cost_usd`` None: a
        metered model without a price (counted as ``unpriced``).

        Raises ``LimitsUnavailable``."""
        plan = self._plan(lease.subjects, now)
        lid = lease.id.encode()
        now_ms = b"%d" % _ms(now)
        used = b"%d %d %d %d %d %d %d" % (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
            counted_tokens(usage),
            micro_usd(cost_usd),
            1 if cost_usd is None else 0,
        )
        command = b"".join(
            (
                plan.finish_head,
                bulk(self._lease_prefix + lid),
                plan.finish_keys,
                bulk(now_ms),
                bulk(lid),
                bulk(used),
                plan.finish_args,
            )
        )
        started = time.perf_counter()
        try:
            try:
                sent = await self._client.send(command, resend=True)
            except ReplyError as exc:
                sent = await self._loaded(self._finish, command, exc)
            reply = _expect(sent, (0, 1), "finish")
        except (RedisUnavailable, ReplyError) as exc:
            raise self._unavailable("finish", started, exc) from exc
        recorded = reply == 1
        self._report(
            "finish", "recorded" if recorded else "repeated", time.perf_counter() - started
        )
        return recorded

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
