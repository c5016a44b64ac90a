"""``keyrelay.limit_rules``' plain values (``to_dict``, ``Budget.plain_amount``): what
the auth service stores and serves is read back by ``from_dict`` as the same limits."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from keyrelay.limit_rules import (
    MAX_BUDGET_TOKENS,
    MAX_BUDGET_USD,
    MAX_CONCURRENT_REQUESTS,
    MAX_REQUESTS_PER_MINUTE,
    MAX_TOKENS_PER_MINUTE,
    MICRO_USD,
    Budget,
    BudgetUnit,
    Limits,
    Period,
)


def _budgets() -> st.SearchStrategy[Budget]:
    periods = st.sampled_from([Period.DAY, Period.MONTH])
    usd = st.builds(
        Budget,
        st.one_of(
            st.integers(1, MAX_BUDGET_USD * MICRO_USD),
            st.sampled_from([1, 5, 999_999, 1_000_001, MAX_BUDGET_USD * MICRO_USD - 1]),
        ),
        st.just(BudgetUnit.USD),
        periods,
    )
    tokens = st.builds(
        Budget, st.integers(1, MAX_BUDGET_TOKENS), st.just(BudgetUnit.TOKENS), periods
    )
    return st.one_of(usd, tokens)


LIMITS = st.builds(
    Limits,
    st.none() | st.integers(1, MAX_REQUESTS_PER_MINUTE),
    st.none() | st.integers(1, MAX_TOKENS_PER_MINUTE),
    st.none() | st.integers(1, MAX_CONCURRENT_REQUESTS),
    st.none() | _budgets(),
)


@given(LIMITS)
def test_plain_values_read_back_as_the_same_limits(limits: Limits) -> None:
    assert Limits.from_dict(limits.to_dict()) == limits
    # Through JSON too (the auth service's stored form): a float of dollars is exact enough.
    assert Limits.from_dict(json.loads(json.dumps(limits.to_dict()))) == limits


def test_plain_values_are_what_people_write() -> None:
    assert Limits().to_dict() == {}
    limits = Limits(60, None, 2, Budget(12_500_000, BudgetUnit.USD, Period.MONTH))
    assert limits.to_dict() == {
        "requests_per_minute": 60,
        "concurrent_requests": 2,
        "budget": {"amount": 12.5, "unit": "usd", "period": "month"},
    }
    tokens = Budget(2_000_000, BudgetUnit.TOKENS, Period.DAY)
    assert (tokens.plain_amount, type(tokens.plain_amount)) == (2_000_000, int)
    assert Budget(1, BudgetUnit.USD, Period.DAY).plain_amount == 0.000001
