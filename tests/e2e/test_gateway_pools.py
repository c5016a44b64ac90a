"""Credential pools (issue 12, DESIGN §6.3) end to end: gateway keys that name a pool
of upstream API keys, the fake upstream answering per API key, the official SDK as
the client, and the pools' cool-downs shared through a real Redis as the gateway's
ACL user (in one process, and across three gateway processes)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.core.ratelimit import window
from keyrelay.gateway.keys import key_hash, new_key
from keyrelay.gateway.limits_store import LimitsStore
from keyrelay.limit_rules import Period
from tests.conftest import AuthFactory
from tests.e2e.test_gateway_limits import PREFIX, sdk, url_file
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream, Recorded, Scripted, sse
from tests.support.gateway import (
    GatewayProcess,
    RunningGateway,
    auth_client_data,
    gateway_env,
    start_gateway,
)
from tests.support.oidc import OidcServer
from tests.support.redis_server import RedisServer
from tests.support.stack import gateway_md

MEMBERS = ("m1", "m2", "m3")
SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


def upstream_keys(tmp_path: Path) -> dict[str, str]:
    """Each member's upstream API key, in a secret file of its own."""
    keys = {}
    for name in MEMBERS:
        value = f"sk-{name}-" + "0" * 24
        (tmp_path / f"{name}.key").write_text(value + "\n")
        (tmp_path / f"{name}.key").chmod(0o600)
        keys[name] = value
    return keys


def pool_gateway_data(
    tmp_path: Path,
    redis: RedisServer,
    upstream: FakeUpstream,
    key: str,
    name: str,
    members: list[dict[str, Any]],
    *,
    strategy: str = "affinity",
    auth: dict[str, Any] | None = None,
    **pool: Any,
) -> dict[str, Any]:
    """A gateway config whose one key, ``key``, names the pool ``name`` of
    ``members``; the limits store on ``redis`` (pools need it); ``[gateway.auth]``
    when given."""
    gateway: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "limits": {"redis_url": {"file": url_file(tmp_path, redis)}, "key_prefix": PREFIX},
    }
    if auth is not None:
        gateway["auth"] = auth
    return {
        "gateway": gateway,
        "upstreams": {"default": {"url": upstream.url, "read_timeout_seconds": 10}},
        "pools": {name: {"strategy": strategy, "members": members, **pool}},
        "keys": [{"name": "alice", "hash": key_hash(key), "pool": name}],
    }


def pool_config(
    tmp_path: Path,
    redis: RedisServer,
    upstream: FakeUpstream,
    key: str,
    strategy: str = "affinity",
    name: str = "team",
    **pool: Any,
) -> dict[str, Any]:
    """A pool of the three members for ``key``. The limits Redis is shared by the
    tests of this module, and so are cool-downs by pool name: each test names its own."""
    members = [
        {"name": member, "api_key": {"file": str(tmp_path / f"{member}.key")}} for member in MEMBERS
    ]
    return pool_gateway_data(
        tmp_path, redis, upstream, key, name, members, strategy=strategy, **pool
    )


def member_of(keys: dict[str, str]) -> Callable[[Recorded], str]:
    by_value = {value: name for name, value in keys.items()}
    return lambda recorded: by_value[recorded.header("x-api-key") or ""]


def refusing(status: int, until: float, error_type: str, **headers: str) -> Callable[..., Any]:
    """An upstream answer: ``status`` (with ``retry-after`` the seconds left) until
    ``until``, then normal answers."""

    def answer(_: Recorded) -> Scripted | None:
        left = until - time.time()
        if left <= 0:
            return None
        body = json.dumps({"type": "error", "error": {"type": error_type, "message": "slow down"}})
        return Scripted(
            status, body.encode(), headers={"retry-after": str(math.ceil(left)), **headers}
        )

    return answer


async def in_process(data: dict[str, Any]) -> RunningGateway:
    return await start_gateway(parse_gateway_config(data, gateway_env()))


async def sessions_round(
    client: anthropic.AsyncAnthropic,
    upstream: FakeUpstream,
    member: Callable[[Recorded], str],
    sessions: list[str],
) -> dict[str, str]:
    """One request per session (in turn); which member answered each."""
    served = {}
    for session in sessions:
        before = len(upstream.requests)
        await client.messages.create(**SIMPLE, extra_headers={"x-keyrelay-session": session})
        answered = upstream.requests[-1]
        assert len(upstream.requests) >= before + 1
        served[session] = member(answered)
    return served


