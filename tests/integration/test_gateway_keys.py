"""Gateway keys at runtime (DESIGN §6.1), against the real gRPC server and Redis.

What is stored (the SHA-256, never the secret), the admin RPCs and the gateway
role's read-only access, the KEY_CHANGED events a watcher sees, conditional
updates racing revocations, bad input, and a thousand keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from grpc import aio

from keyrelay.auth.core.gateway_keys import Route
from keyrelay.auth.rpc.server import RunningServer
from keyrelay.auth.store.keys_store import KeyStore, Refused
from keyrelay.auth.store.redis_store import RedisStore
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.limit_rules import Limits
from tests.integration.test_auth_bad_input import status_of
from tests.integration.test_event_fanout import open_store
from tests.support.events import EventWatcher
from tests.support.redis_server import RedisServer
from tests.support.stack import admin_md, gateway_md

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
KEY_CHANGED = auth_pb2.AccountEvent.KEY_CHANGED


def route(account: str = "team-a", **fields: str) -> auth_pb2.KeyRoute:
    return auth_pb2.KeyRoute(account_id=account, **fields)


async def create(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, name: str = "ci-bot", **fields: Any
) -> auth_pb2.CreateKeyResponse:
    fields.setdefault("route", route())
    reply: auth_pb2.CreateKeyResponse = await stub.CreateKey(
        auth_pb2.CreateKeyRequest(name=name, **fields), metadata=admin_md()
    )
    return reply


async def everything_in_redis(client: Any, prefix: str) -> bytes:
    """Every key name and value under ``prefix`` (the event stream included), as bytes."""
    found = []
    async for key in client.scan_iter(match=f"{prefix}*"):
        kind = (await client.type(key)).decode()
        found.append(key)
        if kind == "hash":
            for field, value in (await client.hgetall(key)).items():
                found += [field, value]
        elif kind == "set":
            found += list(await client.smembers(key))
        elif kind == "zset":
            found += list(await client.zrange(key, 0, -1))
        elif kind == "string":
            found.append(await client.get(key))
        elif kind == "stream":
            for entry_id, fields in await client.xrange(key):
                found += [entry_id, *(p for item in fields.items() for p in item)]
        else:
            raise AssertionError(f"unexpected {kind} at {key!r}")
    return b"\n".join(found)


@pytest.fixture
async def store(auth_server: RunningServer) -> RedisStore:
    """The running server's store: Redis as the server sees it."""
    return auth_server.store


@pytest.fixture
async def plain_store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    """A store without a server (whose event reader would trip over a broken stream)."""
    store = open_store(redis_server.url, prefix)
    yield store
    await store.close()


@pytest.fixture
async def watcher(auth_stub: auth_pb2_grpc.AuthServiceAsyncStub) -> AsyncIterator[EventWatcher]:
    events = EventWatcher(auth_stub)
    yield events
    await events.close()


async def test_create_stores_only_the_hash_and_the_secret_nowhere(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, store: RedisStore, prefix: str
) -> None:
    expires = int(time.time()) + 3600
    reply = await create(
        auth_stub,
        name="alice@laptop",
        route=route("team-a", mode="auto", profile="claude-code", upstream="eu"),
        limits=auth_pb2.KeyLimits(
            requests_per_minute=60,
            tokens_per_minute=100_000,
            concurrent_requests=4,
            budget=auth_pb2.KeyBudget(amount=12.5, unit="usd", period="month"),
        ),
        expires_at=expires,
    )
    key, secret = reply.key, reply.secret
    assert secret.startswith("kr-")
    assert len(secret) > 40
    assert key.key_sha256 == "sha256:" + hashlib.sha256(secret.encode()).hexdigest()
    assert key.key_id.startswith("gk-")
    assert (key.name, key.version, key.revoked_at, key.expires_at) == (
        "alice@laptop",
        1,
        0,
        expires,
    )
    assert key.route == route("team-a", mode="auto", profile="claude-code", upstream="eu")
    assert key.limits.requests_per_minute == 60
    assert key.limits.budget == auth_pb2.KeyBudget(amount=12.5, unit="usd", period="month")
    assert abs(key.created_at - time.time()) < 5

    raw = await store.client.hgetall(f"{prefix}gwkey:{key.key_id}")
    assert raw[b"key_sha256"] == key.key_sha256.encode()
    assert await store.client.hget(f"{prefix}gwkeys:sha256", key.key_sha256) == key.key_id.encode()
    everything = await everything_in_redis(store.client, prefix)
    assert key.key_sha256.encode() in everything  # the scan does see the stored hash...
    assert secret.encode() not in everything  # ...and never the secret
    assert secret.removeprefix("kr-").encode() not in everything

    # GetKey and ListKeys answer the same record; defaults fill an empty route's names.
    assert (
        await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=admin_md())
        == key
    )
    other = (await create(auth_stub, "minimal", route=auth_pb2.KeyRoute(account_id="b"))).key
    assert other.route == auth_pb2.KeyRoute(
        account_id="b", mode="oauth", profile="default", upstream="default"
    )
    assert not other.limits.HasField("requests_per_minute")
    assert not other.limits.HasField("budget")
    listed = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin_md())
    assert [k.key_id for k in listed.keys] == [key.key_id, other.key_id]
    assert listed.keys[0] == key


