"""Limits and budgets of a gateway key and its account (DESIGN §6.2). No I/O, no clock.

What a subject (a key, an account) may be limited by, each optional::

    requests_per_minute   requests admitted per UTC minute          (fixed window)
    tokens_per_minute     tokens counted per UTC minute             (fixed window)
    concurrent_requests   requests in flight at once                (leases)
    budget                USD or tokens per UTC day or UTC month    (calendar window)

The shared counters live in Redis (``keyrelay.gateway.limits_store``); this
module holds everything that is decided *about* them, so the Lua scripts only
compare and count:

- ``Limits.from_dict`` (in ``keyrelay.limit_rules``, shared with the auth
  service): the validated limits from what TOML or an admin RPC gives (a plain
  dict), with errors that name the field and the allowed range.
- ``window``: the UTC minute, day or month around ``now`` (start, end, and the
  label used in counter key names); ``retry_after``: whole seconds, at least 1.
- ``decide``: from the counter values the admit script read (one ``Counters``
  per subject), every ``Check``, which one refused the request, the
  ``x-keyrelay-ratelimit-*`` headers and the message the client is shown.

Every check is the same rule, in the script and here: a request is admitted
while ``used < limit`` for every limit of every subject, where ``used`` is the
counter *before* this request (requests, in-flight leases, tokens or budget
already recorded). Requests and leases are counted at admission, so their
counts are exact. Tokens and cost are known only when a response ends, so they
are recorded then (``counted_tokens``, ``micro_usd``) and a request admitted
while the counter was under the limit may take it over: the overshoot is at
most the usage of the requests in flight when the limit was crossed.

Which tokens count (``counted_tokens``): input + cache creation + output, as
Anthropic counts its own input and output token limits; cache reads are not
counted (they are recorded in the usage, by kind).

Headers (on every response of a subject with limits): ``-limit`` and
``-remaining`` of the tightest limit (the one that refused, else the windowed
limit with the smallest remaining share), ``-reset`` the whole seconds until its
window ends. USD amounts are written in dollars (``12.5``), counts as integers.
"""

from __future__ import annotations

import calendar
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from typing import Final

from keyrelay.gateway.core.usage import Usage
from keyrelay.limit_rules import MICRO_USD, BudgetUnit, Limits, Period

__all__ = [
    "CONCURRENCY_RETRY_SECONDS",
    "HEADER_LIMIT",
    "HEADER_REMAINING",
    "HEADER_RESET",
    "Check",
    "Counters",
    "Decision",
    "LimitKind",
    "Subject",
    "Window",
    "counted_tokens",
    "decide",
    "micro_usd",
    "retry_after",
    "seconds_until_reset",
    "window",
]

# A request refused for concurrency has no window to wait for: a lease frees
# when any request in flight ends, so the client is told to retry this soon.
CONCURRENCY_RETRY_SECONDS: Final = 1

HEADER_LIMIT: Final = "x-keyrelay-ratelimit-limit"
HEADER_REMAINING: Final = "x-keyrelay-ratelimit-remaining"
HEADER_RESET: Final = "x-keyrelay-ratelimit-reset"

_DAY: Final = 86_400
_EPOCH: Final = dt.date(1970, 1, 1)


