"""The pure rules of gateway keys (keyrelay.auth.core.gateway_keys) and the stored
form of their limits (keyrelay.auth.store.keys_store); the RPC-level checks of every
rule are in tests/integration/test_gateway_keys.py."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.gateway_keys import (
    KeyChanges,
    Route,
    limits_from,
    validate_changes,
    validate_key_id,
    validate_name,
    validate_route,
)
from keyrelay.auth.core.ids import validate_account_id
from keyrelay.auth.store.keys_store import change_fields, limits_of_stored, stored_limits
from keyrelay.limit_rules import (
    MAX_TOKENS_PER_MINUTE,
    Budget,
    BudgetUnit,
    Limits,
    LimitsError,
    Period,
)


@pytest.mark.parametrize(
    "limits",
    [
        Limits(),
        Limits(
            requests_per_minute=1, tokens_per_minute=MAX_TOKENS_PER_MINUTE, concurrent_requests=3
        ),
        Limits(budget=Budget(10_000, BudgetUnit.USD, Period.MONTH)),
        Limits(budget=Budget(1, BudgetUnit.USD, Period.DAY)),
        Limits(concurrent_requests=2, budget=Budget(5000, BudgetUnit.TOKENS, Period.DAY)),
    ],
)
def test_limits_survive_their_stored_form(limits: Limits) -> None:
    assert limits_of_stored(stored_limits(limits)) == limits


def test_unset_limits_are_stored_as_nothing() -> None:
    assert stored_limits(Limits()) == "{}"
    assert limits_of_stored("") == Limits()
    assert limits_of_stored("{}") == Limits()


# Byte for byte what the auth service wrote before it used keyrelay.limit_rules' Limits
# (its own dataclasses: a USD amount and the proto's double for tokens, as floats).
EARLIER_VERSIONS = [
    (
        '{"budget": {"amount": 12.5, "period": "month", "unit": "usd"}, '
        '"concurrent_requests": 4, "requests_per_minute": 60, "tokens_per_minute": 100000}',
        Limits(60, 100_000, 4, Budget(12_500_000, BudgetUnit.USD, Period.MONTH)),
    ),
    (
        '{"budget": {"amount": 1000000.0, "period": "day", "unit": "tokens"}}',
        Limits(budget=Budget(1_000_000, BudgetUnit.TOKENS, Period.DAY)),
    ),
    (
        '{"budget": {"amount": 0.01, "period": "day", "unit": "usd"}}',
        Limits(budget=Budget(10_000, BudgetUnit.USD, Period.DAY)),
    ),
    ('{"requests_per_minute": 5}', Limits(requests_per_minute=5)),
    # Before limit_rules, the auth service took any USD amount above 0: under a
    # micro-dollar (which no gateway enforced) it is read as the smallest budget.
    (
        '{"budget": {"amount": 1e-07, "period": "month", "unit": "usd"}}',
        Limits(budget=Budget(1, BudgetUnit.USD, Period.MONTH)),
    ),
]


@pytest.mark.parametrize(("stored", "limits"), EARLIER_VERSIONS)
def test_limits_stored_by_earlier_versions_load(stored: str, limits: Limits) -> None:
    assert limits_of_stored(stored) == limits


def test_the_stored_form_is_the_one_earlier_versions_read() -> None:
    """Replicas of the version before share the Redis during a rollout: what this
    one writes is what that one wrote (a USD amount in dollars; tokens are whole)."""
    usd = Limits(60, 100_000, 4, Budget(12_500_000, BudgetUnit.USD, Period.MONTH))
    assert stored_limits(usd) == EARLIER_VERSIONS[0][0]
    tokens = Limits(budget=Budget(1_000_000, BudgetUnit.TOKENS, Period.DAY))
    assert json.loads(stored_limits(tokens)) == {
        "budget": {"amount": 1_000_000, "period": "day", "unit": "tokens"}
    }


@pytest.mark.parametrize(
    "stored",
    [
        "[1]",
        '{"requests_per_minute": 0}',
        '{"budget": {"amount": 5, "unit": "eur", "period": "day"}}',
    ],
)
def test_stored_limits_that_are_not_limits_are_an_error_naming_the_key(stored: str) -> None:
    with pytest.raises(LimitsError, match=r"^gateway key gk-1: stored limits"):
        limits_of_stored(stored, "gateway key gk-1: stored limits")


def test_requests_state_limits_by_the_gateways_rules() -> None:
    assert limits_from({"requests_per_minute": None}) == Limits()
    # The proto's double: a whole number of tokens is the integer it is.
    whole = {"budget": {"amount": 5000.0, "unit": "tokens", "period": "day"}}
    assert limits_from(whole) == Limits(budget=Budget(5000, BudgetUnit.TOKENS, Period.DAY))
    usd = {"budget": {"amount": 12.5, "unit": "usd", "period": "month"}}
    assert limits_from(usd) == Limits(budget=Budget(12_500_000, BudgetUnit.USD, Period.MONTH))
    with pytest.raises(InvalidArgument, match=r"^limits.budget.amount must be an integer"):
        limits_from({"budget": {"amount": 10.5, "unit": "tokens", "period": "day"}})
    with pytest.raises(InvalidArgument, match=r"^limits.requests_per_minute must be at least 1"):
        limits_from({"requests_per_minute": 0})
    with pytest.raises(InvalidArgument, match=r"^limits.budget.amount must be more than 0"):
        limits_from({"budget": {"amount": 1e-7, "unit": "usd", "period": "day"}})


def test_a_route_gets_the_defaults_and_api_key_mode_needs_no_account() -> None:
    assert validate_route(Route("acct", "", "", "")) == Route("acct", "oauth", "default", "default")
    assert validate_route(Route("", "api_key")) == Route("", "api_key", "default", "default")
    with pytest.raises(InvalidArgument, match=r"^route.account_id is required for mode 'auto'"):
        validate_route(Route("", "auto"))


def test_changes_are_checked_and_an_empty_update_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="nothing to update"):
        validate_changes(KeyChanges(), now=1000.0)
    with pytest.raises(InvalidArgument, match=r"^expires_at must be in the future"):
        validate_changes(KeyChanges(expires_at=999), now=1000.0)
    changes = validate_changes(KeyChanges(route=Route("acct"), expires_at=0), now=1000.0)
    assert change_fields(changes) == {
        "account_id": "acct",
        "mode": "oauth",
        "profile": "default",
        "upstream": "default",
        "pool": "",  # a route replaced as a whole: a pool it had is gone
        "expires_at": "0",
    }


def test_a_route_naming_a_pool_has_mode_pool_and_no_account() -> None:
    expected = Route("", "pool", "default", "default", "team")
    assert validate_route(Route("", "", pool="team")) == expected
    assert validate_route(Route("", "pool", pool="team")) == expected  # GetKey's route, sent back
    assert validate_route(Route("", "", "coding", "eu", "team.b-2")) == Route(
        "", "pool", "coding", "eu", "team.b-2"
    )
    changes = validate_changes(KeyChanges(route=Route(mode="", pool="team")), now=1000.0)
    assert change_fields(changes) == {
        "account_id": "",
        "mode": "pool",
        "profile": "default",
        "upstream": "default",
        "pool": "team",
    }


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            Route("acct", "", pool="team"),
            "route.pool: a key names a pool or its own credential, not both: "
            "leave route.account_id empty",
        ),
        (
            Route("", "oauth", pool="team"),
            "route.pool: a key names a pool or its own credential, not both: "
            "leave route.mode empty",
        ),
        (
            Route("acct", "auto", pool="team"),
            "route.pool: a key names a pool or its own credential, not both: "
            "leave route.account_id and route.mode empty",
        ),
        (Route("", "pool"), "route.mode 'pool' needs route.pool (the pool's name)"),
        (Route("acct", "pool"), "route.mode 'pool' needs route.pool (the pool's name)"),
        (Route("", "", pool="-team"), "route.pool must be 1-64 characters of letters"),
        (Route("", "", pool="team a"), "route.pool must be 1-64 characters of letters"),
        (Route("", "", pool="t" * 65), "route.pool must be 1-64 characters of letters"),
        (Route("", "", pool="team/x"), "route.pool must be 1-64 characters"),
        (Route("", "", "bad profile", pool="team"), "route.profile must be 1-64 characters"),
    ],
)
def test_a_pool_route_that_is_not_one(route: Route, message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_route(route)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    "check",
    [
        lambda: validate_name("alice\n"),
        lambda: validate_key_id("gk-0123456789abcdef\n"),
        lambda: validate_account_id("acct\n"),
        lambda: validate_route(Route(pool="team\n")),
        lambda: validate_route(Route("acct\n")),
        lambda: validate_route(Route("acct", "oauth", "default\n", "")),
        lambda: validate_route(Route("acct", "oauth", "", "default\n")),
    ],
)
def test_a_trailing_newline_is_not_part_of_a_name(check: Callable[[], object]) -> None:
    """``$`` also matches before a final newline: every name check ends at ``\\Z``."""
    with pytest.raises(InvalidArgument):
        check()
