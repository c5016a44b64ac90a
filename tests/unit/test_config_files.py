"""A config file with a mistake stops the service with one message naming the file
and the key, and a likely typo gets a "did you mean" (top level and nested, both
services' files; ``keyrelay dev``'s own files are in tests/integration/test_dev.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from keyrelay.auth.config import load_auth_config
from keyrelay.configfile import ConfigError, close_match
from keyrelay.gateway.config import load_gateway_config

AUTH_ENV = {
    "KR_ADMIN": "admin-token-AAAAAAAAAAAAAAAA",
    "KEYRELAY_ENCRYPTION_KEYS": "k1:" + base64.b64encode(bytes(32)).decode(),
}
AUTH = '[auth]\ncallers = [{ role = "admin", token = { env = "KR_ADMIN" } }]\n'
GATEWAY = (
    '[upstreams.default]\nurl = "http://127.0.0.1:9"\n\n'
    '[[keys]]\nhash = "sha256:' + "ab" * 32 + '"\nmode = "api_key"\n'
    'api_key = { env = "UPSTREAM_KEY" }\n'
)
GATEWAY_ENV = {"UPSTREAM_KEY": "sk-upstream-0123456789"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[provider.x]\nclient_id = 'a'\n", "provider: unknown key; did you mean 'providers'?"),
        ("foo = 1\n", "foo: unknown key"),
        ("[gateway]\nlisten = '127.0.0.1:1'\n", "gateway: unknown key"),
        ("[auth.tracing]\nenabeld = true\n", "auth.tracing.enabeld: unknown key; did you mean"),
    ],
)
def test_auth_file_mistakes_name_the_file_and_key(
    tmp_path: Path, extra: str, expected: str
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(AUTH + extra, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_auth_config(str(path), AUTH_ENV)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_a_nested_typo_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(
        '[auth]\nskew_second = 5\ncallers = [{ role = "admin", token = { env = "KR_ADMIN" } }]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_auth_config(str(path), AUTH_ENV)
    assert str(caught.value) == (
        f"{path}: auth.skew_second: unknown key; did you mean 'skew_seconds'?"
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[[key]]\nname = 'a'\n", "key: unknown key; did you mean 'keys'?"),
        ("[upstream.x]\nurl = 'http://h'\n", "did you mean 'upstreams'?"),
        ("[auth]\nlisten = '127.0.0.1:1'\n", "auth: unknown key"),
    ],
)
def test_gateway_file_mistakes_name_the_file_and_key(
    tmp_path: Path, extra: str, expected: str
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY + extra, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_gateway_config(str(path), GATEWAY_ENV)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_a_valid_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY, encoding="utf-8")
    assert load_gateway_config(str(path), GATEWAY_ENV).routes
    auth = tmp_path / "auth.toml"
    auth.write_text(AUTH, encoding="utf-8")
    assert load_auth_config(str(auth), AUTH_ENV).callers


@pytest.mark.parametrize(
    ("word", "hint"),
    [
        ("providers", "; did you mean 'providers'?"),
        ("provider", "; did you mean 'providers'?"),
        ("upstream", "; did you mean 'upstreams'?"),
        ("zzz", ""),
        ("", ""),
    ],
)
def test_close_match(word: str, hint: str) -> None:
    assert close_match(word, ["providers", "upstreams", "keys"]) == hint
