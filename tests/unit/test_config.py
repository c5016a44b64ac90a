"""Config parsing: defaults, secrets by reference, and a named key in every error."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from keyrelay.auth.config import (
    DEFAULT_ENCRYPTION_KEYS_ENV,
    AuthConfig,
    EncryptionKey,
    load_auth_config,
    parse_auth_config,
    parse_encryption_keys,
)
from keyrelay.auth.core.authorize import RESERVED_AUTHORIZE_PARAMS
from keyrelay.configfile import ConfigError, load_toml, read_text_file

KEY_1 = bytes(range(32))
KEY_2 = bytes(range(200, 232))
B64_1 = base64.b64encode(KEY_1).decode()
B64_2 = base64.b64encode(KEY_2).decode()
KEYS = f"k1:{B64_1}"
ADMIN_TOKEN = "admin-token-AAAAAAAAAAAAAAAA"
GATEWAY_TOKEN = "gateway-token-BBBBBBBBBBBBBBB"
CLIENT_SECRET = "client-secret-CCCCCCCCCCCCCC"
REDIS_PASSWORD = "redis-pass-DDDDDDDDDDDD"
PROVIDER = "testidp"

ENV: dict[str, str] = {
    DEFAULT_ENCRYPTION_KEYS_ENV: KEYS,
    "KR_ADMIN": ADMIN_TOKEN,
    "KR_GATEWAY": GATEWAY_TOKEN,
    "KR_CLIENT_SECRET": CLIENT_SECRET,
    "KR_REDIS_URL": f"rediss://:{REDIS_PASSWORD}@redis.internal:6380/2",
}
FILES: dict[str, str] = {"/run/secrets/gateway": GATEWAY_TOKEN + "\n"}


def fake_read(path: str) -> str:
    try:
        return FILES[path]
    except KeyError:
        raise FileNotFoundError(2, "No such file or directory", path) from None


def minimal() -> dict[str, Any]:
    return {"auth": {"callers": [{"role": "admin", "token": {"env": "KR_ADMIN"}}]}}


def provider(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "authorize_url": "https://idp.example/authorize",
        "token_url": "https://idp.example/token",
        "client_id": "keyrelay-test",
        "redirect_uris": ["http://127.0.0.1:8765/callback"],
    }
    base.update(overrides)
    return base


def with_provider(**overrides: Any) -> dict[str, Any]:
    data = minimal()
    data["providers"] = {PROVIDER: provider(**overrides)}
    return data


def full() -> dict[str, Any]:
    return {
        "auth": {
            "encryption_keys": {"env": "KR_KEYS"},
            "listen": "0.0.0.0:6000",
            "redis_url": "rediss://redis.internal:6380/1",
            "key_prefix": "kr:",
            "events_stream": "kr:stream",
            "events_maxlen": 5000,
            "flow_ttl_seconds": 300,
            "skew_seconds": 45.5,
            "lock_ttl_seconds": 8,
            "refresh_deadline_seconds": 6,
            "wait_for_refresh_seconds": 9,
            "token_timeout_seconds": 4,
            "refresh_backoff_base_seconds": 0.5,
            "refresh_backoff_cap_seconds": 20,
            "log_level": "DEBUG",
            "callers": [
                {"role": "admin", "token": {"env": "KR_ADMIN"}},
                {"role": "gateway", "token": {"file": "/run/secrets/gateway"}},
            ],
            "tls": {
                "cert_file": "/tls/tls.crt",
                "key_file": "/tls/tls.key",
                "client_ca_file": "/tls/ca.crt",
            },
        },
        "providers": {
            PROVIDER: provider(
                revoke_url="https://idp.example/revoke",
                client_secret={"env": "KR_CLIENT_SECRET"},
                token_auth_method="client_secret_post",
                scopes=["openid", "offline_access"],
                redirect_uris=["http://127.0.0.1:8765/callback", "https://app.example/cb"],
                authorize_params={"prompt": "consent", "access_type": "offline"},
            ),
            "second-idp_2": provider(client_id="other"),
        },
    }


FULL_ENV = {**ENV, "KR_KEYS": f"k2:{B64_2}, k1:{B64_1}"}


def parse(
    data: Mapping[str, Any],
    env: Mapping[str, str] = ENV,
    read_file: Callable[[str], str] = fake_read,
) -> AuthConfig:
    return parse_auth_config(data, env, read_file)


def error_of(
    data: Mapping[str, Any],
    env: Mapping[str, str] = ENV,
    read_file: Callable[[str], str] = fake_read,
) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, env, read_file)
    return str(info.value)


def assert_error(message: str, key: str, problem: str) -> None:
    assert message.startswith((f"{key}:", f"{key} ")), message
    assert problem in message, message


# --- valid configs ---------------------------------------------------------------------


def test_minimal_config_gets_safe_defaults() -> None:
    config = parse(minimal())
    assert config.encryption_keys == (EncryptionKey("k1", KEY_1),)
    assert [(c.role, c.token) for c in config.callers] == [("admin", ADMIN_TOKEN)]
    assert dict(config.providers) == {}
    assert config.listen == "127.0.0.1:50051"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.key_prefix == "keyrelay:"
    assert config.events_stream == "keyrelay:events"
    assert config.events_maxlen == 100_000
    assert config.flow_ttl_seconds == 600.0
    assert config.skew_seconds == 30.0
    assert config.lock_ttl_seconds == 10.0
    assert config.refresh_deadline_seconds == 30.0
    assert config.wait_for_refresh_seconds == 35.0
    assert config.token_timeout_seconds == 10.0
    assert config.refresh_backoff_base_seconds == 1.0
    assert config.refresh_backoff_cap_seconds == 60.0
    assert config.log_level == "info"
    assert config.tls is None
    assert config.web is None  # no [auth.web]: no HTTP side


def test_events_stream_and_wait_follow_their_defaults() -> None:
    data = minimal()
    data["auth"].update(key_prefix="tenant-a:", refresh_deadline_seconds=12)
    config = parse(data)
    assert config.events_stream == "tenant-a:events"
    assert config.wait_for_refresh_seconds == 17.0


def test_full_config() -> None:
    config = parse(full(), FULL_ENV)
    assert config.encryption_keys == (EncryptionKey("k2", KEY_2), EncryptionKey("k1", KEY_1))
    assert [(c.role, c.token) for c in config.callers] == [
        ("admin", ADMIN_TOKEN),
        ("gateway", GATEWAY_TOKEN),  # the file's trailing newline is dropped
    ]
    assert config.listen == "0.0.0.0:6000"
    assert config.redis_url == "rediss://redis.internal:6380/1"
    assert config.key_prefix == "kr:"
    assert config.events_stream == "kr:stream"
    assert config.events_maxlen == 5000
    assert config.flow_ttl_seconds == 300.0
    assert config.skew_seconds == 45.5
    assert config.lock_ttl_seconds == 8.0
    assert config.refresh_deadline_seconds == 6.0
    assert config.wait_for_refresh_seconds == 9.0
    assert config.token_timeout_seconds == 4.0
    assert config.refresh_backoff_base_seconds == 0.5
    assert config.refresh_backoff_cap_seconds == 20.0
    assert config.log_level == "debug"
    assert config.tls is not None
    assert (config.tls.cert_file, config.tls.key_file, config.tls.client_ca_file) == (
        "/tls/tls.crt",
        "/tls/tls.key",
        "/tls/ca.crt",
    )
    assert set(config.providers) == {PROVIDER, "second-idp_2"}
    p = config.providers[PROVIDER]
    assert p.name == PROVIDER
    assert p.authorize_url == "https://idp.example/authorize"
    assert p.token_url == "https://idp.example/token"
    assert p.revoke_url == "https://idp.example/revoke"
    assert p.client_id == "keyrelay-test"
    assert p.client_secret == CLIENT_SECRET
    assert p.token_auth_method == "client_secret_post"
    assert p.scopes == ("openid", "offline_access")
    assert p.redirect_uris == ("http://127.0.0.1:8765/callback", "https://app.example/cb")
    assert p.authorize_params == (("prompt", "consent"), ("access_type", "offline"))
    other = config.providers["second-idp_2"]
    assert (other.client_id, other.client_secret, other.revoke_url) == ("other", None, None)
    assert (other.token_auth_method, other.scopes, other.authorize_params) == ("none", (), ())


def test_numbers_are_floats_even_when_written_as_integers() -> None:
    data = minimal()
    data["auth"]["skew_seconds"] = 0
    config = parse(data)
    assert config.skew_seconds == 0.0
    assert isinstance(config.skew_seconds, float)


def test_token_timeout_may_equal_the_refresh_deadline() -> None:
    data = minimal()
    data["auth"].update(token_timeout_seconds=5, refresh_deadline_seconds=5)
    assert parse(data).token_timeout_seconds == 5.0


def test_tls_without_client_ca() -> None:
    data = minimal()
    data["auth"]["tls"] = {"cert_file": "/c", "key_file": "/k"}
    tls = parse(data).tls
    assert tls is not None
    assert tls.client_ca_file is None


def test_repr_contains_no_secret() -> None:
    data = full()
    del data["auth"]["redis_url"]
    data["auth"]["redis_url_secret"] = {"env": "KR_REDIS_URL"}
    config = parse(data, FULL_ENV)
    assert config.redis_url == ENV["KR_REDIS_URL"]
    text = repr(config)
    forbidden = [
        ADMIN_TOKEN,
        GATEWAY_TOKEN,
        CLIENT_SECRET,
        REDIS_PASSWORD,
        B64_1,
        B64_2,
        repr(KEY_1),
        repr(KEY_2),
        KEY_1.hex(),
        KEY_2.hex(),
    ]
    for secret in forbidden:
        assert secret not in text
    # The non-secret parts are still there to debug with.
    assert "k2" in text
    assert "client_secret_post" in text
    for item in (*config.encryption_keys, *config.callers, *config.providers.values()):
        for secret in forbidden:
            assert secret not in repr(item)
            assert secret not in str(item)


# --- encryption keys -------------------------------------------------------------------


def test_parse_encryption_keys_keeps_order_and_strips_spaces() -> None:
    keys = parse_encryption_keys(f" new:{B64_2} ,old-1_x:{B64_1}", "SRC")
    assert keys == (EncryptionKey("new", KEY_2), EncryptionKey("old-1_x", KEY_1))


def test_kid_of_32_chars_is_accepted() -> None:
    kid = "k" * 32
    assert parse_encryption_keys(f"{kid}:{B64_1}", "SRC")[0].kid == kid


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "entry 1: expected kid:base64key"),
        (B64_1, "entry 1: expected kid:base64key"),
        (f":{B64_1}", "entry 1: expected kid:base64key"),
        (f"bad kid:{B64_1}", "entry 1: expected kid:base64key"),
        (f"k.1:{B64_1}", "entry 1: expected kid:base64key"),
        (f"{'k' * 33}:{B64_1}", "entry 1: expected kid:base64key"),
        (f"k1:{B64_1},", "entry 2: expected kid:base64key"),
        ("k1:not base64!", "entry 1 (k1): key is not valid base64"),
        ("k1:" + B64_1.rstrip("="), "entry 1 (k1): key is not valid base64"),
        ("k1:", "entry 1 (k1): key must be 32 bytes (AES-256), got 0"),
        ("k1:" + base64.b64encode(bytes(16)).decode(), "key must be 32 bytes (AES-256), got 16"),
        ("k1:" + base64.b64encode(bytes(33)).decode(), "key must be 32 bytes (AES-256), got 33"),
        (f"k1:{B64_1},k1:{B64_2}", "entry 2: key id 'k1' appears twice"),
    ],
)
def test_malformed_encryption_keys(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_encryption_keys(value, "SRC")
    assert_error(str(info.value), "SRC", problem)
    if not value:
        return  # an empty variable counts as unset (see test_no_encryption_keys_...)
    # Through the environment variable, the error names the variable.
    message = error_of(minimal(), {**ENV, DEFAULT_ENCRYPTION_KEYS_ENV: value})
    assert_error(message, DEFAULT_ENCRYPTION_KEYS_ENV, problem)
    assert B64_1 not in message
    assert B64_2 not in message


def test_malformed_keys_from_the_config_name_the_config_key() -> None:
    data = minimal()
    data["auth"]["encryption_keys"] = {"env": "MY_KEYS"}
    message = error_of(data, {**ENV, "MY_KEYS": "k1:short"})
    assert_error(message, "auth.encryption_keys", "entry 1 (k1)")


def test_configured_keys_win_over_the_default_variable() -> None:
    data = minimal()
    data["auth"]["encryption_keys"] = {"file": "/run/secrets/keys"}
    files = {"/run/secrets/keys": f"kf:{B64_2}\n"}
    config = parse(data, ENV, files.__getitem__)
    assert config.encryption_keys == (EncryptionKey("kf", KEY_2),)


@pytest.mark.parametrize("env", [{}, {DEFAULT_ENCRYPTION_KEYS_ENV: ""}])
def test_no_encryption_keys_says_how_to_make_one(env: dict[str, str]) -> None:
    message = error_of(
        minimal(), {**{k: v for k, v in ENV.items() if k != "KEYRELAY_ENCRYPTION_KEYS"}, **env}
    )
    assert_error(message, "auth.encryption_keys", "KEYRELAY_ENCRYPTION_KEYS is not set")
    assert "generate one with" in message
    assert "os.urandom(32)" in message
    assert "base64" in message


# --- secrets ---------------------------------------------------------------------------


def _caller_token(value: Any) -> dict[str, Any]:
    data = minimal()
    data["auth"]["callers"][0]["token"] = value
    return data


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (_caller_token(ADMIN_TOKEN), "auth.callers[0].token"),
        (with_provider(client_secret=CLIENT_SECRET), f"providers.{PROVIDER}.client_secret"),
        (
            {**minimal(), "auth": {**minimal()["auth"], "encryption_keys": KEYS}},
            "auth.encryption_keys",
        ),
        (
            {
                **minimal(),
                "auth": {**minimal()["auth"], "redis_url_secret": f"redis://:{REDIS_PASSWORD}@h"},
            },
            "auth.redis_url_secret",
        ),
    ],
)
def test_inline_secrets_are_rejected(data: dict[str, Any], key: str) -> None:
    message = error_of(data)
    assert_error(message, key, "never inline")
    assert '{ env = "VAR" }' in message
    assert '{ file = "/path" }' in message
    for secret in (ADMIN_TOKEN, CLIENT_SECRET, B64_1, REDIS_PASSWORD):
        assert secret not in message


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"env": "KR_ADMIN", "file": "/run/secrets/gateway"},
        {"var": "KR_ADMIN"},
        {"env": "KR_ADMIN", "default": "x"},
        ["KR_ADMIN"],
        12345678901234567890,
        True,
    ],
)
def test_malformed_secret_references_are_rejected(value: Any) -> None:
    assert_error(error_of(_caller_token(value)), "auth.callers[0].token", "never inline")


@pytest.mark.parametrize("var", ["", 5, None, ["KR_ADMIN"]])
def test_secret_env_must_name_a_variable(var: Any) -> None:
    message = error_of(_caller_token({"env": var}))
    assert_error(message, "auth.callers[0].token.env", "must name an environment variable")


@pytest.mark.parametrize("path", ["", 5, None])
def test_secret_file_must_be_a_path(path: Any) -> None:
    message = error_of(_caller_token({"file": path}))
    assert_error(message, "auth.callers[0].token.file", "must be a file path")


@pytest.mark.parametrize("env", [ENV, {**ENV, "KR_MISSING": ""}])
def test_secret_env_missing_or_empty(env: dict[str, str]) -> None:
    message = error_of(_caller_token({"env": "KR_MISSING"}), env)
    assert_error(message, "auth.callers[0].token", "environment variable KR_MISSING")
    assert "not set or empty" in message


def test_secret_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    message = error_of(_caller_token({"file": str(path)}), read_file=read_text_file)
    assert_error(message, "auth.callers[0].token", f"cannot read {str(path)!r}")
    assert "No such file or directory" in message


def test_secret_file_is_a_directory(tmp_path: Path) -> None:
    message = error_of(_caller_token({"file": str(tmp_path)}), read_file=read_text_file)
    assert_error(message, "auth.callers[0].token", "cannot read")


@pytest.mark.parametrize("content", ["", "\n", "\r\n", "\n\n"])
def test_secret_file_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content, encoding="utf-8", newline="")
    message = error_of(_caller_token({"file": str(path)}), read_file=read_text_file)
    assert_error(message, "auth.callers[0].token", "is empty")


def test_secret_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"\xff\xfe" + b"x" * 30)
    message = error_of(_caller_token({"file": str(path)}), read_file=read_text_file)
    assert_error(message, "auth.callers[0].token", "not UTF-8")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (ADMIN_TOKEN, ADMIN_TOKEN),
        (ADMIN_TOKEN + "\n", ADMIN_TOKEN),
        (ADMIN_TOKEN + "\r\n", ADMIN_TOKEN),
        (ADMIN_TOKEN + "\n\n", ADMIN_TOKEN),
        # Only the trailing newline goes: other whitespace is part of the secret.
        (" " + ADMIN_TOKEN + " \n", " " + ADMIN_TOKEN + " "),
    ],
)
def test_secret_file_trailing_newline_is_stripped(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "token"
    path.write_text(content, encoding="utf-8", newline="")
    config = parse(_caller_token({"file": str(path)}), read_file=read_text_file)
    assert config.callers[0].token == expected


# --- unknown keys ----------------------------------------------------------------------


def _unknown_at_root() -> dict[str, Any]:
    data = minimal()
    data["gateway_typo"] = {}
    return data


def _unknown_in_auth() -> dict[str, Any]:
    data = minimal()
    data["auth"]["skew"] = 10
    return data


def _unknown_in_caller() -> dict[str, Any]:
    data = minimal()
    data["auth"]["callers"].append(
        {"role": "gateway", "token": {"env": "KR_GATEWAY"}, "name": "gw"}
    )
    return data


def _unknown_in_tls() -> dict[str, Any]:
    data = minimal()
    data["auth"]["tls"] = {"cert_file": "/c", "key_file": "/k", "ca_file": "/ca"}
    return data


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (_unknown_at_root(), "gateway_typo"),
        (_unknown_in_auth(), "auth.skew"),
        (
            with_provider(client_secrets={"env": "KR_CLIENT_SECRET"}),
            "providers.testidp.client_secrets",
        ),
        (with_provider(scope=["openid"]), "providers.testidp.scope"),
        (_unknown_in_caller(), "auth.callers[1].name"),
        (_unknown_in_tls(), "auth.tls.ca_file"),
    ],
)
def test_unknown_keys_are_rejected(data: dict[str, Any], key: str) -> None:
    assert_error(error_of(data), key, "unknown key")


# --- wrong types and ranges ------------------------------------------------------------


def _auth(**values: Any) -> dict[str, Any]:
    data = minimal()
    data["auth"].update(values)
    return data


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("skew_seconds", "soon", "must be a number >= 0, got 'soon'"),
        ("skew_seconds", "30", "must be a number >= 0, got '30'"),
        ("skew_seconds", True, "must be a number >= 0, got True"),
        ("skew_seconds", False, "must be a number >= 0, got False"),
        ("skew_seconds", -1, "must be a number >= 0, got -1"),
        ("skew_seconds", -0.5, "must be a number >= 0"),
        ("skew_seconds", float("nan"), "must be a number >= 0, got nan"),
        ("skew_seconds", float("inf"), "must be a number >= 0, got inf"),
        ("skew_seconds", [30], "must be a number"),
        ("lock_ttl_seconds", 0, "must be a number >= 0.1, got 0"),
        ("lock_ttl_seconds", float("inf"), "must be a number >= 0.1"),
        ("refresh_deadline_seconds", 0.05, "must be a number >= 0.1"),
        ("token_timeout_seconds", -3, "must be a number >= 0.1"),
        ("wait_for_refresh_seconds", "forever", "must be a number >= 0.1"),
        ("flow_ttl_seconds", 9, "must be a number >= 10, got 9"),
        ("flow_ttl_seconds", float("nan"), "must be a number >= 10"),
        ("refresh_backoff_base_seconds", 0, "must be a number >= 0.01"),
        ("refresh_backoff_cap_seconds", "1m", "must be a number >= 0.01"),
        ("events_maxlen", 99, "must be an integer >= 100, got 99"),
        ("events_maxlen", 1000.0, "must be an integer >= 100, got 1000.0"),
        ("events_maxlen", True, "must be an integer >= 100, got True"),
        ("events_maxlen", "1000", "must be an integer >= 100"),
        ("events_maxlen", -1000, "must be an integer >= 100"),
        ("listen", 50051, "must be a non-empty string, got 50051"),
        ("listen", "", "must be a non-empty string, got ''"),
        ("key_prefix", "", "must be a non-empty string"),
        ("events_stream", ["x"], "must be a non-empty string"),
        ("redis_url", True, "must be a non-empty string"),
        ("log_level", 1, "must be a non-empty string"),
    ],
)
def test_wrong_types_and_ranges(key: str, value: Any, problem: str) -> None:
    assert_error(error_of(_auth(**{key: value})), f"auth.{key}", problem)


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"auth": "x"}, "auth", "must be a table"),
        ({**minimal(), "providers": ["x"]}, "providers", "must be a table"),
        ({**minimal(), "providers": {PROVIDER: "x"}}, f"providers.{PROVIDER}", "must be a table"),
        (_auth(callers={"role": "admin"}), "auth.callers", "must be an array of tables"),
        (_auth(callers=["admin"]), "auth.callers[0]", "must be a table"),
        (_auth(tls="on"), "auth.tls", "must be a table"),
        (_auth(tls={"cert_file": "/c"}), "auth.tls.key_file", "required"),
        (_auth(tls={"key_file": "/k"}), "auth.tls.cert_file", "required"),
        (_auth(tls={"cert_file": "/c", "key_file": ""}), "auth.tls.key_file", "non-empty"),
        (
            _auth(tls={"cert_file": "/c", "key_file": "/k", "client_ca_file": 1}),
            "auth.tls.client_ca_file",
            "non-empty string",
        ),
    ],
)
def test_wrong_table_shapes(data: dict[str, Any], key: str, problem: str) -> None:
    assert_error(error_of(data), key, problem)


def test_token_timeout_must_not_exceed_the_refresh_deadline() -> None:
    message = error_of(_auth(token_timeout_seconds=31))
    assert_error(message, "auth.token_timeout_seconds", "auth.refresh_deadline_seconds")
    message = error_of(_auth(token_timeout_seconds=5, refresh_deadline_seconds=4.5))
    assert_error(message, "auth.token_timeout_seconds", "must not exceed")


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "WARNING", "Error"])
def test_log_levels(level: str) -> None:
    assert parse(_auth(log_level=level)).log_level == level.lower()


@pytest.mark.parametrize("level", ["verbose", "warn", "critical", "trace"])
def test_bad_log_level(level: str) -> None:
    message = error_of(_auth(log_level=level))
    assert_error(message, "auth.log_level", "must be one of debug, info, warning, error")


# --- redis -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@redis:6379",
        "rediss://redis.example:6380/1",
        "unix:///var/run/redis.sock",
        "redis+sentinel://s1:26379,s2:26379/mymaster",
        "rediss+sentinel://:pw@s1,s2,s3/mymaster/2?sentinel_password=sp",
    ],
)
def test_redis_url_schemes_accepted(url: str) -> None:
    assert parse(_auth(redis_url=url)).redis_url == url


@pytest.mark.parametrize(
    "url",
    ["http://redis:6379", "https://redis:6379", "redis.internal:6379", "tcp://redis:6379", "x"],
)
def test_redis_url_schemes_rejected(url: str) -> None:
    message = error_of(_auth(redis_url=url))
    assert_error(
        message,
        "auth.redis_url",
        "must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL",
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel:///m", "no sentinel host"),
        ("redis+sentinel://s1:x/m", "sentinel host 1 ('s1:x'): the port must be a number"),
        ("redis+sentinel://s1", "the service name is missing"),
        ("redis+sentinel://s1/m/x", "db 'x'"),
        ("redis+sentinel://s1/m?ssl=true", "unknown query parameter 'ssl'"),
    ],
)
def test_malformed_sentinel_urls_name_the_key(url: str, problem: str) -> None:
    assert_error(error_of(_auth(redis_url=url)), "auth.redis_url", problem)


def test_redis_url_from_a_secret() -> None:
    config = parse(_auth(redis_url_secret={"env": "KR_REDIS_URL"}))
    assert config.redis_url == ENV["KR_REDIS_URL"]


def test_redis_url_secret_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "redis-url"
    path.write_text(f"redis://:{REDIS_PASSWORD}@r:6379/0\n", encoding="utf-8")
    config = parse(_auth(redis_url_secret={"file": str(path)}), read_file=read_text_file)
    assert config.redis_url == f"redis://:{REDIS_PASSWORD}@r:6379/0"


def test_redis_url_secret_with_a_bad_scheme_names_the_secret_without_its_value() -> None:
    env = {**ENV, "KR_REDIS_URL": f"http://:{REDIS_PASSWORD}@redis:6379"}
    message = error_of(_auth(redis_url_secret={"env": "KR_REDIS_URL"}), env)
    assert_error(message, "auth.redis_url_secret", "redis://, rediss://, unix://")
    assert REDIS_PASSWORD not in message


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinel://:{REDIS_PASSWORD}@s1:bad/m",
        f"redis+sentinel://:{REDIS_PASSWORD}@s1/m/x",
        f"redis+sentinel://s1/m?sentinel_password={REDIS_PASSWORD}&extra=1",
        f"redis+sentinel://:{REDIS_PASSWORD}/unencoded@s1/m",
    ],
)
def test_a_malformed_sentinel_url_secret_is_named_without_its_password(url: str) -> None:
    message = error_of(
        _auth(redis_url_secret={"env": "KR_REDIS_URL"}), {**ENV, "KR_REDIS_URL": url}
    )
    assert message.startswith("auth.redis_url_secret: "), message
    assert REDIS_PASSWORD not in message


def test_redis_url_secret_missing_variable() -> None:
    message = error_of(_auth(redis_url_secret={"env": "KR_NOPE"}))
    assert_error(message, "auth.redis_url_secret", "KR_NOPE is not set")


def test_redis_url_and_its_secret_together_are_ambiguous() -> None:
    data = _auth(redis_url="redis://a:6379", redis_url_secret={"env": "KR_REDIS_URL"})
    message = error_of(data)
    assert_error(message, "auth.redis_url", "not both")


# --- [auth.web] ------------------------------------------------------------------------


def test_an_empty_web_section_enables_the_http_side_on_loopback() -> None:
    web = parse(_auth(web={})).web
    assert web is not None
    assert web.listen == "127.0.0.1:8081"
    assert web.public_url == "http://127.0.0.1:8081"
    assert web.callback_uri == "http://127.0.0.1:8081/callback"
    assert web.session_ttl_seconds == 8 * 3600.0
    assert not web.secure_cookies


@pytest.mark.parametrize(
    ("listen", "public_url"),
    [
        ("0.0.0.0:8081", None),  # what browsers use cannot be known from a wildcard address
        ("10.0.0.5:8081", None),
        ("127.0.0.1:0", None),  # a port picked at start is not in any provider's list
        ("localhost:9000", "http://localhost:9000"),
        ("[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_public_url_defaults_only_for_a_fixed_loopback_address(
    listen: str, public_url: str | None
) -> None:
    web = parse(_auth(web={"listen": listen})).web
    assert web is not None
    assert web.public_url == public_url
    assert web.callback_uri == (f"{public_url}/callback" if public_url else None)


def test_public_url_https_turns_on_secure_cookies_and_loses_its_slash() -> None:
    data = _auth(
        web={
            "listen": "0.0.0.0:8081",
            "public_url": "https://keyrelay.example.com/",
            "session_ttl_seconds": 600,
        }
    )
    web = parse(data).web
    assert web is not None
    assert web.public_url == "https://keyrelay.example.com"
    assert web.callback_uri == "https://keyrelay.example.com/callback"
    assert web.session_ttl_seconds == 600.0
    assert web.secure_cookies


@pytest.mark.parametrize(
    ("web", "key", "problem"),
    [
        ("on", "auth.web", "must be a table"),
        ({"listen": 8081}, "auth.web.listen", "must be a non-empty string, got 8081"),
        ({"listen": ""}, "auth.web.listen", "must be a non-empty string"),
        ({"listen": "8081"}, "auth.web.listen", "must be host:port"),
        ({"listen": ":8081"}, "auth.web.listen", "must be host:port"),
        ({"listen": "localhost"}, "auth.web.listen", "must be host:port"),
        ({"listen": "127.0.0.1:http"}, "auth.web.listen", "must be host:port"),
        ({"listen": "127.0.0.1:70000"}, "auth.web.listen", "must be host:port"),
        ({"listen": "127.0.0.1:-1"}, "auth.web.listen", "must be host:port"),
        ({"public_url": "keyrelay.example"}, "auth.web.public_url", "must be an http(s) URL"),
        ({"public_url": "ftp://keyrelay.example"}, "auth.web.public_url", "http(s) URL"),
        ({"public_url": 1}, "auth.web.public_url", "must be a non-empty string"),
        ({"public_url": "https://k.example/keyrelay"}, "auth.web.public_url", "without a path"),
        ({"public_url": "https://k.example/?x=1"}, "auth.web.public_url", "without a path"),
        ({"public_url": "https://k.example/#top"}, "auth.web.public_url", "without a path"),
        ({"session_ttl_seconds": 59}, "auth.web.session_ttl_seconds", "must be a number >= 60"),
        ({"session_ttl_seconds": "8h"}, "auth.web.session_ttl_seconds", "must be a number"),
        ({"listen": "127.0.0.1:8081", "port": 8081}, "auth.web.port", "unknown key"),
    ],
)
def test_malformed_web_section(web: Any, key: str, problem: str) -> None:
    assert_error(error_of(_auth(web=web)), key, problem)


# --- providers -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Upper", "with space", "-lead", "_lead", "a" * 64, "", "é"])
def test_bad_provider_names(name: str) -> None:
    data = minimal()
    data["providers"] = {name: provider()}
    assert_error(error_of(data), f"providers.{name}", "provider names are [a-z0-9_-]")


@pytest.mark.parametrize("name", ["a", "0", "idp-1_x", "a" * 63])
def test_good_provider_names(name: str) -> None:
    data = minimal()
    data["providers"] = {name: provider()}
    assert parse(data).providers[name].name == name


@pytest.mark.parametrize("key", ["authorize_url", "token_url", "client_id"])
def test_provider_required_keys(key: str) -> None:
    data = with_provider()
    del data["providers"][PROVIDER][key]
    assert_error(error_of(data), f"providers.{PROVIDER}.{key}", "required")


@pytest.mark.parametrize("key", ["authorize_url", "token_url", "revoke_url", "redirect_uris"])
@pytest.mark.parametrize(
    "url",
    [
        "ftp://idp.example/x",
        "javascript:alert(1)",
        "idp.example/authorize",
        "https://",
        "file:///etc/passwd",
        "//idp.example/x",
    ],
)
def test_provider_urls_must_be_http(key: str, url: str) -> None:
    value: Any = [url] if key == "redirect_uris" else url
    message = error_of(with_provider(**{key: value}))
    assert_error(message, f"providers.{PROVIDER}.{key}", "must be an http(s) URL")
    assert repr(url) in message


def test_one_bad_redirect_uri_among_good_ones() -> None:
    data = with_provider(redirect_uris=["http://127.0.0.1:8765/cb", "mailto:x@example.com"])
    assert_error(error_of(data), f"providers.{PROVIDER}.redirect_uris", "'mailto:x@example.com'")


@pytest.mark.parametrize("value", [[], None])
def test_provider_needs_a_redirect_uri(value: Any) -> None:
    data = with_provider()
    if value is None:
        del data["providers"][PROVIDER]["redirect_uris"]
    else:
        data["providers"][PROVIDER]["redirect_uris"] = value
    message = error_of(data)
    assert_error(message, f"providers.{PROVIDER}.redirect_uris", "at least one redirect URI")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redirect_uris", "http://127.0.0.1/cb"),
        ("redirect_uris", [""]),
        ("redirect_uris", [1]),
        ("scopes", "openid"),
        ("scopes", ["openid", ""]),
        ("scopes", [None]),
    ],
)
def test_provider_string_lists(key: str, value: Any) -> None:
    message = error_of(with_provider(**{key: value}))
    assert_error(message, f"providers.{PROVIDER}.{key}", "must be a list of non-empty strings")


@pytest.mark.parametrize("key", ["client_id", "revoke_url", "authorize_url"])
@pytest.mark.parametrize("value", ["", 1, ["x"]])
def test_provider_strings_must_be_non_empty_strings(key: str, value: Any) -> None:
    message = error_of(with_provider(**{key: value}))
    assert_error(message, f"providers.{PROVIDER}.{key}", "must be a non-empty string")


@pytest.mark.parametrize("param", sorted(RESERVED_AUTHORIZE_PARAMS))
def test_reserved_authorize_params_are_rejected(param: str) -> None:
    message = error_of(with_provider(authorize_params={"prompt": "consent", param: "x"}))
    assert_error(
        message, f"providers.{PROVIDER}.authorize_params.{param}", "set by keyrelay itself"
    )


def test_reserved_params_include_the_pkce_and_state_ones() -> None:
    assert {"state", "code_challenge", "code_challenge_method", "redirect_uri"} <= (
        RESERVED_AUTHORIZE_PARAMS
    )


@pytest.mark.parametrize("value", [1, True, ["a"], {"a": "b"}])
def test_authorize_param_values_must_be_strings(value: Any) -> None:
    message = error_of(with_provider(authorize_params={"prompt": value}))
    assert_error(message, f"providers.{PROVIDER}.authorize_params.prompt", "must be a string")


def test_authorize_params_must_be_a_table() -> None:
    message = error_of(with_provider(authorize_params=["prompt=consent"]))
    assert_error(message, f"providers.{PROVIDER}.authorize_params", "must be a table")


@pytest.mark.parametrize(
    ("method", "problem"),
    [
        ("private_key_jwt", "must be one of none, client_secret_basic, client_secret_post"),
        ("basic", "must be one of none, client_secret_basic, client_secret_post"),
        ("NONE", "must be one of none, client_secret_basic, client_secret_post"),
        ("", "must be a non-empty string"),
        (1, "must be a non-empty string"),
    ],
)
def test_unknown_token_auth_method(method: Any, problem: str) -> None:
    data = with_provider(token_auth_method=method, client_secret={"env": "KR_CLIENT_SECRET"})
    assert_error(error_of(data), f"providers.{PROVIDER}.token_auth_method", problem)


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_secret_methods_need_a_secret(method: str) -> None:
    message = error_of(with_provider(token_auth_method=method))
    assert_error(message, f"providers.{PROVIDER}.client_secret", f"required by {method}")


def test_default_auth_method_without_a_secret_is_none() -> None:
    p = parse(with_provider()).providers[PROVIDER]
    assert (p.token_auth_method, p.client_secret) == ("none", None)


def test_default_auth_method_with_a_secret_is_basic() -> None:
    data = with_provider(client_secret={"env": "KR_CLIENT_SECRET"})
    p = parse(data).providers[PROVIDER]
    assert (p.token_auth_method, p.client_secret) == ("client_secret_basic", CLIENT_SECRET)


def test_explicit_post_with_a_secret_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "client-secret"
    path.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    data = with_provider(token_auth_method="client_secret_post", client_secret={"file": str(path)})
    p = parse(data, read_file=read_text_file).providers[PROVIDER]
    assert (p.token_auth_method, p.client_secret) == ("client_secret_post", CLIENT_SECRET)


def test_client_secret_env_missing() -> None:
    message = error_of(with_provider(client_secret={"env": "KR_NOT_THERE"}))
    assert_error(message, f"providers.{PROVIDER}.client_secret", "KR_NOT_THERE is not set")


# --- callers ---------------------------------------------------------------------------


@pytest.mark.parametrize("callers", [None, []])
def test_at_least_one_caller(callers: Any) -> None:
    data = minimal()
    if callers is None:
        del data["auth"]["callers"]
    else:
        data["auth"]["callers"] = callers
    message = error_of(data)
    assert_error(message, "auth.callers", "at least one [[auth.callers]] entry is required")


def test_no_auth_table_at_all() -> None:
    assert_error(error_of({}), "auth.callers", "at least one")


@pytest.mark.parametrize("role", ["root", "Admin", "GATEWAY", "reader"])
def test_unknown_role(role: str) -> None:
    data = minimal()
    data["auth"]["callers"][0]["role"] = role
    assert_error(error_of(data), "auth.callers[0].role", "must be one of gateway, admin")


def test_role_and_token_are_required() -> None:
    data = minimal()
    del data["auth"]["callers"][0]["role"]
    assert_error(error_of(data), "auth.callers[0].role", "required")
    data = minimal()
    del data["auth"]["callers"][0]["token"]
    assert_error(error_of(data), "auth.callers[0].token", "required")


def test_short_caller_token() -> None:
    short = "a" * 15
    message = error_of(_caller_token({"env": "SHORT"}), {**ENV, "SHORT": short})
    assert_error(message, "auth.callers[0].token", "at least 16 characters")
    assert short not in message


def test_sixteen_character_token_is_enough() -> None:
    config = parse(_caller_token({"env": "OK"}), {**ENV, "OK": "b" * 16})
    assert config.callers[0].token == "b" * 16


def test_errors_name_the_index_of_the_bad_caller() -> None:
    data = minimal()
    data["auth"]["callers"].append({"role": "gateway", "token": {"env": "KR_MISSING"}})
    assert_error(error_of(data), "auth.callers[1].token", "KR_MISSING")


# --- load_toml / load_auth_config ------------------------------------------------------


def test_load_toml_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=re.escape(f"config file {str(path)!r} does not exist")):
        load_toml(str(path))


@pytest.mark.parametrize("text", ["[auth\n", "auth = \n", "a = 1\na = 2\n", "x = 'unterminated\n"])
def test_load_toml_invalid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_toml(str(path))
    assert str(path) in str(info.value)


def test_load_toml_valid(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[auth]\nskew_seconds = 12\n[providers.x]\nclient_id = "c"\n', "utf-8")
    assert load_toml(str(path)) == {
        "auth": {"skew_seconds": 12},
        "providers": {"x": {"client_id": "c"}},
    }


def test_load_auth_config_end_to_end(tmp_path: Path) -> None:
    token_file = tmp_path / "gateway-token"
    token_file.write_text(GATEWAY_TOKEN + "\n", encoding="utf-8")
    path = tmp_path / "auth.toml"
    path.write_text(
        f"""
