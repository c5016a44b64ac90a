"""Limits, windows and decisions of ``gateway.core.ratelimit``: tables and hypothesis."""

from __future__ import annotations

import calendar
import datetime as dt
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core.ratelimit import (
    CONCURRENCY_RETRY_SECONDS,
    HEADER_LIMIT,
    HEADER_REMAINING,
    HEADER_RESET,
    Counters,
    LimitKind,
    Subject,
    counted_tokens,
    decide,
    micro_usd,
    retry_after,
    seconds_until_reset,
    window,
)
from keyrelay.gateway.core.usage import Usage
from keyrelay.limit_rules import (
    MAX_BUDGET_USD,
    MAX_CONCURRENT_REQUESTS,
    MAX_REQUESTS_PER_MINUTE,
    Budget,
    BudgetUnit,
    Limits,
    LimitsError,
    Period,
)

T = calendar.timegm((2025, 3, 14, 15, 9, 26))  # a Friday afternoon, UTC
LAST_EPOCH = calendar.timegm((9999, 11, 30, 0, 0, 0))  # datetime's range, a month to spare


def at(*fields: int) -> int:
    return calendar.timegm((*fields, *(0,) * (6 - len(fields))))


# -- parsing ---------------------------------------------------------------------------


def test_full_limits_from_dict() -> None:
    limits = Limits.from_dict(
        {
            "requests_per_minute": 60,
            "tokens_per_minute": 100_000,
            "concurrent_requests": 4,
            "budget": {"amount": 12.5, "unit": "usd", "period": "month"},
        }
    )
    assert limits == Limits(60, 100_000, 4, Budget(12_500_000, BudgetUnit.USD, Period.MONTH))
    assert not limits.unlimited


@pytest.mark.parametrize(
    "data",
    [{}, {"requests_per_minute": None, "budget": None}],
)
def test_no_limits(data: dict[str, Any]) -> None:
    assert Limits.from_dict(data) == Limits()
    assert Limits.from_dict(data).unlimited


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"requests_per_minute": 0}, "limits.requests_per_minute must be at least 1, got 0"),
        ({"requests_per_minute": -5}, "must be at least 1, got -5"),
        ({"requests_per_minute": True}, "must be an integer, got bool True"),
        ({"requests_per_minute": 60.0}, "must be an integer, got float 60.0"),
        ({"requests_per_minute": "60"}, "must be an integer, got str '60'"),
        ({"requests_per_minute": MAX_REQUESTS_PER_MINUTE + 1}, "must be at most 1,000,000,000"),
        ({"tokens_per_minute": 10**13}, "tokens_per_minute must be at most 1,000,000,000,000"),
        ({"concurrent_requests": MAX_CONCURRENT_REQUESTS + 1}, "must be at most 1,000,000"),
        ({"concurrent_requests": False}, "must be an integer, got bool False"),
        ({"request_per_minute": 60}, "did you mean 'requests_per_minute'?"),
        ({"rpm": 60}, "unknown limit 'rpm'; known: requests_per_minute"),
        ({"budget": 5}, "limits.budget must be a table (amount, unit, period), got int 5"),
        ({"budget": {"amount": 5, "unit": "usd"}}, "limits.budget.period is required"),
        ({"budget": {"amount": 5, "unit": "eur", "period": "day"}}, "one of usd, tokens"),
        ({"budget": {"amount": 5, "unit": "usd", "period": "week"}}, "one of minute, day, month"),
        ({"budget": {"amount": 5, "unit": "usd", "period": "minute"}}, "use tokens_per_minute"),
        ({"budget": {"amount": 5, "unit": "usd", "period": "dya"}}, "did you mean 'day'?"),
        ({"budget": {"amount": 5, "unit": "usd", "period": "day", "x": 1}}, "unknown limit 'x'"),
        ({"budget": {"amount": 0, "unit": "usd", "period": "day"}}, "more than 0 US dollars"),
        ({"budget": {"amount": -1.5, "unit": "usd", "period": "day"}}, "more than 0 US dollars"),
        ({"budget": {"amount": 1e-7, "unit": "usd", "period": "day"}}, "at least 0.000001"),
        ({"budget": {"amount": float("nan"), "unit": "usd", "period": "day"}}, "US dollars"),
        ({"budget": {"amount": float("inf"), "unit": "usd", "period": "day"}}, "US dollars"),
        ({"budget": {"amount": True, "unit": "usd", "period": "day"}}, "got bool True"),
        ({"budget": {"amount": "5", "unit": "usd", "period": "day"}}, "got str '5'"),
        ({"budget": {"amount": MAX_BUDGET_USD + 1, "unit": "usd", "period": "day"}}, "at most"),
        ({"budget": {"amount": 1.5, "unit": "tokens", "period": "day"}}, "must be an integer"),
        ({"budget": {"amount": 10**16, "unit": "tokens", "period": "day"}}, "at most"),
        ({"budget": {"amount": 5, "unit": 1, "period": "day"}}, "got int 1"),
    ],
)
def test_bad_limits(data: dict[str, Any], message: str) -> None:
    with pytest.raises(LimitsError) as raised:
        Limits.from_dict(data)
    assert message in str(raised.value)


