"""Factories for auth-service configs, in-process servers and replica processes."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import tomli_w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyrelay.auth.config import AuthConfig, parse_auth_config
from keyrelay.auth.v1 import auth_pb2_grpc
from tests.support.oidc import PUBLIC_CLIENT_ID, OidcServer
from tests.support.redis_server import free_port

ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(24)
GATEWAY_TOKEN = "gateway-" + secrets.token_urlsafe(24)
ENCRYPTION_KEYS = "k1:" + base64.b64encode(secrets.token_bytes(32)).decode()
PROVIDER = "testidp"
SCOPES = ("openid", "offline_access")


def admin_md() -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def gateway_md() -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {GATEWAY_TOKEN}"),)


def auth_env() -> dict[str, str]:
    return {
        "KEYRELAY_ENCRYPTION_KEYS": ENCRYPTION_KEYS,
        "KR_ADMIN_TOKEN": ADMIN_TOKEN,
        "KR_GATEWAY_TOKEN": GATEWAY_TOKEN,
    }


def auth_config_data(
    redis_url: str, oidc: OidcServer, *, prefix: str, listen: str = "127.0.0.1:0", **auth: Any
) -> dict[str, Any]:
    return {
        "auth": {
            "listen": listen,
            "redis_url": redis_url,
            "key_prefix": prefix,
            "events_stream": f"{prefix}events",
            "callers": [
                {"role": "admin", "token": {"env": "KR_ADMIN_TOKEN"}},
                {"role": "gateway", "token": {"env": "KR_GATEWAY_TOKEN"}},
            ],
            **auth,
        },
        "providers": {
            PROVIDER: {
                "authorize_url": oidc.authorize_url,
                "token_url": oidc.token_url,
                "revoke_url": oidc.revoke_url,
                "client_id": PUBLIC_CLIENT_ID,
                "scopes": list(SCOPES),
                "redirect_uris": ["http://127.0.0.1:8765/callback"],
                "authorize_params": {"prompt": "consent"},
            }
        },
    }


def auth_config(redis_url: str, oidc: OidcServer, *, prefix: str, **auth: Any) -> AuthConfig:
    return parse_auth_config(auth_config_data(redis_url, oidc, prefix=prefix, **auth), auth_env())


def spawn_keyrelay(
    verb: list[str], config_path: Path, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m keyrelay <verb> --config <path>``, output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "keyrelay", *verb, "--config", str(config_path)],
            env={**os.environ, **auth_env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_for_process(
    process: subprocess.Popen[bytes],
    log_path: Path,
    what: str,
    ready: Callable[[], bool],
    timeout: float,
) -> None:
    """Polls ``ready`` until it holds; fails with the log's tail if the process exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log_path.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} not ready after {timeout:.0f} s: "
                + log_path.read_text(errors="replace")[-3000:]
            )
        time.sleep(0.05)


def terminate(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (after a SIGCONT, in case a test stopped it), SIGKILL after 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@dataclass
class ReplicaProcess:
    """``keyrelay auth serve`` in its own process, as in production."""

    config_path: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ReplicaProcess:
        self.spawn()
        return self.wait_serving(timeout)

    def spawn(self) -> None:
        """Starts the process without waiting (start several, then ``wait_serving`` each)."""
        self.process = spawn_keyrelay(["auth", "serve"], self.config_path, self.log_path)

    def wait_serving(self, timeout: float = 20.0) -> ReplicaProcess:
        assert self.process is not None
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                except grpc.RpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            wait_for_process(self.process, self.log_path, "replica", serving, timeout)
        return self

    def stub(self) -> auth_pb2_grpc.AuthServiceStub:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address)
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return None
        return terminate(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_replica_configs(tmp: Path, count: int, data: Mapping[str, Any]) -> list[ReplicaProcess]:
    replicas = []
    for index in range(count):
        port = free_port()
        replica_data = {**data, "auth": {**data["auth"], "listen": f"127.0.0.1:{port}"}}
        path = tmp / f"auth-{index}.toml"
        path.write_bytes(tomli_w.dumps(replica_data).encode())
        replicas.append(ReplicaProcess(path, port, tmp / f"auth-{index}.log"))
    return replicas
