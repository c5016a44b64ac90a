"""``[gateway] listen`` and ``[upstreams.*] url``: checked when the config is parsed,
not when uvicorn binds or the first request goes upstream."""

from __future__ import annotations

from typing import Any

import pytest

from keyrelay.configfile import ConfigError
from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.server import uvicorn_config

ENV = {"UPSTREAM_KEY": "sk-upstream-0123456789"}


def config_data(url: str = "http://127.0.0.1:9", **gateway: Any) -> dict[str, Any]:
    return {
        "gateway": gateway,
        "upstreams": {"default": {"url": url}},
        "keys": [
            {"hash": "sha256:" + "ab" * 32, "mode": "api_key", "api_key": {"env": "UPSTREAM_KEY"}}
        ],
    }


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        (None, "127.0.0.1", 8080),
        ("0.0.0.0:9000", "0.0.0.0", 9000),
        ("[::1]:8443", "::1", 8443),
        ("localhost:0", "localhost", 0),
    ],
)
def test_listen_reaches_uvicorn_as_host_and_port(listen: str | None, host: str, port: int) -> None:
    data = config_data() if listen is None else config_data(listen=listen)
    config = parse_gateway_config(data, ENV)
    server = uvicorn_config(None, config.listen)  # type: ignore[arg-type]  # no app needed
    assert (server.host, server.port) == (host, port)


@pytest.mark.parametrize(
    "listen", ["nonsense", "8080", ":8080", "host:", "host:http", "host:70000", "[::1]"]
)
def test_a_malformed_listen_names_the_key(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^gateway\.listen: must be host:port"):
        parse_gateway_config(config_data(listen=listen), ENV)


@pytest.mark.parametrize(
    "url",
    ["https://api.anthropic.com", "http://127.0.0.1:9/prefix", "http://[::1]:8080", "http://h:0"],
)
def test_upstream_urls_the_client_can_use(url: str) -> None:
    config = parse_gateway_config(config_data(url=url), ENV)
    assert {r.upstream.url for r in config.routes.values()} == {url}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://host:abc", "the port is not a number"),
        ("http://host:70000", "the port is not a number"),
        ("http://:8080", "must be scheme://host"),
        ("https://user:secret@api.example", "without credentials"),
        ("https://api.example/v?beta=1", "without credentials, query"),
        ("https://api.example/#top", "without credentials, query or fragment"),
    ],
)
def test_an_upstream_url_the_client_cannot_use_names_the_key(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^upstreams\.default\.url: ") as caught:
        parse_gateway_config(config_data(url=url), ENV)
    assert why in str(caught.value)
    assert "secret" not in str(caught.value)  # a password in the URL is not echoed
