"""``keyrelay dev`` brings the local stack up, reuses its secrets, and stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from keyrelay.auth.config import load_auth_config
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.dev import DevStack
from tests.support.redis_server import RedisServer, free_port


def start_dev(
    state_dir: Path, port: int, gateway_port: int, web_port: int
) -> tuple[subprocess.Popen[str], str]:
    """Starts ``keyrelay dev``; returns the process and what it printed until it was up."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyrelay",
            "dev",
            "--state-dir",
            str(state_dir),
            "--auth-port",
            str(port),
            "--gateway-port",
            str(gateway_port),
            "--web-port",
            str(web_port),
            "--account",
            "devacct",
            "--upstream",
            "http://127.0.0.1:9",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    printed = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, f"keyrelay dev exited: {process.stderr.read() if process.stderr else ''}"
        printed += line
        if "Ctrl-C stops everything" in line:
            return process, printed
    raise AssertionError("keyrelay dev never reported that it is running")


def list_accounts(port: int, token: str) -> auth_pb2.ListAccountsResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: auth_pb2.ListAccountsResponse = auth_pb2_grpc.AuthServiceStub(channel).ListAccounts(
            auth_pb2.ListAccountsRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
        return reply


def stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=30)
    if process.stdout:
        process.stdout.close()
    if process.stderr:
        process.stderr.close()
    return code


