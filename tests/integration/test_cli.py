"""The people verbs of the ``keyrelay`` command against a running auth service."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.oidc import OidcServer, complete_login
from tests.support.redis_server import RedisServer, free_port
from tests.support.stack import (
    ADMIN_TOKEN,
    ReplicaProcess,
    auth_config_data,
    auth_env,
    write_replica_configs,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loopback_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def loopback_oidc(loopback_port: int) -> Iterator[OidcServer]:
    with OidcServer.start(redirect_uris=(f"http://127.0.0.1:{loopback_port}/callback",)) as server:
        yield server


@pytest.fixture
def replica(
    tmp_path: Path,
    redis_server: RedisServer,
    loopback_oidc: OidcServer,
    loopback_port: int,
    prefix: str,
) -> Iterator[ReplicaProcess]:
    data = auth_config_data(redis_server.url, loopback_oidc, prefix=prefix)
    data["providers"]["testidp"]["redirect_uris"] = [f"http://127.0.0.1:{loopback_port}/callback"]
    (process,) = write_replica_configs(tmp_path, 1, data)
    process.start()
    yield process
    process.stop()


def cli(*args: str, token: str | None = ADMIN_TOKEN) -> subprocess.Popen[str]:
    # As a wrapper runs it: output to a pipe, block-buffered unless connect flushes.
    env = {
        k: v for k, v in os.environ.items() if k not in ("KEYRELAY_ADMIN_TOKEN", "PYTHONUNBUFFERED")
    }
    if token is not None:
        env["KEYRELAY_ADMIN_TOKEN"] = token
    return subprocess.Popen(
        [sys.executable, "-m", "keyrelay", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run(*args: str, token: str | None = ADMIN_TOKEN) -> tuple[int, str, str]:
    process = cli(*args, token=token)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def read_authorize_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.strip().startswith("http"):
            return line.strip()
        assert line, f"connect exited early: {process.stderr.read() if process.stderr else ''}"
    raise AssertionError("no authorize URL printed")


def test_connect_by_pasting_the_redirect(replica: ReplicaProcess) -> None:
    process = cli("connect", "pasted", "--provider", "testidp", "--auth", replica.address)
    redirect = complete_login(read_authorize_url(process), login="cli-paste")
    out, err = process.communicate(redirect + "\n", timeout=60)
    assert process.returncode == 0, err
    assert "pasted: connected to testidp" in out

    code, out, _ = run("accounts", "--auth", replica.address)
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["ACCOUNT", "STATUS", "PROVIDER"]
    assert row.split()[:3] == ["pasted", "connected", "testidp"]

    code, out, _ = run("disconnect", "pasted", "--auth", replica.address)
    assert code == 0
    assert "pasted: disconnected" in out
    code, out, _ = run("accounts", "--auth", replica.address)
    assert out.strip().splitlines()[1].split()[1] == "disconnected"
    assert out.strip().endswith("user")


def test_connect_catches_the_loopback_redirect(replica: ReplicaProcess) -> None:
    process = cli("connect", "caught", "--provider", "testidp", "--auth", replica.address)
    redirect = complete_login(read_authorize_url(process), login="cli-loopback")
    # The browser follows the redirect to the CLI's loopback listener.
    deadline = time.monotonic() + 10
    while True:
        try:
            page = httpx.get(redirect, timeout=5)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "the CLI never listened on the redirect port"
            time.sleep(0.05)
    assert page.status_code == 200
    assert "close this tab" in page.text
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "caught: connected to testidp" in out


def test_cli_errors_are_one_clear_line(replica: ReplicaProcess) -> None:
    code, _, err = run("accounts", "--auth", replica.address, token=None)
    assert code == 1
    assert "KEYRELAY_ADMIN_TOKEN" in err
    code, _, err = run("accounts", "--auth", replica.address, token="wrong-token-0123456789")
    assert code == 1
    assert "UNAUTHENTICATED" in err
    code, _, err = run("connect", "x", "--provider", "nope", "--auth", replica.address)
    assert code == 1
    assert "unknown provider 'nope'" in err
    code, _, err = run("disconnect", "ghost", "--auth", replica.address)
    assert code == 1
    assert "NOT_FOUND" in err
    code, _, err = run("accounts", "--auth", f"127.0.0.1:{free_port()}")
    assert code == 1
    assert "auth service" in err
    for output in (err,):
        assert "Traceback" not in output


@pytest.mark.parametrize(
    "args",
    [
        ("accounts", "--token-file", "/nonexistent/admin-token"),
        ("accounts", "--ca-file", "/nonexistent/ca.crt"),
        ("dev", "--state-dir", "/proc/keyrelay-cannot-live-here"),
    ],
)
def test_bad_paths_on_the_command_line_are_one_clear_line(args: tuple[str, ...]) -> None:
    code, _, err = run(*args, token="some-admin-token-0123456789")
    assert code == 1
    assert err.startswith("keyrelay: /")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_paste_asks_again_and_a_good_one_then_connects(replica: ReplicaProcess) -> None:
    """The flow outlives a paste that is not a code (it is only claimed by a valid one):
    connect says what was wrong, asks again, and the next paste connects."""
    process = cli("connect", "repasted", "--provider", "testidp", "--auth", replica.address)
    assert process.stdin is not None
    assert process.stdout is not None
    redirect = complete_login(read_authorize_url(process), login="cli-repaste")
    process.stdin.write("not a code at all\n")
    process.stdin.flush()
    # Read through a pipe: each line arrives as printed (connect flushes).
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while not any("again" in line for line in seen):
        assert time.monotonic() < deadline, seen
        seen.append(process.stdout.readline())
    assert any("That did not work" in line and "space" in line for line in seen), seen
    out, err = process.communicate(redirect + "\n", timeout=60)
    assert process.returncode == 0, err
    assert "repasted: connected to testidp" in out
    assert "Traceback" not in err


def test_a_used_up_flow_is_not_asked_again(replica: ReplicaProcess) -> None:
    """A code the provider refuses uses the flow up: connect ends with what to do."""
    process = cli("connect", "refused", "--provider", "testidp", "--auth", replica.address)
    read_authorize_url(process)
    _, err = process.communicate("made-up-code-0123456789\n", timeout=60)
    assert process.returncode == 1
    assert "FAILED_PRECONDITION" in err
    assert "start a new flow" in err
    assert "Traceback" not in err


def auth_serve(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyrelay", "auth", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_auth_serve_with_a_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[auth]\nskew_seconds = "soon"\n')
    result = auth_serve(config, {"KEYRELAY_ENCRYPTION_KEYS": ""})
    assert result.returncode == 1
    assert result.stderr.startswith(f"keyrelay: {config}: auth.")  # the file, then the key
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listen", ["taken", "no-such-host.invalid:50051"])
def test_auth_serve_that_cannot_listen_names_the_key(
    tmp_path: Path, redis_server: RedisServer, listen: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}" if listen == "taken" else listen
        config = tmp_path / "auth.toml"
        config.write_text(
            f'[auth]\nlisten = "{address}"\nredis_url = "{redis_server.url}"\n'
            '[[auth.callers]]\nrole = "admin"\ntoken = { env = "KR_ADMIN_TOKEN" }\n'
        )
        result = auth_serve(config, auth_env())
    assert result.returncode == 1
    assert f"keyrelay: auth.listen: cannot listen on '{address}'" in result.stderr
    assert "Traceback" not in result.stderr