async def test_update_replaces_the_parts_present_and_bumps_the_version(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    key = (
        await create(
            auth_stub, limits=auth_pb2.KeyLimits(requests_per_minute=10, concurrent_requests=2)
        )
    ).key
    renamed = await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(key_id=key.key_id, name="renamed"), metadata=admin_md()
    )
    assert (renamed.name, renamed.version, renamed.route, renamed.limits) == (
        "renamed",
        2,
        key.route,
        key.limits,
    )
    limited = await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(
            key_id=key.key_id,
            limits=auth_pb2.KeyLimits(
                budget=auth_pb2.KeyBudget(amount=1_000_000, unit="tokens", period="day")
            ),
            expires_at=int(time.time()) + 60,
            expected_version=2,
        ),
        metadata=admin_md(),
    )
    assert limited.version == 3
    assert not limited.limits.HasField("requests_per_minute")  # the limits are replaced whole
    assert limited.limits.budget.unit == "tokens"
    assert limited.expires_at > 0
    moved = await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(
            key_id=key.key_id, route=auth_pb2.KeyRoute(mode="api_key"), expires_at=0
        ),
        metadata=admin_md(),
    )
    assert (moved.route.account_id, moved.route.mode, moved.expires_at) == ("", "api_key", 0)
    assert moved.key_sha256 == key.key_sha256
    assert moved.created_at == key.created_at

    code, details = await status_of(
        auth_stub.UpdateKey(
            auth_pb2.UpdateKeyRequest(key_id=key.key_id, name="x", expected_version=3),
            metadata=admin_md(),
        )
    )
    assert code == PRECONDITION
    assert "version 3" in details
    code, details = await status_of(
        auth_stub.UpdateKey(auth_pb2.UpdateKeyRequest(key_id=key.key_id), metadata=admin_md())
    )
    assert (code, "nothing to update" in details) == (INVALID, True)


def pool_route(pool: str = "team", **fields: str) -> auth_pb2.KeyRoute:
    return auth_pb2.KeyRoute(pool=pool, **fields)


