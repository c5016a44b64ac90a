"""``[gateway.limits]``, a key's ``limits`` and ``[accounts.<id>] limits``: bad input
is one start-up error that names the file and the key, never a gateway that runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from keyrelay.configfile import ConfigError
from keyrelay.gateway.config import load_gateway_config, parse_gateway_config
from keyrelay.limit_rules import Budget, BudgetUnit, Limits, Period

HASH = "sha256:" + "ab" * 32
URL = "redis://gateway:s3cret@127.0.0.1:6379/0"
ENV = {"UPSTREAM_KEY": "sk-upstream-0123456789", "LIMITS_URL": URL}


def config_data(
    key_limits: Any = None, *, store: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    key: dict[str, Any] = {
        "name": "alice",
        "hash": HASH,
        "mode": "api_key",
        "account": "team",
        "api_key": {"env": "UPSTREAM_KEY"},
    }
    if key_limits is not None:
        key["limits"] = key_limits
    gateway = {} if store is None else {"limits": store}
    return {
        "gateway": gateway,
        "upstreams": {"default": {"url": "http://127.0.0.1:9"}},
        "keys": [key],
        **top,
    }


STORE = {"redis_url": {"env": "LIMITS_URL"}}


def test_defaults_and_subjects() -> None:
    config = parse_gateway_config(
        config_data(
            {"requests_per_minute": 60, "budget": {"amount": 5, "unit": "usd", "period": "month"}},
            store=STORE,
            accounts={"team": {"limits": {"concurrent_requests": 4}}},
        ),
        ENV,
    )
    assert config.limits is not None
    assert config.limits.redis_url == URL
    assert URL not in repr(config.limits)  # the password stays out of logs
    assert (config.limits.key_prefix, config.limits.on_store_error) == ("keyrelay:", "allow")
    assert config.limits.timeout_seconds == 0.5
    key, account = config.routes[HASH].subjects
    assert (key.kind, key.id, key.name) == ("key", HASH, "alice")
    assert key.limits == Limits(
        requests_per_minute=60, budget=Budget(5_000_000, BudgetUnit.USD, Period.MONTH)
    )
    assert (account.kind, account.id, account.limits) == (
        "account",
        "team",
        Limits(concurrent_requests=4),
    )


def test_a_key_without_limits_has_no_subjects_even_with_a_store() -> None:
    config = parse_gateway_config(config_data(store=STORE), ENV)
    assert config.routes[HASH].subjects == ()
    assert parse_gateway_config(config_data({}, store=STORE), ENV).routes[HASH].subjects == ()


def test_an_account_limit_alone_still_records_the_key() -> None:
    data = config_data(store=STORE, accounts={"team": {"limits": {"requests_per_minute": 5}}})
    key, account = parse_gateway_config(data, ENV).routes[HASH].subjects
    assert key.limits.unlimited
    assert account.limits.requests_per_minute == 5


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"requests_per_minute": -1}, r"keys\[0\]\.limits\.requests_per_minute must be at least 1"),
        ({"requests_per_minute": 0}, r"requests_per_minute must be at least 1, got 0"),
        ({"tokens_per_minute": 10**13}, r"tokens_per_minute must be at most 1,000,000,000,000"),
        ({"concurrent_requests": 10**7}, r"concurrent_requests must be at most 1,000,000"),
        ({"requests_per_minute": "60"}, r"requests_per_minute must be an integer, got str"),
        ({"requests_per_minute": 1.5}, r"requests_per_minute must be an integer, got float"),
        ({"requests_per_minute": True}, r"requests_per_minute must be an integer, got bool"),
        ({"request_per_minute": 5}, r"unknown limit 'request_per_minute' \(did you mean"),
        ({"budget": 5}, r"keys\[0\]\.limits\.budget must be a table"),
        ({"budget": {"amount": 5, "unit": "eur", "period": "month"}}, r"budget\.unit must be"),
        ({"budget": {"amount": 5, "unit": "usd", "period": "week"}}, r"budget\.period must be"),
        ({"budget": {"amount": 0, "unit": "usd", "period": "day"}}, r"more than 0 US dollars"),
        ({"budget": {"amount": -3, "unit": "tokens", "period": "day"}}, r"at least 1"),
        ({"budget": {"amount": 1e12, "unit": "usd", "period": "day"}}, r"at most 1,000,000,000"),
        ({"budget": {"unit": "usd", "period": "day"}}, r"budget\.amount is required"),
        ("lots", r"keys\[0\]\.limits must be a table of limits, got str"),
    ],
)
def test_bad_limits_name_the_key(limits: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_gateway_config(config_data(limits, store=STORE), ENV)
    assert str(caught.value).endswith("(key 'alice')")


def test_bad_account_limits_name_the_account() -> None:
    data = config_data(store=STORE, accounts={"team": {"limits": {"requests_per_minute": 0}}})
    with pytest.raises(ConfigError, match=r"^accounts\.team\.limits\.requests_per_minute .*"):
        parse_gateway_config(data, ENV)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            config_data({"requests_per_minute": 60}),
            r"^keys\[0\]\.limits: limits need a limits store, and \[gateway\.limits\] has no "
            r"redis_url \(key 'alice'\)",
        ),
        (
            config_data(accounts={"team": {"limits": {"requests_per_minute": 60}}}),
            r"^accounts\.team\.limits: limits need a limits store, .*\(account 'team'\)",
        ),
        (
            config_data(store=STORE, accounts={"tema": {"limits": {"requests_per_minute": 1}}}),
            r"^accounts\.tema: no \[\[keys\]\] entry has account = 'tema'; did you mean 'team'\? "
            r"\(and without \[gateway\.auth\] no runtime key can\)",
        ),
        (
            config_data(store=STORE, accounts={"team": {"limit": {}}}),
            r"^accounts\.team\.limit: unknown key; did you mean 'limits'\?",
        ),
        (
            config_data(store={"redis_url": URL}),
            r"^gateway\.limits\.redis_url: holds a password, so it is a secret",
        ),
        (
            config_data(store={"redis_url": "http://127.0.0.1:6379"}),
            r"^gateway\.limits\.redis_url: must be redis://, rediss:// or unix://",
        ),
        (
            config_data(store={"redis_url": "redis://127.0.0.1:99999"}),
            r"^gateway\.limits\.redis_url: the port is not a number",
        ),
        (
            config_data(store={**STORE, "on_store_error": "block"}),
            r"^gateway\.limits\.on_store_error: must be one of allow, deny, got 'block'",
        ),
        (
            config_data(store={**STORE, "timeout_seconds": 0}),
            r"^gateway\.limits\.timeout_seconds: must be a number >= 0\.01",
        ),
        (
            config_data(store={**STORE, "timeout_second": 1}),
            r"^gateway\.limits\.timeout_second: unknown key; did you mean 'timeout_seconds'\?",
        ),
        (
            config_data(store={"key_prefix": "kr:"}),
            r"^gateway\.limits\.redis_url: required",
        ),
    ],
)
def test_bad_store_config_is_one_clear_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_gateway_config(data, ENV)
    assert "s3cret" not in str(caught.value)


def test_an_inline_url_without_a_password() -> None:
    config = parse_gateway_config(
        config_data(store={"redis_url": "redis://127.0.0.1:6379/0", "on_store_error": "deny"}),
        ENV,
    )
    assert config.limits is not None
    assert config.limits.on_store_error == "deny"


def test_the_file_is_named_too(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps(config_data({"tokens_per_minute": -5}, store=STORE)))
    with pytest.raises(ConfigError, match=rf"^{path}: keys\[0\]\.limits\.tokens_per_minute"):
        load_gateway_config(str(path), ENV)
