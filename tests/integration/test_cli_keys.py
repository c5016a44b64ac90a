"""``keyrelay keys new|list|update|revoke`` against a running auth service (issue 11).

The auth service runs in this test's event loop, so the command runs as an
asyncio subprocess, as a person or a wrapper would run it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from typing import Any

from keyrelay.auth.rpc.server import RunningServer
from tests.support.stack import ADMIN_TOKEN, GATEWAY_TOKEN


async def keyrelay(
    server: RunningServer, *args: str, token: str = ADMIN_TOKEN
) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["KEYRELAY_ADMIN_TOKEN"] = token
    env["KEYRELAY_AUTH_ADDRESS"] = f"127.0.0.1:{server.port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyrelay",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def new_key(server: RunningServer, *args: str) -> dict[str, Any]:
    status, out, err = await keyrelay(server, "keys", "new", "--json", *args)
    assert status == 0, err
    created: dict[str, Any] = json.loads(out)
    return created


async def test_a_key_is_created_shown_once_listed_updated_and_revoked(
    auth_server: RunningServer,
) -> None:
    status, out, err = await keyrelay(
        auth_server, "keys", "new", "--account", "alice", "--name", "ci", "--rpm", "60"
    )
    assert status == 0, err
    secret = next(w for w in out.split() if w.startswith("kr-"))
    key_id = next(w for w in out.split() if w.startswith("gk-"))
    assert "60 req/min" in out

    status, out, err = await keyrelay(auth_server, "keys", "list")
    assert status == 0, err
    header, row = out.splitlines()
    assert header.split()[:3] == ["KEY", "ID", "NAME"]
    assert row.split()[:2] == [key_id, "ci"]
    assert "alice oauth default@default" in row
    assert "60 req/min" in row
    assert row.split()[-1] == "live"
    assert secret not in out  # shown once, at creation only

    status, out, err = await keyrelay(auth_server, "keys", "list", "--json")
    (listed,) = json.loads(out)
    assert listed["key_sha256"] == "sha256:" + hashlib.sha256(secret.encode()).hexdigest()

    status, out, err = await keyrelay(
        auth_server,
        "keys", "update", key_id, "--rpm", "none", "--budget", "5usd/month", "--tpm", "10000",
    )  # fmt: skip
    assert status == 0, err
    assert "10000 tok/min, $5.00/month" in out
    assert "req/min" not in out

    status, out, err = await keyrelay(auth_server, "keys", "revoke", key_id)
    assert status == 0, err
    assert f"{key_id} (ci): revoked" in out
    status, out, _ = await keyrelay(auth_server, "keys", "list")
    assert out.strip() == "no gateway keys on the auth service"
    status, out, _ = await keyrelay(auth_server, "keys", "list", "--all")
    assert out.splitlines()[1].split()[-1] == "revoked"
    # A revoked key stays revoked.
    status, _, err = await keyrelay(auth_server, "keys", "update", key_id, "--name", "again")
    assert status == 1
    assert "FAILED_PRECONDITION" in err


async def test_json_output_and_expiry(auth_server: RunningServer) -> None:
    before = time.time()
    created = await new_key(
        auth_server, "--account", "bob", "--expires", "30d", "--concurrent", "4"
    )
    key = created["key"]
    assert created["secret"].startswith("kr-")
    assert key["name"] == "bob"  # the account by default
    assert key["limits"] == {"concurrent_requests": "4"}
    assert before + 30 * 86400 - 5 <= int(key["expires_at"]) <= time.time() + 30 * 86400
    assert key["status"] == "live"


async def test_bad_input_is_refused_with_what_to_fix(auth_server: RunningServer) -> None:
    cases = [
        (("--rpm", "0"), "requests_per_minute"),  # the service's word on zero
        (("--rpm", "-5"), "--rpm '-5': a whole number above 0"),
        (("--rpm", "ten"), "--rpm 'ten': a whole number above 0"),
        (("--budget", "5eur/month"), "--budget '5eur/month'"),
        (("--budget", "5usd/week"), "the period is day or month"),
        (("--budget", "lots usd/day"), "is not a number"),
        (("--expires", "tomorrow"), "--expires 'tomorrow'"),
        (("--expires", "2001-01-01"), "expires_at"),  # in the past: the service refuses
        (("--name", "no spaces allowed"), "name"),
    ]
    for flags, expected in cases:
        status, out, err = await keyrelay(auth_server, "keys", "new", "--account", "c", *flags)
        assert status == 1, (flags, out)
        assert expected in err, (flags, err)
    status, out, _ = await keyrelay(auth_server, "keys", "list")
    assert out.strip() == "no gateway keys on the auth service"  # nothing half-made


async def test_the_gateway_token_cannot_create_keys(auth_server: RunningServer) -> None:
    status, _, err = await keyrelay(
        auth_server, "keys", "new", "--account", "a", token=GATEWAY_TOKEN
    )
    assert status == 1
    assert "PERMISSION_DENIED" in err


async def test_config_entry_prints_a_block_offline() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["KEYRELAY_AUTH_ADDRESS"] = "127.0.0.1:9"  # nothing listens: not contacted
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keyrelay", "keys", "new", "--account", "a", "--config-entry",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    assert b"[[keys]]" in out
    assert b'account = "a"' in out


async def test_a_key_naming_a_pool(auth_server: RunningServer) -> None:
    """``keys new --pool`` (issue 12): the route column and --json show the pool;
    ``keys update`` moves the key to an account and back."""
    created = await new_key(auth_server, "--pool", "team", "--rpm", "60")
    key = created["key"]
    assert key["name"] == "team"  # the pool by default
    assert key["route"] == {
        "mode": "pool",
        "profile": "default",
        "upstream": "default",
        "pool": "team",
    }
    key_id = key["key_id"]
    status, out, err = await keyrelay(auth_server, "keys", "list")
    assert status == 0, err
    assert "pool team default@default" in out.splitlines()[1]

    status, out, err = await keyrelay(auth_server, "keys", "update", key_id, "--account", "alice")
    assert status == 0, err
    assert "alice oauth default@default" in out
    assert "pool" not in out
    status, out, err = await keyrelay(
        auth_server, "keys", "update", key_id, "--pool", "other", "--json"
    )
    assert status == 0, err
    assert json.loads(out)["route"]["pool"] == "other"
    assert "account_id" not in json.loads(out)["route"]

    status, out, err = await keyrelay(auth_server, "keys", "new", "--pool", "team b", "--name", "x")
    assert status == 1
    assert "INVALID_ARGUMENT: route.pool must be 1-64 characters" in err