async def test_a_key_may_name_a_pool_and_move_to_an_account_and_back(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
    store: RedisStore,
    prefix: str,
    watcher: EventWatcher,
) -> None:
    """A runtime key may name a gateway pool (issue 12) instead of an account and a
    mode: answered with mode "pool" and no account, stored with the key, listed, and
    replaced with the route as a whole (a pool and an account never both)."""
    reply = await create(
        auth_stub,
        "team-bot",
        route=pool_route(profile="coding"),
        limits=auth_pb2.KeyLimits(requests_per_minute=60),
    )
    key = reply.key
    assert key.route == auth_pb2.KeyRoute(
        account_id="", mode="pool", profile="coding", upstream="default", pool="team"
    )
    raw = await store.client.hgetall(f"{prefix}gwkey:{key.key_id}")
    assert (raw[b"pool"], raw[b"mode"], raw[b"account_id"]) == (b"team", b"pool", b"")
    assert (
        await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=gateway_md())
        == key
    )
    listed = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=gateway_md())
    assert list(listed.keys) == [key]

    # To an account: the pool is gone (stored empty), and back, sending GetKey's route
    # (mode "pool") as it came.
    moved = await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(key_id=key.key_id, route=route("team-a")), metadata=admin_md()
    )
    assert moved.route == route("team-a", mode="oauth", profile="default", upstream="default")
    assert await store.client.hget(f"{prefix}gwkey:{key.key_id}", "pool") == b""
    back = await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(key_id=key.key_id, route=key.route, expected_version=2),
        metadata=admin_md(),
    )
    assert (back.route, back.version, back.limits) == (key.route, 3, key.limits)

    def changes(events: list[auth_pb2.AccountEvent]) -> list[tuple[str, str, int]]:
        return [(e.reason, e.account_id, e.generation) for e in events if e.kind == KEY_CHANGED]

    await watcher.wait_for(lambda events: len(changes(events)) == 3)
    # A pool key's events name no account (its members are the pool's, on the gateway).
    assert changes(watcher.events) == [
        ("created", "", 1),
        ("updated", "team-a", 2),
        ("updated", "", 3),
    ]


async def test_a_pool_left_behind_by_an_earlier_version_is_no_pool(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, store: RedisStore, prefix: str
) -> None:
    """A replica of the version before pools, replacing a pool key's route, writes
    account_id, mode, profile and upstream and leaves ``pool``: the mode says which."""
    key = (await create(auth_stub, route=pool_route())).key
    await store.client.hset(
        f"{prefix}gwkey:{key.key_id}", mapping={"account_id": "team-a", "mode": "oauth"}
    )
    got = await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=admin_md())
    assert got.route == route("team-a", mode="oauth", profile="default", upstream="default")
    # And a record with no pool field at all (every key written before) has no pool.
    await store.client.hdel(f"{prefix}gwkey:{key.key_id}", "pool")
    again = await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=admin_md())
    assert again == got


async def test_revoke_keeps_the_record_and_lists_it_only_on_request(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    kept = (await create(auth_stub, "kept")).key
    gone = (await create(auth_stub, "gone")).key
    revoked = await auth_stub.RevokeKey(
        auth_pb2.RevokeKeyRequest(key_id=gone.key_id), metadata=admin_md()
    )
    assert revoked.revoked_at > 0
    assert revoked.version == 2
    assert revoked.key_sha256 == gone.key_sha256

    live = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=gateway_md())
    assert [k.key_id for k in live.keys] == [kept.key_id]
    audit = await auth_stub.ListKeys(
        auth_pb2.ListKeysRequest(include_revoked=True), metadata=admin_md()
    )
    assert [k.key_id for k in audit.keys] == [kept.key_id, gone.key_id]
    assert (
        await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=gone.key_id), metadata=gateway_md())
        == revoked
    )

    refused: tuple[Awaitable[Any], ...] = (
        auth_stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=gone.key_id), metadata=admin_md()),
        auth_stub.UpdateKey(
            auth_pb2.UpdateKeyRequest(key_id=gone.key_id, name="back"), metadata=admin_md()
        ),
    )
    for call in refused:
        code, details = await status_of(call)
        assert (code, "revoked" in details) == (PRECONDITION, True)

    unknown = "gk-0000000000000000"
    calls: tuple[Awaitable[Any], ...] = (
        auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=unknown), metadata=admin_md()),
        auth_stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=unknown), metadata=admin_md()),
        auth_stub.UpdateKey(
            auth_pb2.UpdateKeyRequest(key_id=unknown, name="x"), metadata=admin_md()
        ),
    )
    for call in calls:
        assert (await status_of(call))[0] == grpc.StatusCode.NOT_FOUND