def test_not_a_table_and_where() -> None:
    with pytest.raises(LimitsError, match=r"keys\.ci\.limits must be a table of limits, got list"):
        Limits.from_dict([1], where="keys.ci.limits")  # type: ignore[arg-type]
    with pytest.raises(LimitsError, match=r"^keys\.ci\.limits\.budget\.amount"):
        Limits.from_dict(
            {"budget": {"amount": 0, "unit": "tokens", "period": "day"}}, where="keys.ci.limits"
        )


def test_usd_amounts_in_micro_dollars() -> None:
    def usd(amount: float) -> int:
        budget = Limits.from_dict({"budget": {"amount": amount, "unit": "usd", "period": "day"}})
        assert budget.budget is not None
        return budget.budget.amount

    assert usd(0.1) == 100_000  # not 100000.00000000001
    assert usd(0.000001) == 1
    assert usd(1e-6 * 1.4) == 1
    assert usd(MAX_BUDGET_USD) == MAX_BUDGET_USD * 10**6
    assert usd(19.99) == 19_990_000


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(LimitsError):
        Limits(requests_per_minute=0)
    with pytest.raises(LimitsError):
        Limits(concurrent_requests=True)
    with pytest.raises(LimitsError):
        Budget(0, BudgetUnit.TOKENS, Period.DAY)
    with pytest.raises(LimitsError):
        Budget(5, BudgetUnit.TOKENS, Period.MINUTE)


@given(st.integers(min_value=1, max_value=MAX_REQUESTS_PER_MINUTE))
def test_every_valid_count_parses(value: int) -> None:
    assert Limits.from_dict({"requests_per_minute": value}).requests_per_minute == value