async def test_affinity_keeps_sessions_and_moves_only_a_limited_members(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    keys = upstream_keys(tmp_path)
    member = member_of(keys)
    key = new_key()
    gateway = await in_process(pool_config(tmp_path, limits_redis, upstream, key, name="affine"))
    sessions = [f"session-{i}" for i in range(100)]
    try:
        async with sdk(gateway.url, key) as client:
            first = await sessions_round(client, upstream, member, sessions)
            again = await sessions_round(client, upstream, member, sessions)
            assert again == first  # each session always on one member while healthy
            # The session header is the gateway's: it never reaches the upstream.
            assert all(r.header("x-keyrelay-session") is None for r in upstream.requests)
            spread = Counter(first.values())
            assert set(spread) == set(MEMBERS)
            assert min(spread.values()) >= 15  # (100 sessions over 3: about a third each)

            # m2 is rate limited for 3 s: its sessions move, the others stay, and no
            # client sees an error (max_retries=0).
            until = time.time() + 3
            upstream.by_api_key[keys["m2"]] = refusing(429, until, "rate_limit_error")
            start = len(upstream.requests)
            limited = await sessions_round(client, upstream, member, sessions)
            for session in sessions:
                if first[session] == "m2":
                    assert limited[session] != "m2"
                else:
                    assert limited[session] == first[session]
            to_m2 = [r for r in upstream.requests[start:] if member(r) == "m2"]
            assert len(to_m2) == 1  # the 429 that cooled it; none after
            assert time.time() < until

            # After its reset, its sessions come back to it.
            await asyncio.sleep(until - time.time() + 0.1)
            assert await sessions_round(client, upstream, member, sessions) == first
    finally:
        await gateway.stop()


async def test_round_robin_spreads_and_skips_an_overloaded_member(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    keys = upstream_keys(tmp_path)
    member = member_of(keys)
    key = new_key()
    data = pool_config(
        tmp_path,
        limits_redis,
        upstream,
        key,
        "round_robin",
        name="spread",
        default_cool_down_seconds=5,
    )
    gateway = await in_process(data)
    try:
        async with sdk(gateway.url, key) as client:
            for _ in range(30):
                await client.messages.create(**SIMPLE)
            assert Counter(member(r) for r in upstream.requests) == dict.fromkeys(MEMBERS, 10)
            # 529 without retry-after: the pool's default cool-down (5 s).
            upstream.by_api_key[keys["m3"]] = refusing(529, time.time() + 60, "overloaded_error")
            upstream.requests.clear()
            for _ in range(30):
                await client.messages.create(**SIMPLE)
            seen = Counter(member(r) for r in upstream.requests)
            assert seen["m3"] == 1
            assert seen["m1"] + seen["m2"] == 30
    finally:
        await gateway.stop()


async def test_usage_is_recorded_under_the_member_that_served(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """A pool key with limits: its usage is recorded under the key and under each
    member that served (kind "member", id "<pool>/<member id>"); a member that
    cooled down first records nothing."""
    keys = upstream_keys(tmp_path)
    key = new_key()
    data = pool_config(tmp_path, limits_redis, upstream, key, "round_robin", name="usage")
    data["keys"][0]["limits"] = {"requests_per_minute": 1000}
    gateway = await in_process(data)
    upstream.by_api_key[keys["m3"]] = refusing(429, time.time() + 60, "rate_limit_error")
    try:
        async with sdk(gateway.url, key) as client:
            for _ in range(6):
                await client.messages.create(**SIMPLE)
    finally:
        await gateway.stop()  # (sends the usage it holds)
    store = LimitsStore.from_url(limits_redis.url, prefix=PREFIX, timeout=2.0)
    try:
        today = [window(Period.DAY, time.time()).label]
        (by_key,) = await store.usage("key", key_hash(key), today)
        served = {
            name: (await store.usage("member", f"usage/key:{name}", today))[0].requests
            for name in MEMBERS
        }
    finally:
        await store.close()
    assert by_key.requests == 6
    assert served == {"m1": 3, "m2": 3, "m3": 0}
    assert by_key.input_tokens > 0


async def test_round_robin_turns_per_pool(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """Two round-robin pools whose requests alternate: each spreads its own requests
    evenly (one counter for both put every request of one pool on one member)."""
    keys = upstream_keys(tmp_path)
    member = member_of(keys)
    alice, bob = new_key(), new_key()
    data = pool_config(tmp_path, limits_redis, upstream, alice, "round_robin", name="rr-a")
    other = pool_config(tmp_path, limits_redis, upstream, bob, "round_robin", name="rr-b")
    data["pools"].update(other["pools"])
    data["keys"] += [{**other["keys"][0], "name": "bob"}]
    for pool in data["pools"].values():  # two members: an even count is what skewed
        pool["members"] = pool["members"][:2]
    gateway = await in_process(data)
    try:
        async with sdk(gateway.url, alice) as a_client, sdk(gateway.url, bob) as b_client:
            served: dict[str, Counter[str]] = {"alice": Counter(), "bob": Counter()}
            for _ in range(8):
                for name, client in (("alice", a_client), ("bob", b_client)):
                    await client.messages.create(**SIMPLE)
                    served[name][member(upstream.requests[-1])] += 1
        assert served["alice"] == {"m1": 4, "m2": 4}
        assert served["bob"] == {"m1": 4, "m2": 4}
    finally:
        await gateway.stop()


async def test_a_429_whose_body_is_cut_still_cools_and_moves_on(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    keys = upstream_keys(tmp_path)
    member = member_of(keys)
    key = new_key()
    data = pool_config(
        tmp_path, limits_redis, upstream, key, "round_robin", name="cut429",
        default_cool_down_seconds=30,
    )  # fmt: skip
    gateway = await in_process(data)
    upstream.by_api_key[keys["m1"]] = lambda _: Scripted(
        429, b'{"type":"error","error":{"type":"rate_', framing="length", cut="fin"
    )
    try:
        async with sdk(gateway.url, key) as client:
            for _ in range(6):
                await client.messages.create(**SIMPLE)  # no client sees an error
        seen = Counter(member(r) for r in upstream.requests)
        assert seen["m1"] == 1  # cooled for the pool's default: asked once
        assert seen["m2"] + seen["m3"] == 6
    finally:
        await gateway.stop()


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_other_errors_are_the_clients_answer_and_never_retried(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream, status: int
) -> None:
    keys = upstream_keys(tmp_path)
    key = new_key()
    gateway = await in_process(pool_config(tmp_path, limits_redis, upstream, key, name="errs"))
    error_type = "invalid_request_error" if status == 400 else "api_error"
    for value in keys.values():
        upstream.by_api_key[value] = refusing(status, time.time() + 60, error_type)
    try:
        async with sdk(gateway.url, key) as client:
            with pytest.raises(anthropic.APIStatusError) as failed:
                await client.messages.create(**SIMPLE)
        assert failed.value.status_code == status
        assert len(upstream.requests) == 1
    finally:
        await gateway.stop()


MESSAGE_START = sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-1",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        },
    },
)
OVERLOADED_EVENT = sse(
    "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
)


async def read_stream(url: str, key: str) -> str:
    """One streamed request through the SDK: its text."""
    async with sdk(url, key) as client, client.messages.stream(**SIMPLE) as events:
        return await events.get_final_text()


async def test_a_stream_that_sent_bytes_is_never_retried(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """Overloaded in the middle of a stream: the client has its first events, so the
    error event is its answer; no other member is asked."""
    keys = upstream_keys(tmp_path)
    key = new_key()
    gateway = await in_process(pool_config(tmp_path, limits_redis, upstream, key, name="cut"))
    for value in keys.values():
        upstream.by_api_key[value] = lambda _: Scripted(
            200, MESSAGE_START + OVERLOADED_EVENT, content_type="text/event-stream"
        )
    try:
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            await read_stream(gateway.url, key)
        assert len(upstream.requests) == 1
    finally:
        await gateway.stop()


@pytest.mark.parametrize(
    ("case", "answer"),
    [
        # A proxy on the way turned the 529 into a 503: the body still says it.
        ("503 body", lambda: refusing(503, time.time() + 60, "overloaded_error")),
        # A 200 stream whose first event is the overload: nothing has reached the
        # client yet (the gateway holds the headers until the first event).
        (
            "first event",
            lambda: lambda _: Scripted(200, OVERLOADED_EVENT, content_type="text/event-stream"),
        ),
    ],
)
async def test_an_overload_that_its_status_does_not_tell_cools_and_moves_on(
    tmp_path: Path,
    limits_redis: RedisServer,
    upstream: FakeUpstream,
    case: str,
    answer: Callable[[], Callable[[Recorded], Scripted | None]],
) -> None:
    keys = upstream_keys(tmp_path)
    member = member_of(keys)
    key = new_key()
    name = "overload-" + case.replace(" ", "-")
    data = pool_config(
        tmp_path, limits_redis, upstream, key, "round_robin", name=name,
        default_cool_down_seconds=30,
    )  # fmt: skip
    gateway = await in_process(data)
    upstream.by_api_key[keys["m1"]] = answer()
    try:
        texts = [await read_stream(gateway.url, key) for _ in range(6)]  # no client error
        assert all(texts)
        seen = Counter(member(r) for r in upstream.requests)
        assert seen["m1"] == 1  # asked once, then cooling for the pool's default
        assert seen["m2"] + seen["m3"] == 6
    finally:
        await gateway.stop()


async def test_an_overload_after_the_first_byte_is_the_clients_but_cools_the_member(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """The stream had begun: the client gets the error event (never retried), and
    the member cools down so that the requests after it go to the others."""
    keys = upstream_keys(tmp_path)
    member = member_of(keys)
    key = new_key()
    data = pool_config(
        tmp_path, limits_redis, upstream, key, "round_robin", name="overload-mid",
        default_cool_down_seconds=30,
    )  # fmt: skip
    gateway = await in_process(data)
    upstream.by_api_key[keys["m1"]] = lambda _: Scripted(
        200, MESSAGE_START + OVERLOADED_EVENT, content_type="text/event-stream"
    )
    errors: list[str] = []
    try:
        for _ in range(6):
            try:
                await read_stream(gateway.url, key)
            except anthropic.APIStatusError as exc:
                errors.append(str(exc))
        seen = Counter(member(r) for r in upstream.requests)
        assert len(errors) == 1
        assert "Overloaded" in errors[0]
        assert seen["m1"] == 1
        assert seen["m2"] + seen["m3"] == 5
    finally:
        await gateway.stop()


async def test_all_members_limited_answer_the_earliest_reset_and_the_sdk_waits_for_it(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    keys = upstream_keys(tmp_path)
    key = new_key()
    gateway = await in_process(pool_config(tmp_path, limits_redis, upstream, key, name="all"))
    now = time.time()
    upstream.by_api_key[keys["m1"]] = refusing(429, now + 20, "rate_limit_error")
    upstream.by_api_key[keys["m2"]] = refusing(429, now + 3, "rate_limit_error")
    upstream.by_api_key[keys["m3"]] = refusing(529, now + 20, "overloaded_error")
    try:
        async with sdk(gateway.url, key) as client:
            with pytest.raises(anthropic.RateLimitError) as refused:
                await client.messages.create(**SIMPLE)
        assert len(upstream.requests) == 3  # each member once
        retry_after = int(refused.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 3  # m2's reset, the earliest
        assert "pool 'all'" in refused.value.message

        # With retries on, the SDK waits out retry-after and m2 serves it.
        upstream.requests.clear()
        async with sdk(gateway.url, key, max_retries=2) as client:
            message = await client.messages.create(**SIMPLE)
        assert message.content
        served = member_of(keys)(upstream.requests[-1])
        assert served == "m2"
        assert time.time() >= now + 3
    finally:
        await gateway.stop()


@pytest.mark.slow
async def test_three_gateway_processes_share_a_cool_down(
    tmp_path: Path, limits_redis: RedisServer, upstream: FakeUpstream
) -> None:
    """m1 rate limited through one worker: within 1 s no worker sends it anything
    until its reset, and no client sees an error."""
    keys = upstream_keys(tmp_path)
    member = member_of(keys)
    key = new_key()
    data = pool_config(tmp_path, limits_redis, upstream, key, "round_robin", name="fleet")
    workers = [GatewayProcess.write(tmp_path, f"pool-gateway-{i}", data) for i in range(3)]
    for worker in workers:
        worker.spawn()
    try:
        for worker in workers:
            worker.wait_ready()
        clients = [sdk(worker.url, key) for worker in workers]
        until = time.time() + 6
        upstream.by_api_key[keys["m1"]] = refusing(429, until, "rate_limit_error")
        # Through worker 0 until m1 has refused once (round robin reaches it).
        for _ in range(3):
            await clients[0].messages.create(**SIMPLE)
        cooled_at = time.time()
        assert "m1" in {member(r) for r in upstream.requests}
        await asyncio.sleep(1.0)  # shared within 1 s
        start = len(upstream.requests)
        results = await asyncio.gather(
            *(clients[i % 3].messages.create(**SIMPLE) for i in range(90)),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        during = upstream.requests[start:]
        assert time.time() < until, "the burst outlasted the cool-down"
        assert len(during) == 90
        assert Counter(member(r) for r in during)["m1"] == 0
        assert cooled_at < until
        # After the reset every worker sends to m1 again.
        await asyncio.sleep(until - time.time() + 0.5)
        start = len(upstream.requests)
        for i in range(9):
            await clients[i % 3].messages.create(**SIMPLE)
        assert Counter(member(r) for r in upstream.requests[start:])["m1"] >= 3
        for client in clients:
            await client.close()
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.slow
async def test_a_disconnected_account_leaves_the_pool_on_every_worker_and_returns(
    tmp_path: Path,
    make_auth: AuthFactory,
    oidc: OidcServer,
    limits_redis: RedisServer,
    upstream: FakeUpstream,
) -> None:
    """Two accounts in a pool; one user's grants revoked at the real OAuth server: the
    worker whose request meets it moves on (no client error), the auth service
    publishes the disconnection, and no worker sends that account anything more;
    connected again, it serves again."""
    auth, stub = await make_auth.start()
    await connect(stub, "pool-a", login="pool-user-a")
    await connect(stub, "pool-b", login="pool-user-b")
    key = new_key()
    data = pool_gateway_data(
        tmp_path,
        limits_redis,
        upstream,
        key,
        "accounts",
        [{"account": "pool-a"}, {"account": "pool-b"}],
        strategy="round_robin",
        auth=auth_client_data([auth.port]),
    )
    # Three workers in this process (the auth service runs in its loop too), each
    # with its own token cache and event stream.
    workers = [await in_process(data) for _ in range(3)]
    async with httpx.AsyncClient() as http:

        async def active(token: str) -> bool:
            return await oidc.token_active(token, http)

        upstream.token_check = active
        try:
            clients = [sdk(worker.url, key) for worker in workers]

            async def tokens_of(account: str) -> str:
                token = await stub.GetToken(
                    auth_pb2.GetTokenRequest(account_id=account), metadata=gateway_md()
                )
                return token.access_token

            def bearer(recorded: Recorded) -> str:
                return (recorded.header("authorization") or "").removeprefix("Bearer ")

            for i in range(6):
                await clients[i % 3].messages.create(**SIMPLE)
            seen = {bearer(r) for r in upstream.requests}
            assert seen == {await tokens_of("pool-a"), await tokens_of("pool-b")}

            assert oidc.revoke_user("pool-user-a") >= 1
            results = await asyncio.gather(
                *(clients[i % 3].messages.create(**SIMPLE) for i in range(12)),
                return_exceptions=True,
            )
            assert [r for r in results if isinstance(r, BaseException)] == []
            await asyncio.sleep(1.0)  # the DISCONNECTED event reaches every worker
            token_b = await tokens_of("pool-b")
            start = len(upstream.requests)
            for i in range(30):
                await clients[i % 3].messages.create(**SIMPLE)
            assert {bearer(r) for r in upstream.requests[start:]} == {token_b}

            await connect(stub, "pool-a", login="pool-user-a")
            await asyncio.sleep(1.0)  # the CONNECTED event
            start = len(upstream.requests)
            for i in range(12):
                await clients[i % 3].messages.create(**SIMPLE)
            assert await tokens_of("pool-a") in {bearer(r) for r in upstream.requests[start:]}
            for client in clients:
                await client.close()
        finally:
            upstream.token_check = None
            for worker in workers:
                await worker.stop()