async def test_updates_racing_revocations_exactly_one_wins(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    keys = [(await create(auth_stub, f"race-{i}")).key for i in range(40)]

    async def outcome(call: Awaitable[Any]) -> grpc.StatusCode:
        try:
            await call
        except aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    def update(key: auth_pb2.GatewayKey, version: int) -> Awaitable[Any]:
        request = auth_pb2.UpdateKeyRequest(
            key_id=key.key_id,
            limits=auth_pb2.KeyLimits(requests_per_minute=5),
            expected_version=version,
        )
        return auth_stub.UpdateKey(request, metadata=admin_md())

    def revoke(key: auth_pb2.GatewayKey, version: int) -> Awaitable[Any]:
        request = auth_pb2.RevokeKeyRequest(key_id=key.key_id, expected_version=version)
        return auth_stub.RevokeKey(request, metadata=admin_md())

    # Both expect version 1: exactly one of each pair wins, the other is refused.
    # Half the pairs send the update first, half the revocation.
    calls = [
        (update(k, 1), revoke(k, 1)) if i % 2 else (revoke(k, 1), update(k, 1))
        for i, k in enumerate(keys)
    ]
    results = await asyncio.gather(*(outcome(c) for pair in calls for c in pair))
    pairs = list(zip(results[::2], results[1::2], strict=True))
    assert all({*pair} == {grpc.StatusCode.OK, PRECONDITION} for pair in pairs), pairs
    for key, (first, _second) in zip(keys, pairs, strict=True):
        now = await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=admin_md())
        assert now.version == 2
        revoke_first = keys.index(key) % 2 == 0
        revoke_won = (first == grpc.StatusCode.OK) == revoke_first
        assert (now.revoked_at > 0) == revoke_won
        assert now.limits.HasField("requests_per_minute") == (not revoke_won)

    # Without expected versions: an update may land before the revocation, never after.
    fresh = [(await create(auth_stub, f"loose-{i}")).key for i in range(40)]
    results = await asyncio.gather(
        *(outcome(call(k, 0)) for k in fresh for call in (update, revoke))
    )
    assert all(r == grpc.StatusCode.OK for r in results[1::2])  # every revocation wins
    for key, updated in zip(fresh, results[::2], strict=True):
        now = await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=admin_md())
        assert now.revoked_at > 0
        if updated == grpc.StatusCode.OK:
            assert (now.version, now.limits.requests_per_minute) == (3, 5)
        else:
            assert updated == PRECONDITION
            assert (now.version, now.limits.HasField("requests_per_minute")) == (2, False)


def limits(**fields: Any) -> auth_pb2.KeyLimits:
    return auth_pb2.KeyLimits(**fields)


def budget(amount: float = 10, unit: str = "usd", period: str = "day") -> auth_pb2.KeyLimits:
    return auth_pb2.KeyLimits(budget=auth_pb2.KeyBudget(amount=amount, unit=unit, period=period))


BAD_CREATES = [
    ({"name": ""}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"name": "bad name"}, "name"),
    ({"name": "caf\u00e9"}, "name"),
    ({"route": route("")}, "route.account_id"),
    ({"route": route("bad account!")}, "route.account_id"),
    ({"route": route(mode="magic")}, "route.mode"),
    ({"route": route(profile="../etc")}, "route.profile"),
    ({"route": route(upstream="x" * 65)}, "route.upstream"),
    ({"route": route(pool="team")}, "route.pool:"),  # an account and a pool
    ({"route": route("", mode="auto", pool="team")}, "route.pool:"),  # a mode and a pool
    ({"route": route("", pool="team b")}, "route.pool"),
    ({"route": route("", pool="x" * 65)}, "route.pool"),
    ({"route": route("", mode="pool")}, "route.mode"),  # mode pool without a pool
    ({"limits": limits(requests_per_minute=0)}, "limits.requests_per_minute"),
    ({"limits": limits(requests_per_minute=-1)}, "limits.requests_per_minute"),
    ({"limits": limits(tokens_per_minute=10**12 + 1)}, "limits.tokens_per_minute"),
    ({"limits": limits(concurrent_requests=10**6 + 1)}, "limits.concurrent_requests"),
    ({"limits": limits(concurrent_requests=2**62)}, "limits.concurrent_requests"),
    ({"limits": budget(amount=0)}, "limits.budget.amount"),
    ({"limits": budget(amount=-5)}, "limits.budget.amount"),
    ({"limits": budget(amount=float("nan"))}, "limits.budget.amount"),
    ({"limits": budget(amount=float("inf"))}, "limits.budget.amount"),
    ({"limits": budget(amount=1e10)}, "limits.budget.amount"),
    ({"limits": budget(amount=10.5, unit="tokens")}, "limits.budget.amount"),
    ({"limits": budget(unit="eur")}, "limits.budget.unit"),
    ({"limits": budget(unit="")}, "limits.budget.unit"),
    ({"limits": budget(period="week")}, "limits.budget.period"),
    ({"expires_at": 1}, "expires_at"),
    ({"expires_at": -1}, "expires_at"),
    ({"expires_at": 10**15}, "expires_at"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_CREATES)
