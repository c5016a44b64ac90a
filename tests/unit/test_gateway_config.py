"""``[gateway] listen``: checked when the config is parsed, not when uvicorn binds."""

from __future__ import annotations

from typing import Any

import pytest

from keyrelay.config import ConfigError, parse_gateway_config
from keyrelay.gateway.server import uvicorn_config

ENV = {"UPSTREAM_KEY": "sk-upstream-0123456789"}


def config_data(**gateway: Any) -> dict[str, Any]:
    return {
        "gateway": gateway,
        "upstreams": {"default": {"url": "http://127.0.0.1:9"}},
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