[auth]
listen = "127.0.0.1:0"
skew_seconds = 15

[[auth.callers]]
role = "admin"
token = {{ env = "KR_ADMIN" }}

[[auth.callers]]
role = "gateway"
token = {{ file = "{token_file}" }}

[providers.{PROVIDER}]
authorize_url = "https://idp.example/authorize"
token_url = "https://idp.example/token"
client_id = "keyrelay-test"
redirect_uris = ["http://127.0.0.1:8765/callback"]
authorize_params = {{ prompt = "consent" }}
""",
        encoding="utf-8",
    )
    config = load_auth_config(str(path), ENV)
    assert config.skew_seconds == 15.0
    assert [c.token for c in config.callers] == [ADMIN_TOKEN, GATEWAY_TOKEN]
    assert config.providers[PROVIDER].authorize_params == (("prompt", "consent"),)


def test_load_auth_config_toml_nan_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(
        '[auth]\nskew_seconds = nan\n[[auth.callers]]\nrole = "admin"\n'
        'token = { env = "KR_ADMIN" }\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_auth_config(str(path), ENV)
    assert str(caught.value).startswith(f"{path}: auth.skew_seconds: must be a number")


def test_parsing_does_not_mutate_its_input() -> None:
    data = full()
    before = copy.deepcopy(data)
    parse(data, FULL_ENV)
    assert data == before