async def test_bad_input_is_refused_naming_the_field_and_writes_nothing(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
    store: RedisStore,
    prefix: str,
    fields: dict[str, Any],
    named: str,
) -> None:
    request = {"name": "ok", "route": route(), **fields}
    code, details = await status_of(
        auth_stub.CreateKey(auth_pb2.CreateKeyRequest(**request), metadata=admin_md())
    )
    assert code == INVALID
    assert details.startswith(named + " "), details
    assert [k async for k in store.client.scan_iter(match=f"{prefix}gwkey*")] == []

    key = (await create(auth_stub)).key  # the same change as an update: refused the same way
    update = {k: v for k, v in request.items() if k in fields}
    code, details = await status_of(
        auth_stub.UpdateKey(
            auth_pb2.UpdateKeyRequest(key_id=key.key_id, **update), metadata=admin_md()
        )
    )
    assert code == INVALID
    assert details.startswith(named + " "), details
    assert (
        await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=admin_md())
    ) == key


async def test_a_field_of_the_wrong_type_is_refused_not_ignored(
    auth_server: RunningServer, store: RedisStore, prefix: str
) -> None:
    """A string where requests_per_minute's integer belongs: protobuf parses it as an
    unknown field, which a server reading only known fields would take as "no limit"."""
    good = auth_pb2.CreateKeyRequest(name="typed", route=route()).SerializeToString()
    wrong_limit = bytes([0x0A, 3]) + b"ten"  # KeyLimits field 1, length-delimited
    request = good + bytes([0x1A, len(wrong_limit)]) + wrong_limit  # CreateKeyRequest.limits
    async with aio.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        call = channel.unary_unary(
            "/keyrelay.auth.v1.AuthService/CreateKey",
            request_serializer=lambda raw: raw,
            response_deserializer=auth_pb2.CreateKeyResponse.FromString,
        )
        code, details = await status_of(call(request, metadata=admin_md()))
    assert code == INVALID
    assert details.startswith("limits has a field of the wrong type"), details
    assert [k async for k in store.client.scan_iter(match=f"{prefix}gwkey*")] == []


@pytest.mark.parametrize("key_id", ["", "gk-", "gk-XYZ", "../x", "gk-" + "0" * 17])
async def test_malformed_key_ids_are_invalid(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, key_id: str
) -> None:
    code, details = await status_of(
        auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key_id), metadata=admin_md())
    )
    assert (code, details.startswith("key_id ")) == (INVALID, True)
    code, _ = await status_of(
        auth_stub.RevokeKey(
            auth_pb2.RevokeKeyRequest(key_id="gk-0000000000000000", expected_version=-1),
            metadata=admin_md(),
        )
    )
    assert code == INVALID


async def test_the_gateway_role_reads_keys_but_cannot_change_them(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    key = (await create(auth_stub)).key
    listed = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=gateway_md())
    assert [k.key_id for k in listed.keys] == [key.key_id]
    assert (
        await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=gateway_md())
        == key
    )
    for call in (
        auth_stub.CreateKey(
            auth_pb2.CreateKeyRequest(name="x", route=route()), metadata=gateway_md()
        ),
        auth_stub.UpdateKey(
            auth_pb2.UpdateKeyRequest(key_id=key.key_id, name="x"), metadata=gateway_md()
        ),
        auth_stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=key.key_id), metadata=gateway_md()),
    ):
        assert (await status_of(call))[0] == grpc.StatusCode.PERMISSION_DENIED
    after = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin_md())
    assert list(after.keys) == [key]