def test_dev_stack_starts_reuses_secrets_and_stops(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port, gateway_port, web_port = free_port(), free_port(), free_port()
    gateway = f"http://127.0.0.1:{gateway_port}"
    web = f"http://127.0.0.1:{web_port}"
    process, printed = start_dev(state, port, gateway_port, web_port)
    try:
        assert f"web connect page     {web}/" in printed
        # The auth service's web side is up: probes, and the login page.
        assert httpx.get(f"{web}/healthz", timeout=10).text == "ok\n"
        login = httpx.get(f"{web}/", timeout=10, follow_redirects=True)
        assert (login.status_code, login.url.path) == (200, "/login")
        assert "Admin token" in login.text
        secrets_dir = state / "secrets"
        token = (secrets_dir / "admin_token").read_text().strip()
        key = (secrets_dir / "gateway_key").read_text().strip()
        for name in ("admin_token", "gateway_token", "gateway_key", "encryption_keys"):
            assert stat.S_IMODE((secrets_dir / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert list(list_accounts(port, token).accounts) == []
        # The gateway is up, reaches the auth service, and knows its key.
        assert httpx.get(f"{gateway}/readyz", timeout=10).status_code == 200
        response = httpx.post(
            f"{gateway}/v1/messages",
            json={"model": "m", "max_tokens": 1, "messages": []},
            headers={"x-api-key": key},
            timeout=10,
        )
        assert response.status_code == 401
        assert "keyrelay connect devacct" in response.json()["error"]["message"]
    finally:
        assert stop(process) == 0
    # Stopped means stopped: nothing listens any more.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            raise AssertionError("the auth service still listens after Ctrl-C")
        except grpc.FutureTimeoutError:
            pass
    try:
        httpx.get(f"{gateway}/healthz", timeout=1)
        raise AssertionError("the gateway still listens after Ctrl-C")
    except httpx.ConnectError:
        pass

    again, _ = start_dev(state, port, gateway_port, web_port)
    try:
        assert (state / "secrets" / "admin_token").read_text().strip() == token
        assert (state / "secrets" / "gateway_key").read_text().strip() == key
        assert list(list_accounts(port, token).accounts) == []
    finally:
        assert stop(again) == 0


def dev_once(state_dir: Path, **ports: int) -> subprocess.CompletedProcess[str]:
    """``keyrelay dev`` expected to refuse to start; every port free unless given."""
    args = [sys.executable, "-m", "keyrelay", "dev", "--state-dir", str(state_dir)]
    for flag in ("auth_port", "gateway_port", "web_port"):
        args += ["--" + flag.replace("_", "-"), str(ports.get(flag) or free_port())]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_dev_with_a_broken_providers_file_names_the_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "providers.toml").write_text('[providers.x]\nauthorize_url = "ftp://nope"\n')
    result = dev_once(state)
    assert result.returncode == 1
    assert "providers.x." in result.stderr
    assert "Traceback" not in result.stderr


def test_dev_config_enables_the_web_side_and_allows_its_callback(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)  # no Redis of its own
    state = tmp_path / "state"
    state.mkdir()
    (state / "providers.toml").write_text(
        "[providers.idp]\n"
        'authorize_url = "https://idp.example/authorize"\n'
        'token_url = "https://idp.example/token"\n'
        'client_id = "keyrelay-dev"\n'
        'redirect_uris = ["http://127.0.0.1:8765/callback"]\n'
    )
    stack = DevStack(state, web_port=18081)
    auth_path, _ = stack.prepare()
    config = load_auth_config(str(auth_path), os.environ)
    assert config.web is not None
    assert config.web.listen == "127.0.0.1:18081"
    assert config.web.callback_uri == "http://127.0.0.1:18081/callback"
    assert config.providers["idp"].redirect_uris == (
        "http://127.0.0.1:8765/callback",
        "http://127.0.0.1:18081/callback",
    )
    # providers.toml, the file the user edits, is left as it was.
    assert "18081" not in (state / "providers.toml").read_text()


def test_dev_refuses_a_port_that_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dev_once(tmp_path / "state", gateway_port=port)
    assert result.returncode == 1
    assert f"port {port} is in use" in result.stderr
    assert "--gateway-port" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was set up


def test_dev_serves_a_second_key_from_routes_toml_and_its_banner_runs_as_printed(
    tmp_path: Path,
) -> None:
    """A key minted by `keys new` and pasted into routes.toml works on the next start;
    the banner says ready, lists the providers, and its commands run as printed."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "providers.toml").write_text(
        "[providers.idp]\n"
        'authorize_url = "https://idp.example/authorize"\n'
        'token_url = "https://idp.example/token"\n'
        'client_id = "keyrelay-dev"\n'
        'redirect_uris = ["http://127.0.0.1:8765/callback"]\n'
    )
    minted = subprocess.run(
        [sys.executable, "-m", "keyrelay", "keys", "new", "--config-entry", "--account", "second"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "routes.toml" in minted  # where the block goes, in dev
    key = next(line.strip() for line in minted.splitlines() if line.strip().startswith("kr-"))
    block = minted[minted.index("[[keys]]") :]
    # With a limit: counted in dev's Redis by the gateway's own ACL user.
    (state / "routes.toml").write_text(block + "limits = { requests_per_minute = 100 }\n")

    port, gateway_port, web_port = free_port(), free_port(), free_port()
    process, printed = start_dev(state, port, gateway_port, web_port)
    try:
        assert "keyrelay dev is ready" in printed
        assert "providers            idp" in printed
        connect_line = next(line for line in printed.splitlines() if " connect devacct " in line)
        assert "--provider idp" in connect_line  # the one provider, named
        program = connect_line.split(" connect ")[0].split()
        helped = subprocess.run(
            [*program, "connect", "--help"], capture_output=True, text=True, timeout=30, check=False
        )
        assert helped.returncode == 0, helped.stderr  # the printed command exists as printed
        response = httpx.post(
            f"http://127.0.0.1:{gateway_port}/v1/messages",
            json={"model": "m", "max_tokens": 1, "messages": []},
            headers={"x-api-key": key},
            timeout=10,
        )
        # The second key is known: its account is simply not connected yet.
        assert response.status_code == 401
        assert "keyrelay connect second" in response.json()["error"]["message"]
        # It was admitted against its limit first (the dev key has none).
        assert response.headers["x-keyrelay-ratelimit-limit"] == "100"
        assert response.headers["x-keyrelay-ratelimit-remaining"] == "99"
        # A runtime key, made by the printed command as printed, is live on the
        # running gateway at once: no restart, no file.
        keys_line = next(line for line in printed.splitlines() if " keys new " in line)
        admin_token = (state / "secrets" / "admin_token").read_text().strip()
        made = subprocess.run(
            keys_line.split(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "KEYRELAY_ADMIN_TOKEN": admin_token},
        )
        assert made.returncode == 0, made.stderr
        runtime_key = next(w for w in made.stdout.split() if w.startswith("kr-"))
        deadline = time.monotonic() + 5
        while True:
            response = httpx.post(
                f"http://127.0.0.1:{gateway_port}/v1/messages",
                json={"model": "m", "max_tokens": 1, "messages": []},
                headers={"x-api-key": runtime_key},
                timeout=10,
            )
            if response.status_code != 401 or time.monotonic() > deadline:
                break
            if "keyrelay connect devacct" in response.text:
                break  # known: routed to the dev account, which is not connected here
            time.sleep(0.05)
        assert "keyrelay connect devacct" in response.json()["error"]["message"]
    finally:
        assert stop(process) == 0


@pytest.mark.parametrize(
    ("file", "text", "expected"),
    [
        ("providers.toml", '[provider.x]\nclient_id = "a"\n', "did you mean 'providers'?"),
        ("providers.toml", "foo = 1\n", "unknown top-level key 'foo'"),
        ("providers.toml", '[auth]\nlisten = "x"\n', "unknown top-level key 'auth'"),
        ("routes.toml", '[[key]]\nname = "a"\n', "did you mean 'keys'?"),
        ("routes.toml", '[[keys]]\nname = "a"\nhash = "nope"\n', "keys[0].hash"),
    ],
)
def test_dev_refuses_a_typo_in_a_file_the_user_edits(
    tmp_path: Path, file: str, text: str, expected: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / file).write_text(text)
    result = dev_once(state)
    assert result.returncode == 1
    assert str(state / file) in result.stderr  # the file is named
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
