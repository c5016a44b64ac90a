"""The pure rules of gateway keys (keyrelay.auth.core.gateway_keys); the RPC-level
checks of every rule are in tests/integration/test_gateway_keys.py."""

from __future__ import annotations

import pytest

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.gateway_keys import (
    Budget,
    KeyChanges,
    Limits,
    Route,
    validate_changes,
    validate_limits,
    validate_route,
)
from keyrelay.limit_rules import MAX_TOKENS_PER_MINUTE


@pytest.mark.parametrize(
    "limits",
    [
        Limits(),
        Limits(
            requests_per_minute=1, tokens_per_minute=MAX_TOKENS_PER_MINUTE, concurrent_requests=3
        ),
        Limits(budget=Budget(0.01, "usd", "month")),
        Limits(concurrent_requests=2, budget=Budget(5000.0, "tokens", "day")),
    ],
)
def test_limits_survive_their_stored_form(limits: Limits) -> None:
    assert Limits.from_json(validate_limits(limits).to_json()) == limits


def test_unset_limits_are_stored_as_nothing() -> None:
    assert Limits().to_json() == "{}"
    assert Limits.from_json("") == Limits()


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
    assert changes.fields() == {
        "account_id": "acct",
        "mode": "oauth",
        "profile": "default",
        "upstream": "default",
        "expires_at": "0",
    }