async def test_watchers_see_key_changed_for_create_update_and_revoke(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, watcher: EventWatcher
) -> None:
    key = (await create(auth_stub, route=route("team-a"))).key
    await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(key_id=key.key_id, route=route("team-b")), metadata=admin_md()
    )
    await auth_stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=key.key_id), metadata=admin_md())

    def changes(events: list[auth_pb2.AccountEvent]) -> list[tuple[str, str, str, int]]:
        return [
            (e.key_id, e.reason, e.account_id, e.generation)
            for e in events
            if e.kind == KEY_CHANGED
        ]

    await watcher.wait_for(lambda events: len(changes(events)) == 3)
    assert changes(watcher.events) == [
        (key.key_id, "created", "team-a", 1),
        (key.key_id, "updated", "team-b", 2),
        (key.key_id, "revoked", "team-b", 3),
    ]
    assert all(e.at > 0 and e.event_id for e in watcher.events)


async def test_list_then_watch_from_its_cursor_misses_no_change(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    before = (await create(auth_stub, "before")).key
    listed = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=gateway_md())
    assert listed.events_cursor
    after = (await create(auth_stub, "after")).key
    events = EventWatcher(auth_stub, after_event_id=listed.events_cursor)
    try:
        await events.wait_for(lambda seen: any(e.key_id == after.key_id for e in seen))
        assert [e.key_id for e in events.events] == [after.key_id]
        assert before.key_id in {k.key_id for k in listed.keys}
    finally:
        await events.close()


async def test_a_thousand_keys_are_created_and_listed(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    created: list[auth_pb2.GatewayKey] = []
    for batch in range(10):
        replies = await asyncio.gather(
            *(
                create(auth_stub, f"k{batch}-{i}", limits=limits(requests_per_minute=i + 1))
                for i in range(100)
            )
        )
        created += [r.key for r in replies]
    assert len({k.key_sha256 for k in created}) == 1000
    started = time.perf_counter()
    listed = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=gateway_md())
    elapsed = time.perf_counter() - started
    assert sorted(k.key_id for k in listed.keys) == sorted(k.key_id for k in created)
    assert {k.key_id: k for k in listed.keys} == {k.key_id: k for k in created}
    assert elapsed < 2.0, elapsed


# --- records written by earlier versions --------------------------------------------------

# Hashes exactly as the auth service wrote them before it used keyrelay.limit_rules'
# Limits (floats for every budget amount: the proto's double) and, for the last one,
# before it checked budgets by the gateways' rules (a USD budget under a micro-dollar).
EARLIER_RECORDS = {
    "gk-00000000000000e1": (
        '{"budget": {"amount": 12.5, "period": "month", "unit": "usd"}, '
        '"concurrent_requests": 4, "requests_per_minute": 60}',
        auth_pb2.KeyLimits(
            requests_per_minute=60,
            concurrent_requests=4,
            budget=auth_pb2.KeyBudget(amount=12.5, unit="usd", period="month"),
        ),
    ),
    "gk-00000000000000e2": (
        '{"budget": {"amount": 2000000.0, "period": "day", "unit": "tokens"}, '
        '"tokens_per_minute": 100000}',
        auth_pb2.KeyLimits(
            tokens_per_minute=100_000,
            budget=auth_pb2.KeyBudget(amount=2_000_000, unit="tokens", period="day"),
        ),
    ),
    "gk-00000000000000e3": ("{}", auth_pb2.KeyLimits()),
    "gk-00000000000000e4": (
        '{"budget": {"amount": 1e-07, "period": "day", "unit": "usd"}}',
        auth_pb2.KeyLimits(budget=auth_pb2.KeyBudget(amount=0.000001, unit="usd", period="day")),
    ),
}