# -- windows ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "now", "start", "end", "label"),
    [
        (
            Period.MINUTE,
            at(2025, 3, 14, 15, 9, 0),
            at(2025, 3, 14, 15, 9),
            at(2025, 3, 14, 15, 10),
            None,
        ),
        (
            Period.MINUTE,
            at(2025, 3, 14, 15, 9, 59) + 0.999999,
            at(2025, 3, 14, 15, 9),
            at(2025, 3, 14, 15, 10),
            None,
        ),
        (Period.DAY, at(2025, 3, 14), at(2025, 3, 14), at(2025, 3, 15), "2025-03-14"),
        (Period.DAY, at(2025, 3, 14) - 0.5, at(2025, 3, 13), at(2025, 3, 14), "2025-03-13"),
        (Period.MONTH, at(2024, 12, 31, 23, 59, 59), at(2024, 12, 1), at(2025, 1, 1), "2024-12"),
        (Period.MONTH, at(2025, 1, 1), at(2025, 1, 1), at(2025, 2, 1), "2025-01"),
        (Period.MONTH, at(2024, 2, 29, 12), at(2024, 2, 1), at(2024, 3, 1), "2024-02"),
        (Period.MONTH, at(2023, 2, 28, 23, 59, 59), at(2023, 2, 1), at(2023, 3, 1), "2023-02"),
        (Period.MONTH, at(2000, 2, 29), at(2000, 2, 1), at(2000, 3, 1), "2000-02"),
        (Period.DAY, at(2100, 2, 28, 23), at(2100, 2, 28), at(2100, 3, 1), "2100-02-28"),
        (Period.MONTH, 0, 0, at(1970, 2, 1), "1970-01"),
    ],
)
def test_windows(period: Period, now: float, start: int, end: int, label: str | None) -> None:
    found = window(period, now)
    assert (found.start, found.end) == (start, end)
    assert found.label == (label if label is not None else str(start // 60))
    assert seconds_until_reset(period, now) == end - now


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, 1),
        (1e-9, 1),
        (0.5, 1),
        (1.0, 1),
        (1.000001, 2),
        (59.2, 60),
        (60.0, 60),
        (-3.0, 1),
        (math.nan, 1),
    ],
)
def test_retry_after(seconds: float, expected: int) -> None:
    assert retry_after(seconds) == expected


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_now_must_be_finite(now: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        window(Period.MINUTE, now)


nows = st.floats(min_value=0, max_value=LAST_EPOCH, allow_nan=False)


@given(nows, st.sampled_from(list(Period)))
def test_window_contains_now(now: float, period: Period) -> None:
    found = window(period, now)
    assert found.start <= now < found.end
    until = seconds_until_reset(period, now)
    assert 0 < until <= found.end - found.start
    assert 1 <= retry_after(until) <= found.end - found.start
    # The next window starts where this one ends, and is a different label
    # (but there is no month after December 9999: datetime ends there).
    if found.end > LAST_EPOCH:
        return
    following = window(period, found.end)
    assert following.start == found.end
    assert following.label != found.label


@given(nows)
def test_month_matches_the_calendar(now: float) -> None:
    date = dt.datetime.fromtimestamp(math.floor(now), dt.UTC)
    found = window(Period.MONTH, now)
    length_days = calendar.monthrange(date.year, date.month)[1]
    assert found.end - found.start == length_days * 86_400
    assert found.label == f"{date.year:04d}-{date.month:02d}"
    assert dt.datetime.fromtimestamp(found.start, dt.UTC).day == 1
    day = window(Period.DAY, now)
    assert day.label == date.date().isoformat()
    assert found.start <= day.start < day.end <= found.end


@given(st.integers(min_value=1971, max_value=9998), st.integers(min_value=1, max_value=12))
def test_every_month_boundary(year: int, month: int) -> None:
    start = at(year, month, 1)
    just_before = math.nextafter(start, 0)  # the last float of the previous month
    before, after = window(Period.MONTH, just_before), window(Period.MONTH, start)
    assert before.end == after.start == start
    assert retry_after(seconds_until_reset(Period.MONTH, just_before)) == 1
    expected_days = (
        29 if month == 2 and calendar.isleap(year) else calendar.monthrange(year, month)[1]
    )
    assert after.end - after.start == expected_days * 86_400


@given(st.integers(min_value=0, max_value=LAST_EPOCH // 60))
def test_exact_minute_boundaries(minute: int) -> None:
    assert window(Period.MINUTE, minute * 60).start == minute * 60
    assert retry_after(seconds_until_reset(Period.MINUTE, minute * 60)) == 60
    assert window(Period.MINUTE, math.nextafter(minute * 60, -1)).end == minute * 60


# -- usage in counter units -----------------------------------------------------------


def test_counted_tokens_and_micro_usd() -> None:
    assert counted_tokens(Usage(10, 20, 30, 40)) == 60  # cache reads do not count
    assert micro_usd(None) == 0
    assert micro_usd(0.0) == 0
    assert micro_usd(-1.0) == 0
    assert micro_usd(math.nan) == 0
    assert micro_usd(0.1) == 100_000
    assert micro_usd(0.0000015) == 2  # half to even
    assert micro_usd(0.0000025) == 2


@given(st.lists(st.integers(min_value=0, max_value=10**9), max_size=50))
def test_micro_usd_sums_without_drift(micro: list[int]) -> None:
    assert sum(micro_usd(m / 1_000_000) for m in micro) == sum(micro)


# -- decisions -------------------------------------------------------------------------

ALL = Limits(60, 1000, 2, Budget(5_000_000, BudgetUnit.USD, Period.MONTH))
KEY = Subject("key", "sha256:ab", ALL, "ci")
ACCOUNT = Subject("account", "acct-1", Limits(requests_per_minute=100))
NOW = at(2025, 1, 31, 23, 59, 30) + 0.25


def test_admitted_with_room_left() -> None:
    decision = decide([KEY, ACCOUNT], [Counters(10, 100, 0, 1_000_000), Counters(99)], NOW)
    assert decision.admitted
    assert decision.refused_by is None
    assert decision.retry_after is None
    assert decision.message() is None
    assert not decision.budget_exhausted
    # the account's last request of the minute is the tightest (0 of 100 left)
    assert decision.headers() == (
        (HEADER_LIMIT, "100"),
        (HEADER_REMAINING, "0"),
        (HEADER_RESET, "30"),
    )


@pytest.mark.parametrize(
    ("key", "account", "kind", "retry", "who"),
    [
        (Counters(requests=60), Counters(), LimitKind.REQUESTS, 30, "key"),
        (Counters(tokens=1000), Counters(), LimitKind.TOKENS, 30, "key"),
        (Counters(tokens=5000), Counters(), LimitKind.TOKENS, 30, "key"),
        (
            Counters(concurrent=2),
            Counters(),
            LimitKind.CONCURRENT,
            CONCURRENCY_RETRY_SECONDS,
            "key",
        ),
        (Counters(), Counters(requests=100), LimitKind.REQUESTS, 30, "account"),
        (Counters(budget=5_000_000), Counters(), LimitKind.BUDGET, 30, "key"),
        # a budget wins over a rate limit: waiting for the minute would not help
        (
            Counters(requests=60, budget=5_000_001),
            Counters(requests=100),
            LimitKind.BUDGET,
            30,
            "key",
        ),
        # a concurrency refusal and a minute refusal: the retry waits for both
        (Counters(requests=60, concurrent=2), Counters(), LimitKind.REQUESTS, 30, "key"),
    ],
)
def test_refused(key: Counters, account: Counters, kind: LimitKind, retry: int, who: str) -> None:
    decision = decide([KEY, ACCOUNT], [key, account], NOW)
    assert not decision.admitted
    refused = decision.refused_by
    assert refused is not None
    assert (refused.kind, refused.subject.kind) == (kind, who)
    assert decision.retry_after == retry
    assert decision.budget_exhausted == (kind is LimitKind.BUDGET)
    headers = dict(decision.headers())
    assert headers[HEADER_REMAINING] == "0"
    assert headers[HEADER_RESET] == str(retry)


def test_messages() -> None:
    def message(counters: Counters, now: float = NOW) -> str:
        text = decide([KEY], [counters], now).message()
        assert text is not None
        return text

    assert message(Counters(requests=60)) == (
        'rate limit: the key "ci" allows 60 requests per minute and they are used up; retry in 30 s'
    )
    assert "1,000 tokens per minute" in message(Counters(tokens=1000))
    assert message(Counters(concurrent=2)) == (
        'rate limit: the key "ci" allows 2 concurrent requests and all are in use; retry in 1 s'
    )
    # The month ends 30 s later here: Jan 31 -> Feb 1.
    assert message(Counters(budget=5_000_100)) == (
        'the key "ci" has used up its monthly budget of $5.00 ($5.00 used); it resets at '
        "2025-02-01T00:00:00Z (in 30 s). Do not retry before then."
    )
    tokens_daily = Subject(
        "account", "a", Limits(budget=Budget(10**6, BudgetUnit.TOKENS, Period.DAY))
    )
    text = decide([tokens_daily], [Counters(budget=10**6)], at(2025, 1, 1, 10)).message()
    assert text == (
        'the account "a" has used up its daily budget of 1,000,000 tokens (1,000,000 tokens '
        "used); it resets at 2025-01-02T00:00:00Z (in 14 h). Do not retry before then."
    )


def test_budget_headers_in_dollars() -> None:
    usd = Subject("key", "k", Limits(budget=Budget(12_500_000, BudgetUnit.USD, Period.DAY)))
    decision = decide([usd], [Counters(budget=2_000_000)], at(2025, 6, 1, 12))
    assert decision.headers() == (
        (HEADER_LIMIT, "12.5"),
        (HEADER_REMAINING, "10.5"),
        (HEADER_RESET, str(12 * 3600)),
    )
    whole = Subject("key", "k", Limits(budget=Budget(10_000_000, BudgetUnit.USD, Period.DAY)))
    assert dict(decide([whole], [Counters()], at(2025, 6, 1)).headers())[HEADER_LIMIT] == "10"


def test_no_limits_no_headers() -> None:
    decision = decide([Subject("key", "k", Limits())], [Counters()], NOW)
    assert decision.admitted
    assert not decision.limited
    assert decision.headers() == ()


def test_only_concurrency_is_still_described() -> None:
    subject = Subject("key", "k", Limits(concurrent_requests=3))
    decision = decide([subject], [Counters(concurrent=1)], NOW)
    assert decision.headers() == ((HEADER_LIMIT, "3"), (HEADER_REMAINING, "1"), (HEADER_RESET, "1"))


def test_counters_must_match_subjects() -> None:
    with pytest.raises(ValueError, match="2 subjects but 1 counters"):
        decide([KEY, ACCOUNT], [Counters()], NOW)


def test_the_key_is_never_shown_only_its_name_or_id() -> None:
    assert Subject("key", "sha256:ab", Limits(), "team-a").label == 'the key "team-a"'
    assert Subject("account", "acct", Limits()).label == 'the account "acct"'


counters = st.builds(
    Counters,
    st.integers(0, 200),
    st.integers(0, 3000),
    st.integers(0, 5),
    st.integers(0, 10_000_000),
)


@settings(max_examples=300)
@given(counters, counters, nows)
def test_decision_invariants(key: Counters, account: Counters, now: float) -> None:
    decision = decide([KEY, ACCOUNT], [key, account], now)
    # The script's rule: admitted iff every counter is under its limit.
    under = (
        key.requests < 60
        and key.tokens < 1000
        and key.concurrent < 2
        and key.budget < 5_000_000
        and account.requests < 100
    )
    assert decision.admitted == under
    assert (decision.refused_by is None) == under
    headers = dict(decision.headers())
    assert set(headers) == {HEADER_LIMIT, HEADER_REMAINING, HEADER_RESET}
    assert int(headers[HEADER_RESET]) >= 1
    if not under:
        assert decision.retry_after is not None
        assert decision.retry_after >= 1
        assert headers[HEADER_REMAINING] == "0"
        assert decision.message()
        reset_at = decision.refused_by.reset_at if decision.refused_by else None
        if reset_at is not None:
            # retrying after retry-after lands in the next window, never before
            assert now + decision.retry_after >= reset_at