class LimitKind(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    CONCURRENT = "concurrent"
    BUDGET = "budget"


@dataclass(frozen=True, slots=True)
class Subject:
    """A key or an account and its limits. ``id`` names its counters (a key's hash, an
    account id); ``name`` is what a client is shown (never the key itself)."""

    kind: str
    id: str
    limits: Limits
    name: str = ""

    @property
    def label(self) -> str:
        return f'the {self.kind} "{self.name or self.id}"'


# -- windows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """A UTC minute, day or month: ``[start, end)`` in epoch seconds, and a label
    unique per period (``29012345`` minutes since the epoch, ``2025-01-31``, ``2025-01``)."""

    period: Period
    start: int
    end: int
    label: str


def _whole_seconds(now: float) -> int:
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite number of epoch seconds, got {now!r}")
    return math.floor(now)


def _month_start(year: int, month: int) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0))


def window(period: Period, now: float) -> Window:
    """The window of ``period`` that contains ``now`` (UTC; POSIX days are 86,400 s)."""
    second = _whole_seconds(now)
    if period is Period.MINUTE:
        minute = second // 60
        return Window(period, minute * 60, minute * 60 + 60, str(minute))
    day = second // _DAY
    date = _EPOCH + dt.timedelta(days=day)
    if period is Period.DAY:
        return Window(period, day * _DAY, day * _DAY + _DAY, date.isoformat())
    year, month = date.year, date.month
    following = (year + 1, 1) if month == 12 else (year, month + 1)
    return Window(
        period, _month_start(year, month), _month_start(*following), f"{year:04d}-{month:02d}"
    )


def seconds_until_reset(period: Period, now: float) -> float:
    """Seconds from ``now`` to the end of its window (in ``(0, length]``)."""
    return window(period, now).end - now


def retry_after(seconds: float) -> int:
    """Whole seconds to wait, rounded up and at least 1 (``retry-after: 0`` would
    have a client retry at once, into the same refusal)."""
    if math.isnan(seconds):
        return 1
    return max(1, math.ceil(seconds))


# -- usage in counter units -------------------------------------------------------------


def counted_tokens(usage: Usage) -> int:
    """The tokens that count against tokens_per_minute and token budgets."""
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.output_tokens


def micro_usd(cost: float | None) -> int:
    """A cost in USD as whole micro-dollars (half to even); ``None`` (unpriced) is 0."""
    if cost is None or not math.isfinite(cost) or cost <= 0:
        return 0
    scaled = cost * 1_000_000
    if scaled < _FAST_SCALED:
        whole = math.floor(scaled)
        fraction = scaled - whole
        # Far from a half, the float product rounds as the decimal one does (its
        # error is under 1e-7 here); near one, the exact decimal decides.
        if abs(fraction - 0.5) > _NEAR_HALF:
            return whole + (fraction > 0.5)
    return int((Decimal(repr(cost)) * MICRO_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


# Below 1e9 micro-dollars a float product is within 1e9 * 2**-52 (< 3e-7) of exact.
_FAST_SCALED: Final = 1e9
_NEAR_HALF: Final = 1e-6


# -- decisions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counters:
    """What the admit script read for one subject, before this request: requests in
    this minute, tokens in this minute, leases in flight, budget used in its window.
    Counters of limits the subject does not have are 0 (not read)."""

    requests: int = 0
    tokens: int = 0
    concurrent: int = 0
    budget: int = 0


@dataclass(frozen=True, slots=True)
class Check:
    """One limit of one subject against its counter; ``reset_at`` is the end of its
    window (None for concurrency, which has none)."""

    subject: Subject
    kind: LimitKind
    limit: int
    used: int
    reset_at: int | None

    @property
    def passed(self) -> bool:
        return self.used < self.limit

    def remaining(self, admitted: bool) -> int:
        """What is left after this request: one request and one lease are taken by
        an admitted request now; its tokens and cost only when it ends."""
        taken = 1 if admitted and self.kind in (LimitKind.REQUESTS, LimitKind.CONCURRENT) else 0
        return max(0, self.limit - self.used - taken)

    def reset_seconds(self, now: float) -> int:
        if self.reset_at is None:
            return CONCURRENCY_RETRY_SECONDS
        return retry_after(self.reset_at - now)

    def shown(self, units: int) -> str:
        budget = self.subject.limits.budget
        if self.kind is LimitKind.BUDGET and budget is not None and budget.unit is BudgetUnit.USD:
            dollars = f"{Decimal(units) / MICRO_USD:f}"
            return dollars.rstrip("0").rstrip(".") if "." in dollars else dollars
        return str(units)


def _checks(subject: Subject, counters: Counters, now: float) -> tuple[Check, ...]:
    limits = subject.limits
    found: list[Check] = []
    if limits.requests_per_minute is not None or limits.tokens_per_minute is not None:
        minute_end = window(Period.MINUTE, now).end
        if limits.requests_per_minute is not None:
            found.append(
                Check(
                    subject,
                    LimitKind.REQUESTS,
                    limits.requests_per_minute,
                    counters.requests,
                    minute_end,
                )
            )
        if limits.tokens_per_minute is not None:
            found.append(
                Check(
                    subject, LimitKind.TOKENS, limits.tokens_per_minute, counters.tokens, minute_end
                )
            )
    if limits.concurrent_requests is not None:
        found.append(
            Check(
                subject, LimitKind.CONCURRENT, limits.concurrent_requests, counters.concurrent, None
            )
        )
    if limits.budget is not None:
        end = window(limits.budget.period, now).end
        found.append(Check(subject, LimitKind.BUDGET, limits.budget.amount, counters.budget, end))
    return tuple(found)


def _human_duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


_PER_PERIOD: Final = {Period.DAY: "daily", Period.MONTH: "monthly"}


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request is admitted, from every check of every subject.

    ``refused_by``: a failed budget check if any (waiting for the next minute
    does not help), else the failed check whose window ends last (all must pass
    before a retry can succeed). ``retry_after`` and ``message`` describe it."""

    admitted: bool
    checks: tuple[Check, ...]
    now: float

    @property
    def limited(self) -> bool:
        """The subjects have limits: the response carries the ratelimit headers."""
        return bool(self.checks)

    @property
    def refused_by(self) -> Check | None:
        if self.admitted:  # (admitted means every check passed)
            return None
        failed = [check for check in self.checks if not check.passed]
        if not failed:
            return None
        budgets = [check for check in failed if check.kind is LimitKind.BUDGET]
        if budgets:
            return max(budgets, key=lambda check: check.reset_seconds(self.now))
        return max(failed, key=lambda check: check.reset_seconds(self.now))

    @property
    def budget_exhausted(self) -> bool:
        """Refused for a budget: answered with ``x-should-retry: false``."""
        refused = self.refused_by
        return refused is not None and refused.kind is LimitKind.BUDGET

    @property
    def retry_after(self) -> int | None:
        refused = self.refused_by
        return None if refused is None else refused.reset_seconds(self.now)

    @property
    def tightest(self) -> Check | None:
        """The check the headers describe."""
        refused = self.refused_by
        if refused is not None or not self.checks:
            return refused
        # The smallest remaining share among windowed checks (all, when none is),
        # the earlier reset first: a plain loop, as this runs for every request.
        windowed = any(check.reset_at is not None for check in self.checks)
        best: Check | None = None
        best_key = (0.0, 0)
        for check in self.checks:
            if windowed and check.reset_at is None:
                continue
            key = (check.remaining(self.admitted) / check.limit, check.reset_at or 0)
            if best is None or key < best_key:
                best, best_key = check, key
        return best

    def headers(self) -> tuple[tuple[str, str], ...]:
        """``x-keyrelay-ratelimit-{limit,remaining,reset}``; none without limits."""
        check = self.tightest
        if check is None:
            return ()
        return (
            (HEADER_LIMIT, check.shown(check.limit)),
            (HEADER_REMAINING, check.shown(check.remaining(self.admitted))),
            (HEADER_RESET, str(check.reset_seconds(self.now))),
        )

    def message(self) -> str | None:
        """What the client is told when refused (``error.message`` of the 429)."""
        check = self.refused_by
        if check is None:
            return None
        label = check.subject.label
        wait = _human_duration(check.reset_seconds(self.now))
        budget = check.subject.limits.budget
        if check.kind is LimitKind.BUDGET and budget is not None and check.reset_at is not None:
            reset = dt.datetime.fromtimestamp(check.reset_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return (
                f"{label} has used up its {_PER_PERIOD[budget.period]} budget of "
                f"{budget.shown(budget.amount)} ({budget.shown(check.used)} used); "
                f"it resets at {reset} (in {wait}). Do not retry before then."
            )
        if check.kind is LimitKind.CONCURRENT:
            return (
                f"rate limit: {label} allows {check.limit:,} concurrent requests and all "
                f"are in use; retry in {wait}"
            )
        what = "requests" if check.kind is LimitKind.REQUESTS else "tokens"
        return (
            f"rate limit: {label} allows {check.limit:,} {what} per minute and they are "
            f"used up; retry in {wait}"
        )


def decide(subjects: Sequence[Subject], counters: Sequence[Counters], now: float) -> Decision:
    """The decision for counters read (before this request) for each subject, in order.
    Admitted iff every check passes: the admit script applies the same rule."""
    if len(subjects) != len(counters):
        raise ValueError(f"{len(subjects)} subjects but {len(counters)} counters")
    found = tuple(
        check
        for subject, counted in zip(subjects, counters, strict=True)
        for check in _checks(subject, counted, now)
    )
    return Decision(all(check.passed for check in found), found, now)