async def test_keys_stored_by_earlier_versions_load_and_change(
    auth_stub: auth_pb2_grpc.AuthServiceAsyncStub, store: RedisStore, prefix: str
) -> None:
    now = int(time.time())
    for n, (key_id, (stored, _)) in enumerate(EARLIER_RECORDS.items()):
        key_sha256 = "sha256:" + f"{n:02x}" * 32
        await store.client.hset(
            f"{prefix}gwkey:{key_id}",
            mapping={
                "name": f"old-{n}",
                "key_sha256": key_sha256,
                "account_id": "team-a",
                "mode": "oauth",
                "profile": "default",
                "upstream": "default",
                "limits": stored,
                "created_at": now - 100 + n,
                "updated_at": now - 100 + n,
                "expires_at": 0,
                "revoked_at": 0,
                "version": 1,
            },
        )
        await store.client.zadd(f"{prefix}gwkeys", {key_id: (now - 100 + n) * 1000})
        await store.client.hset(f"{prefix}gwkeys:sha256", key_sha256, key_id)

    listed = await auth_stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=gateway_md())
    assert {k.key_id: k.limits for k in listed.keys} == {
        key_id: served for key_id, (_, served) in EARLIER_RECORDS.items()
    }
    for key in listed.keys:
        got = await auth_stub.GetKey(auth_pb2.GetKeyRequest(key_id=key.key_id), metadata=admin_md())
        assert got == key

    # Changing another part keeps the limits; replacing them writes today's form.
    key_id = "gk-00000000000000e2"
    renamed = await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(key_id=key_id, name="renamed"), metadata=admin_md()
    )
    assert (renamed.name, renamed.limits) == ("renamed", EARLIER_RECORDS[key_id][1])
    budget = auth_pb2.KeyBudget(amount=3_000_000, unit="tokens", period="month")
    await auth_stub.UpdateKey(
        auth_pb2.UpdateKeyRequest(key_id=key_id, limits=auth_pb2.KeyLimits(budget=budget)),
        metadata=admin_md(),
    )
    written = await store.client.hget(f"{prefix}gwkey:{key_id}", "limits")
    assert written == b'{"budget": {"amount": 3000000, "period": "month", "unit": "tokens"}}'


# --- the store itself -------------------------------------------------------------------


async def test_the_store_refuses_a_duplicate_hash_or_id_and_writes_nothing(
    plain_store: RedisStore, prefix: str
) -> None:
    store = plain_store
    keys = KeyStore(store)
    args: dict[str, Any] = {
        "name": "one",
        "key_sha256": "sha256:" + "ab" * 32,
        "route": Route("acct"),
        "limits": Limits(requests_per_minute=5),
        "expires_at": 0,
        "now": time.time(),
    }
    first = await keys.create_key("gk-00000000000000aa", **args)
    assert not isinstance(first, Refused)
    events = await store.client.xlen(store.events_stream)
    assert await keys.create_key("gk-00000000000000bb", **args) is Refused.HASH_TAKEN
    other_hash = {**args, "key_sha256": "sha256:" + "cd" * 32, "name": "two"}
    assert await keys.create_key("gk-00000000000000aa", **other_hash) is Refused.ID_TAKEN
    assert await keys.get_key("gk-00000000000000bb") is None
    assert await keys.get_key("gk-00000000000000aa") == first
    assert await store.client.xlen(store.events_stream) == events
    assert await store.client.hlen(f"{prefix}gwkeys:sha256") == 1


async def test_a_failing_script_leaves_nothing_half_written(
    plain_store: RedisStore, prefix: str
) -> None:
    """The event stream is the only key the checks do not read: its append comes first."""
    store = plain_store
    keys = KeyStore(store)
    await store.client.delete(store.events_stream)
    await store.client.set(store.events_stream, "not a stream")
    try:
        with pytest.raises(Exception, match="WRONGTYPE"):
            await keys.create_key(
                "gk-00000000000000cc",
                name="x",
                key_sha256="sha256:" + "ef" * 32,
                route=Route("acct"),
                limits=Limits(),
                expires_at=0,
                now=time.time(),
            )
        assert [k async for k in store.client.scan_iter(match=f"{prefix}gwkey*")] == []
    finally:
        await store.client.delete(store.events_stream)
