"""The pure parts of ``keyrelay keys``: budgets, expiries, limits and routes as typed."""

from __future__ import annotations

import argparse
import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrelay.auth.v1 import auth_pb2
from keyrelay.cli import (
    CliError,
    build_parser,
    describe_limits,
    format_keys,
    key_json,
    key_route,
    parse_budget,
    parse_expiry,
)

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


# -- a key's route: an account, or a pool (issue 12) ---------------------------------


def keys_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["keys", *argv])


def test_a_new_key_names_a_pool_instead_of_an_account() -> None:
    args = keys_args("new", "--pool", "team", "--profile", "coding")
    assert (args.pool, args.account, args.mode) == ("team", None, None)
    assert key_route(args) == auth_pb2.KeyRoute(pool="team", profile="coding")
    assert key_route(keys_args("new", "--account", "alice")) == auth_pb2.KeyRoute(
        account_id="alice"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--pool", "team", "--account", "alice"), "leave out --account"),
        (("--pool", "team", "--mode", "auto"), "leave out --mode"),
        (("--pool", "team", "--account", "a", "--mode", "oauth"), "leave out --account and --mode"),
    ],
)
def test_a_pool_and_a_credential_of_its_own_are_refused(
    argv: tuple[str, ...], message: str
) -> None:
    with pytest.raises(CliError, match="--pool: a key names a pool or its own credential") as info:
        key_route(keys_args("new", *argv))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "argv",
    [
        (),  # neither
        ("--account", "alice", "--pool", "team"),  # both
    ],
)
def test_a_new_key_needs_an_account_or_a_pool(argv: tuple[str, ...]) -> None:
    """Refused before any connection (no admin token, no auth service here)."""
    args = keys_args("new", *argv)
    with pytest.raises(CliError, match="needs --account NAME or --pool NAME"):
        args.func(args)


def test_a_config_entry_is_for_an_account() -> None:
    args = keys_args("new", "--config-entry", "--pool", "team")
    with pytest.raises(CliError, match='pool = "NAME" in the block'):
        args.func(args)
    args = keys_args("new", "--config-entry")
    with pytest.raises(CliError, match="--config-entry needs --account"):
        args.func(args)


POOL_KEY = auth_pb2.KeyRoute(mode="pool", profile="coding", upstream="default", pool="team")
ACCOUNT_KEY = auth_pb2.KeyRoute(
    account_id="alice", mode="auto", profile="default", upstream="default"
)


@pytest.mark.parametrize(
    ("base", "argv", "expected"),
    [
        # Another profile keeps the pool (and the mode "pool" it came with).
        (POOL_KEY, ("--profile", "p2"), auth_pb2.KeyRoute(
            mode="pool", profile="p2", upstream="default", pool="team")),
        # An account replaces the pool, and the mode "pool" goes with it (oauth then).
        (POOL_KEY, ("--account", "bob"), auth_pb2.KeyRoute(
            account_id="bob", profile="coding", upstream="default")),
        (POOL_KEY, ("--account", "bob", "--mode", "auto"), auth_pb2.KeyRoute(
            account_id="bob", mode="auto", profile="coding", upstream="default")),
        # A pool replaces the account and the mode.
        (ACCOUNT_KEY, ("--pool", "other"), auth_pb2.KeyRoute(
            profile="default", upstream="default", pool="other")),
        (POOL_KEY, ("--pool", "other"), auth_pb2.KeyRoute(
            profile="coding", upstream="default", pool="other")),
    ],
)  # fmt: skip
def test_an_update_moves_a_key_between_a_pool_and_an_account(
    base: auth_pb2.KeyRoute, argv: tuple[str, ...], expected: auth_pb2.KeyRoute
) -> None:
    assert key_route(keys_args("update", "gk-0123456789abcdef", *argv), base) == expected


def test_the_list_shows_a_pool_in_the_route_column() -> None:
    keys = [
        auth_pb2.GatewayKey(key_id="gk-1", name="team-bot", route=POOL_KEY),
        auth_pb2.GatewayKey(key_id="gk-2", name="alice", route=ACCOUNT_KEY),
    ]
    _header, pool_row, account_row = format_keys(keys, NOW).splitlines()
    assert "pool team coding@default" in pool_row
    assert "alice auto default@default" in account_row
    listed = key_json(keys[0], NOW)
    assert listed["route"] == {
        "mode": "pool",
        "profile": "coding",
        "upstream": "default",
        "pool": "team",
    }
