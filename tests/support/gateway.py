"""An in-process gateway worker (uvicorn on the test's event loop) and its config factory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import uvicorn

from keyrelay.gateway.config import GatewayConfig, parse_gateway_config
from keyrelay.gateway.http.app import GatewayApp
from keyrelay.gateway.keys import key_hash
from keyrelay.gateway.server import build_app, uvicorn_config
from keyrelay.logs import LineWriter
from keyrelay.tracing import Tracer
from tests.support.redis_server import free_port
from tests.support.stack import GATEWAY_TOKEN, spawn_keyrelay, terminate, wait_for_process

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
        data["gateway"]["auth"] = auth_client_data([auth_port])
    return data


def auth_client_data(auth_ports: Sequence[int]) -> dict[str, Any]:
    """``[gateway.auth]`` for replicas on these loopback ports (round-robin over all)."""
    return {
        "target": "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in auth_ports),
        "token": {"env": "KR_GATEWAY_TOKEN"},
        "timeout_seconds": 10,
    }


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


async def start_gateway(
    config: GatewayConfig, *, tracer: Tracer | None = None, access_writer: LineWriter | None = None
) -> RunningGateway:
    port = free_port()
    app = build_app(config, tracer=tracer, access_writer=access_writer)
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


@dataclass
class GatewayProcess:
    """``keyrelay gateway serve`` in its own process, as in production."""

    config_path: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def write(cls, tmp: Path, name: str, data: dict[str, Any]) -> GatewayProcess:
        """Writes ``data`` (listening on a free port) to ``tmp/<name>.toml``."""
        port = free_port()
        path = tmp / f"{name}.toml"
        config = {**data, "gateway": {**data["gateway"], "listen": f"127.0.0.1:{port}"}}
        path.write_bytes(tomli_w.dumps(config).encode())
        return cls(path, port, tmp / f"{name}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.process = spawn_keyrelay(
            ["gateway", "serve"], self.config_path, self.log_path, gateway_env()
        )

    def wait_ready(self, timeout: float = 20.0) -> GatewayProcess:
        """Until ``/readyz`` answers 200: listening, and an auth replica answers."""
        assert self.process is not None

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_for_process(self.process, self.log_path, "gateway", ready, timeout)
        return self

    def connected_to(self, port: int) -> bool:
        """Whether this process has an established TCP connection to 127.0.0.1:``port``.

        Reads Linux's ``/proc``: the process's socket inodes, then the TCP tables
        (gRPC's sockets are IPv6 ones with the IPv4-mapped address).
        """
        assert self.process is not None
        inodes = set()
        for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # a descriptor closed meanwhile
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target.removeprefix("socket:[").removesuffix("]"))
        loopback = {"tcp": "0100007F", "tcp6": "0000000000000000FFFF00000100007F"}
        for table, address in loopback.items():
            remote = f"{address}:{port:04X}"
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                # rem_address, st (01: ESTABLISHED), inode
                if fields[2] == remote and fields[3] == "01" and fields[9] in inodes:
                    return True
        return False

    def stop(self) -> int | None:
        return None if self.process is None else terminate(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
