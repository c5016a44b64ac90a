"""``keyrelay pools --config GATEWAY_TOML`` (``keyrelay.gateway.pool_status``): each
pool's members and their state now, read from a real Redis as the gateway's ACL user
(``limits_store.acl_rules``: ``~<prefix>limits:*`` and its commands, nothing else).

Cool-downs are written as a gateway worker writes them (a ``CoolDowns`` on its own
client, as that ACL user) or directly by the admin; an unreachable store is an error
with exit status 1, quickly, never a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tomli_w

from keyrelay.gateway.config import load_gateway_config
from keyrelay.gateway.cooldowns import CoolDowns, cool_key
from keyrelay.gateway.pool_status import (
    MemberState,
    StoreUnreachable,
    format_pools,
    pools_json,
    read_pools,
)
from keyrelay.gateway.resp_client import RespClient
from tests.support.redis_server import RedisServer, free_port, gateway_user

PREFIX = "poolcli:"
PASSWORD = "gw-pools-secret"
GATEWAY_USER = gateway_user(PREFIX, PASSWORD)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("pools-redis"), acl_user=GATEWAY_USER).start()
    yield server
    server.stop()


@pytest.fixture
def admin(acl_redis: RedisServer) -> Iterator[redis.Redis]:
    with acl_redis.client() as client:
        client.flushall()
        yield client


def config_data(redis_url: str, pool: str = "team") -> dict[str, Any]:
    return {
        "gateway": {
            "auth": {"target": "ipv4:127.0.0.1:9", "token": {"env": "KR_GATEWAY_TOKEN"}},
            "limits": {"redis_url": {"env": "KR_LIMITS_URL"}, "key_prefix": PREFIX},
        },
        "upstreams": {"default": {"url": "http://127.0.0.1:9"}},
        "pools": {
            pool: {
                "members": [
                    {"account": "acct-a"},
                    {"name": "spare", "api_key": {"env": "KR_SPARE_KEY"}},
                    {"account": "acct-b", "mode": "auto", "api_key": {"env": "KR_B_KEY"}},
                ]
            },
            "solo": {"strategy": "round_robin", "members": [{"account": "acct-c"}]},
        },
    }


def env_for(redis_url: str) -> dict[str, str]:
    return {
        "KR_GATEWAY_TOKEN": "gateway-token",
        "KR_LIMITS_URL": redis_url,
        "KR_SPARE_KEY": "sk-spare-0123456789",
        "KR_B_KEY": "sk-b-0123456789",
    }


def write_config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps(config_data(redis_url)))
    return path


async def keyrelay(path: Path, redis_url: str, *args: str) -> tuple[int, str, str, float]:
    """``keyrelay pools --config path *args`` as a person runs it; its exit status,
    output, errors and how long it took (seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(env_for(redis_url))
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keyrelay", "pools", "--config", str(path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode(), time.monotonic() - started


@pytest.fixture
async def worker(acl_redis: RedisServer) -> AsyncIterator[CoolDowns]:
    """A gateway worker's cool-downs of the config's members, as the ACL user."""
    client = RespClient.from_url(acl_redis.acl_url, timeout=1.0)
    cool = CoolDowns(
        client,
        prefix=PREFIX,
        members=[("team", "account:acct-a"), ("team", "key:spare"), ("team", "account:acct-b")],
    )
    yield cool
    await cool.close()
    await client.close()


async def noted(cool: CoolDowns, pool: str, member: str, seconds: float) -> float:
    """``member`` cools ``seconds`` from now, written to Redis; its until."""
    now = time.time()
    until = now + seconds
    cool.note(pool, member, until, now)
    deadline = time.monotonic() + 2
    while cool.writes_pending:
        assert time.monotonic() < deadline, "the note was not written"
        await asyncio.sleep(0.005)
    assert cool.writes == 1
    return round(until * 1000) / 1000


async def test_members_and_their_state_as_a_worker_wrote_it(
    acl_redis: RedisServer, admin: redis.Redis, worker: CoolDowns, tmp_path: Path
) -> None:
    until = await noted(worker, "team", "account:acct-b", 90)
    # One written by hand, as the admin: the shape a worker writes (epoch ms, a TTL).
    admin.set(cool_key(f"{PREFIX}limits:", "solo", "account:acct-c"), b"%d" % 0, px=60_000)
    config = load_gateway_config(
        str(write_config(tmp_path, acl_redis.acl_url)), env_for(acl_redis.acl_url)
    )
    pools = await read_pools(config)
    now = time.time()
    assert [(p.name, p.strategy) for p in pools] == [("team", "affinity"), ("solo", "round_robin")]
    assert pools[0].members == (
        MemberState("account:acct-a", "acct-a", "oauth", "acct-a", None),
        MemberState("key:spare", "spare", "api_key", None, None),
        MemberState("account:acct-b", "acct-b", "auto", "acct-b", until),
    )
    # 0 is in the past: a worker ignores it, so it is available here too.
    assert pools[1].members == (MemberState("account:acct-c", "acct-c", "oauth", "acct-c", None),)

    text = format_pools(pools, now)
    lines = text.splitlines()
    assert lines[0] == "pool team (affinity; 3 members, 1 cooling)"
    assert lines[1].split() == ["MEMBER", "NAME", "MODE", "ACCOUNT", "STATE"]
    assert lines[2].split() == ["account:acct-a", "acct-a", "oauth", "acct-a", "available"]
    assert lines[3].split() == ["key:spare", "spare", "api_key", "-", "available"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    assert lines[4].endswith(f"cooling until {stamp} (90 s)") or lines[4].endswith(
        f"cooling until {stamp} (89 s)"
    ), lines[4]
    assert "pool solo (round_robin; 1 member, 0 cooling)" in text

    (team, _solo) = pools_json(pools, now)
    cooling = team["members"][2]  # type: ignore[index]
    assert cooling["state"] == "cooling"
    assert cooling["cooling_until"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
    assert cooling["seconds_left"] in (89, 90)
    assert team["members"][0]["state"] == "available"  # type: ignore[index]
    assert team["members"][0]["cooling_until"] is None  # type: ignore[index]


async def test_the_command_prints_the_table_and_json(
    acl_redis: RedisServer, admin: redis.Redis, worker: CoolDowns, tmp_path: Path
) -> None:
    await noted(worker, "team", "key:spare", 600)
    path = write_config(tmp_path, acl_redis.acl_url)
    status, out, err, _ = await keyrelay(path, acl_redis.acl_url)
    assert status == 0, err
    (spare,) = [line for line in out.splitlines() if "key:spare" in line]
    assert "cooling until " in spare
    assert spare.endswith((" (600 s)", " (599 s)")), spare
    assert out.count("available") == 3  # acct-a, acct-b, acct-c
    assert PASSWORD not in out + err

    status, out, err, _ = await keyrelay(path, acl_redis.acl_url, "--json")
    assert status == 0, err
    listed = json.loads(out)
    assert [pool["name"] for pool in listed] == ["team", "solo"]
    states = {m["id"]: m["state"] for pool in listed for m in pool["members"]}
    assert states == {
        "account:acct-a": "available",
        "key:spare": "cooling",
        "account:acct-b": "available",
        "account:acct-c": "available",
    }


async def test_a_value_a_worker_would_ignore_is_available(
    acl_redis: RedisServer, admin: redis.Redis, tmp_path: Path
) -> None:
    base = f"{PREFIX}limits:"
    admin.set(cool_key(base, "team", "account:acct-a"), b"soon")
    admin.set(cool_key(base, "team", "key:spare"), b"%d" % ((time.time() + 10 * 86400) * 1000))
    admin.hset(cool_key(base, "team", "account:acct-b"), "x", "1")  # another type
    config = load_gateway_config(
        str(write_config(tmp_path, acl_redis.acl_url)), env_for(acl_redis.acl_url)
    )
    (team, _) = await read_pools(config)
    assert [m.until for m in team.members] == [None, None, None]


async def test_an_unreachable_store_is_an_error_not_a_hang(tmp_path: Path) -> None:
    # Nothing listens: refused at once.
    url = f"redis://gateway:{PASSWORD}@127.0.0.1:{free_port()}/0"
    path = write_config(tmp_path, url)
    status, out, err, took = await keyrelay(path, url)
    assert status == 1
    assert out == ""
    assert "the limits store at 127.0.0.1:" in err
    assert "cannot be read: cannot connect" in err
    assert "the pools' cool-downs are unknown" in err
    assert PASSWORD not in err
    assert took < 10

    # Listening but never answering (the kernel accepts; nobody reads): the timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        path = write_config(tmp_path, url)
        status, out, err, took = await keyrelay(path, url, "--timeout", "0.5")
        assert status == 1
        assert "cannot be read: no reply within 0.5 s" in err, err
        assert took < 10
        config = load_gateway_config(str(path), env_for(url))
        started = time.monotonic()
        with pytest.raises(StoreUnreachable, match=r"cannot be read: no reply within 0\.3 s"):
            await read_pools(config, wait_seconds=0.3)
        assert time.monotonic() - started < 1.5


async def test_a_store_that_refuses_the_user_is_an_error(
    acl_redis: RedisServer, tmp_path: Path
) -> None:
    url = f"redis://gateway:wrong-password@127.0.0.1:{acl_redis.port}/0"
    path = write_config(tmp_path, url)
    status, _, err, _ = await keyrelay(path, url)
    assert status == 1
    assert (
        f"the limits store at 127.0.0.1:{acl_redis.port} ([gateway.limits]) cannot be read" in err
    ), err
    assert "WRONGPASS" in err  # Redis's word for it
    assert "wrong-password" not in err


async def test_a_config_without_pools(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps({"upstreams": {"default": {"url": "http://127.0.0.1:9"}}}))
    status, out, err, _ = await keyrelay(path, "redis://127.0.0.1:9/0")
    assert status == 0, err
    assert out.strip() == f"no pools in {path} ([pools.<name>])"
    status, out, err, _ = await keyrelay(path, "redis://127.0.0.1:9/0", "--json")
    assert (status, json.loads(out)) == (0, [])
