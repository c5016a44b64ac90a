"""The pure parts of ``keyrelay keys``: budgets, expiries and limits as typed."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrelay.auth.v1 import auth_pb2
from keyrelay.cli import CliError, describe_limits, parse_budget, parse_expiry

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "amount", "unit", "period"),
    [
        ("5usd/month", 5.0, "usd", "month"),
        ("$0.50usd/day", 0.5, "usd", "day"),
        (" 5 USD/Month ", 5.0, "usd", "month"),
        ("2000000tokens/day", 2_000_000.0, "tokens", "day"),
    ],
)
def test_budgets_as_typed(text: str, amount: float, unit: str, period: str) -> None:
    assert parse_budget(text) == auth_pb2.KeyBudget(amount=amount, unit=unit, period=period)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5eur/month", "write AMOUNT usd|tokens / day|month"),
        ("5usd", "the period is day or month"),
        ("5usd/week", "the period is day or month"),
        ("usd/day", "is not a number"),
        ("five usd/day", "is not a number"),
        ("", "write AMOUNT"),
    ],
)
def test_budgets_that_are_not(text: str, message: str) -> None:
    with pytest.raises(CliError, match="--budget") as info:
        parse_budget(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("never", 0),
        ("NEVER", 0),
        ("90m", int(NOW) + 90 * 60),
        ("12h", int(NOW) + 12 * 3600),
        ("30d", int(NOW) + 30 * 86400),
        ("2027-01-31", calendar.timegm((2027, 1, 31, 0, 0, 0))),
        ("2027-01-31T12:30", calendar.timegm((2027, 1, 31, 12, 30, 0))),
        ("2027-01-31T12:30:15Z", calendar.timegm((2027, 1, 31, 12, 30, 15))),
    ],
)
def test_expiries_as_typed(text: str, expected: int) -> None:
    assert parse_expiry(text, NOW) == expected


@pytest.mark.parametrize("text", ["tomorrow", "30", "d", "-5d", "5w", "2027-02-30", "31/01/2027"])
def test_expiries_that_are_not(text: str) -> None:
    with pytest.raises(CliError, match="--expires"):
        parse_expiry(text, NOW)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["m", "h", "d"]))
def test_a_duration_is_counted_from_now(count: int, unit: str) -> None:
    seconds = {"m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_expiry(f"{count}{unit}", NOW) == int(NOW) + count * seconds


def test_limits_are_described_in_words() -> None:
    assert describe_limits(auth_pb2.KeyLimits()) == "none"
    limits = auth_pb2.KeyLimits(
        requests_per_minute=60,
        tokens_per_minute=1000,
        concurrent_requests=2,
        budget=auth_pb2.KeyBudget(amount=5, unit="usd", period="month"),
    )
    assert describe_limits(limits) == "60 req/min, 1000 tok/min, 2 at once, $5.00/month"
    tokens = auth_pb2.KeyLimits(budget=auth_pb2.KeyBudget(amount=1e6, unit="tokens", period="day"))
    assert describe_limits(tokens) == "1,000,000 tokens/day"
