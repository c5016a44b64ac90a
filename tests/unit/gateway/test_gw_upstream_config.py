"""``[upstreams.<name>]``'s pool, keep-alive, TLS and egress proxy keys: defaults,
and every malformed form refused with the key named (and no secret echoed)."""

from __future__ import annotations

from typing import Any

import pytest

from keyrelay.configfile import ConfigError
from keyrelay.gateway.config import UpstreamConfig, parse_gateway_config

ENV = {"UPSTREAM_KEY": "sk-upstream-0123456789", "PROXY_CREDS": "gw:pa:ss"}


def upstream(**keys: Any) -> UpstreamConfig:
    data = {
        "upstreams": {"default": {"url": "https://api.example.com", **keys}},
        "keys": [
            {"hash": "sha256:" + "ab" * 32, "mode": "api_key", "api_key": {"env": "UPSTREAM_KEY"}}
        ],
    }
    files = {"/run/secrets/proxy": "gw:from-file\n"}
    config = parse_gateway_config(data, ENV, read_file=files.__getitem__)
    (route,) = config.routes.values()
    return route.upstream


def test_defaults() -> None:
    config = upstream()
    assert config.pool_timeout_seconds == 5.0
    assert config.max_waiting == 256
    assert config.idle_timeout_seconds == 4.0
    assert config.max_connections == 256
    assert (config.ca_file, config.cert_file, config.key_file) == (None, None, None)
    assert (config.proxy_url, config.proxy_credentials) == (None, None)
    # The parser's defaults are the dataclass's: one place.
    assert config == UpstreamConfig(name="default", url="https://api.example.com")


def test_every_key_is_read() -> None:
    config = upstream(
        pool_timeout_seconds=0.5,
        max_waiting=0,
        idle_timeout_seconds=0,
        ca_file="/etc/ca.pem",
        cert_file="/etc/client.pem",
        key_file="/etc/client-key.pem",
        proxy_url="http://egress.internal:3128/",
        proxy_credentials={"env": "PROXY_CREDS"},
    )
    assert (config.pool_timeout_seconds, config.max_waiting, config.idle_timeout_seconds) == (
        0.5,
        0,
        0.0,
    )
    assert (config.ca_file, config.cert_file, config.key_file) == (
        "/etc/ca.pem",
        "/etc/client.pem",
        "/etc/client-key.pem",
    )
    assert config.proxy_url == "http://egress.internal:3128"
    assert config.proxy_credentials == "gw:pa:ss"
    assert "gw:pa:ss" not in repr(config)


def test_proxy_credentials_from_a_file() -> None:
    config = upstream(
        proxy_url="http://10.0.0.1:3128", proxy_credentials={"file": "/run/secrets/proxy"}
    )
    assert config.proxy_credentials == "gw:from-file"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"pool_timeout_seconds": -1}, r"^upstreams\.default\.pool_timeout_seconds: must be"),
        ({"pool_timeout_seconds": "5s"}, r"^upstreams\.default\.pool_timeout_seconds: must be"),
        ({"max_waiting": -1}, r"^upstreams\.default\.max_waiting: must be an integer >= 0"),
        ({"max_waiting": 1.5}, r"^upstreams\.default\.max_waiting: must be an integer"),
        ({"idle_timeout_seconds": -0.1}, r"^upstreams\.default\.idle_timeout_seconds: must be"),
        ({"key_file": "/k.pem"}, r"^upstreams\.default\.cert_file: required with key_file"),
        ({"ca_file": ""}, r"^upstreams\.default\.ca_file: must be a non-empty string"),
        ({"proxy_url": "https://proxy:3128"}, r"^upstreams\.default\.proxy_url: must be http://"),
        ({"proxy_url": "http://proxy:port"}, r"^upstreams\.default\.proxy_url: must be http://"),
        ({"proxy_url": "http://proxy:3128/path"}, r"^upstreams\.default\.proxy_url: must be"),
        ({"proxy_url": "socks5://proxy:1080"}, r"^upstreams\.default\.proxy_url: must be"),
        ({"proxy_credentials": {"env": "PROXY_CREDS"}},
         r"^upstreams\.default\.proxy_credentials: needs proxy_url"),
        ({"proxy_url": "http://p:1", "proxy_credentials": "gw:inline"},
         r"^upstreams\.default\.proxy_credentials: a secret must be"),
        ({"proxy_url": "http://p:1", "proxy_credentials": {"env": "UPSTREAM_KEY"}},
         r"^upstreams\.default\.proxy_credentials: the secret must be user:password"),
        ({"proxy_url": "http://p:1", "proxy_credentials": {"env": "MISSING"}},
         r"^upstreams\.default\.proxy_credentials: environment variable MISSING is not set"),
        ({"proxy": "http://p:1"}, r"^upstreams\.default\.proxy: unknown key"),
    ],
)  # fmt: skip
def test_malformed_keys_name_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        upstream(**keys)


def test_a_proxy_url_with_a_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match=r"^upstreams\.default\.proxy_url: ") as caught:
        upstream(proxy_url="http://user:hunter2@proxy:3128")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("key", ["ca_file", "cert_file"])
def test_tls_files_only_for_an_https_upstream(key: str) -> None:
    data = {
        "upstreams": {"default": {"url": "http://127.0.0.1:9", key: "/etc/x.pem"}},
        "keys": [
            {"hash": "sha256:" + "ab" * 32, "mode": "api_key", "api_key": {"env": "UPSTREAM_KEY"}}
        ],
    }
    with pytest.raises(ConfigError, match=rf"^upstreams\.default\.{key}: only for an https"):
        parse_gateway_config(data, ENV)
