"""Both ``serve`` verbs set the configured ``log_level`` before their service starts."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from keyrelay import cli
from keyrelay.auth.config import AuthConfig
from keyrelay.auth.rpc import server as auth_server
from keyrelay.gateway import server as gateway_server
from keyrelay.gateway.config import GatewayConfig

TOKEN = "service-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRELAY_ENCRYPTION_KEYS", "k1:" + base64.b64encode(bytes(32)).decode())
    monkeypatch.setenv("KR_TOKEN", TOKEN)


def write(path: Path, data: dict[str, object]) -> str:
    path.write_bytes(tomli_w.dumps(data).encode())
    return str(path)


@pytest.mark.parametrize("level", ["debug", "warning", "error"])
def test_auth_serve_uses_the_configured_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    seen: list[int] = []

    async def serve(config: AuthConfig) -> None:
        seen.append(logging.getLogger().level)

    monkeypatch.setattr(auth_server, "serve", serve)
    config = write(
        tmp_path / "auth.toml",
        {
            "auth": {
                "log_level": level.upper(),  # case does not matter
                "callers": [{"role": "gateway", "token": {"env": "KR_TOKEN"}}],
            }
        },
    )
    assert cli.main(["auth", "serve", "--config", config]) == 0
    assert seen == [logging.getLevelName(level.upper())]


@pytest.mark.parametrize("level", ["debug", "info", "warning"])
def test_gateway_serve_uses_the_configured_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    seen: list[int] = []

    def serve(config: GatewayConfig) -> None:
        seen.append(logging.getLogger().level)

    monkeypatch.setattr(gateway_server, "serve", serve)
    config = write(
        tmp_path / "gateway.toml",
        {
            "gateway": {
                "log_level": level,
                "auth": {"target": "ipv4:127.0.0.1:9", "token": {"env": "KR_TOKEN"}},
            },
            "upstreams": {"default": {"url": "http://127.0.0.1:9"}},
        },
    )
    assert cli.main(["gateway", "serve", "--config", config]) == 0
    assert seen == [logging.getLevelName(level.upper())]


def test_an_unknown_level_stops_the_service_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(
        tmp_path / "gateway.toml",
        {"gateway": {"log_level": "verbose"}, "upstreams": {"default": {"url": "http://x.io"}}},
    )
    assert cli.main(["gateway", "serve", "--config", config]) == 1
    assert (
        "gateway.log_level: must be one of debug, info, warning, error" in capsys.readouterr().err
    )
