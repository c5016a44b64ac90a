"""An in-process gateway worker (uvicorn on the test's event loop) and its config factory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import uvicorn

from keyrelay.config import GatewayConfig, parse_gateway_config
from keyrelay.gateway.http.app import GatewayApp
from keyrelay.gateway.keys import key_hash
from keyrelay.gateway.server import build_app, uvicorn_config
from keyrelay.tracing import Tracer
from tests.support.redis_server import free_port
from tests.support.stack import GATEWAY_TOKEN

OAUTH_KEY = "kr-test-oauth-key-0123456789abcdef"
API_KEY_KEY = "kr-test-apikey-key-0123456789abcdef"
AUTO_KEY = "kr-test-auto-key-0123456789abcdef"
PLAIN_KEY = "kr-test-plain-key-0123456789abcdef"  # oauth, no transforms
UPSTREAM_API_KEY = "sk-upstream-configured-key"
PROFILE: dict[str, Any] = {
    "betas": ["profile-beta-1", "shared-beta"],
    "strip_headers": ["x-strip-me"],
    "set_headers": {"x-set-by-profile": "yes"},
    "query": {"beta": "true"},
    "system_preamble": "You are behind keyrelay.",
    "tool_prefix": "mcp_",
}


def gateway_env() -> dict[str, str]:
    return {"KR_GATEWAY_TOKEN": GATEWAY_TOKEN, "KR_UPSTREAM_KEY": UPSTREAM_API_KEY}


def gateway_config_data(
    upstream_url: str,
    auth_port: int | None,
    *,
    account: str = "acct",
    upstream_read_timeout: float = 5.0,
    **gateway: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gateway": {"listen": "127.0.0.1:0", **gateway},
        "profiles": {"tools": PROFILE},
        "upstreams": {
            "default": {"url": upstream_url, "read_timeout_seconds": upstream_read_timeout}
        },
        "prices": {"claude-test*": {"input": 3.0, "output": 15.0}},
        "keys": [
            {"name": "oauth", "hash": key_hash(OAUTH_KEY), "account": account,
             "mode": "oauth", "profile": "tools"},
            {"name": "apikey", "hash": key_hash(API_KEY_KEY), "mode": "api_key",
             "api_key": {"env": "KR_UPSTREAM_KEY"}, "profile": "tools"},
            {"name": "auto", "hash": key_hash(AUTO_KEY), "account": account, "mode": "auto",
             "api_key": {"env": "KR_UPSTREAM_KEY"}},
            {"name": "plain", "hash": key_hash(PLAIN_KEY), "account": account, "mode": "oauth"},
        ],
    }  # fmt: skip
    if auth_port is not None:
        data["gateway"]["auth"] = {
            "target": f"ipv4:127.0.0.1:{auth_port}",
            "token": {"env": "KR_GATEWAY_TOKEN"},
            "timeout_seconds": 10,
        }
    return data


@dataclass
class RunningGateway:
    app: GatewayApp
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 15)


async def start_gateway(config: GatewayConfig, *, tracer: Tracer | None = None) -> RunningGateway:
    port = free_port()
    app = build_app(config, tracer=tracer)
    server = uvicorn.Server(uvicorn_config(app, f"127.0.0.1:{port}"))
    server.config.timeout_graceful_shutdown = 2
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            return RunningGateway(app, server, task, port)
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    raise RuntimeError("gateway did not start")


def gateway_config(upstream_url: str, auth_port: int | None, **gateway: Any) -> GatewayConfig:
    return parse_gateway_config(
        gateway_config_data(upstream_url, auth_port, **gateway), gateway_env()
    )
