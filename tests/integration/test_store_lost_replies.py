"""Store writes whose reply is lost after Redis ran them (DESIGN §1.2.1, last bullet).

The store's client re-sends a command whose connection broke (``retry_on_error``). A
``ReplyDroppingProxy`` lets one write reach Redis and throws its reply away, so the
client re-sends it: each write must still append one event, bump the generation
once and answer as the first run did. Every case also runs with the reply arriving,
which shows the expected values are those of a write nobody re-sent. Redis is read
straight, not through the proxy. The needle is the script's SHA1, which only that
script's EVALSHA carries; the scripts are loaded first, so no NOSCRIPT round trip
(whose reply the proxy would drop instead) comes in between.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import cast

import pytest

from keyrelay.auth.config import parse_encryption_keys
from keyrelay.auth.core.gateway_keys import KeyChanges, Route
from keyrelay.auth.store.crypto import TokenCipher
from keyrelay.auth.store.keys_store import _CHANGE_KEY, _CREATE_KEY, KeyStore
from keyrelay.auth.store.redis_store import (
    _CONNECT,
    _DISCONNECT,
    _REFRESH,
    _REFRESH_FAILED,
    _TRY_LOCK,
    TAKE_ONCE,
    FlowRecord,
    RedisStore,
    StoredTokens,
)
from keyrelay.auth.web.sessions import PendingFlow, SessionStore
from keyrelay.limit_rules import Limits
from tests.support.redis_server import RedisServer
from tests.support.stack import ENCRYPTION_KEYS, PROVIDER
from tests.support.tcp_proxy import ReplyDroppingProxy

SCRIPTS = (
    _CONNECT,
    _REFRESH,
    _DISCONNECT,
    _REFRESH_FAILED,
    _TRY_LOCK,
    TAKE_ONCE,
    _CREATE_KEY,
    _CHANGE_KEY,
)


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()  # Redis names a script by its SHA1


@pytest.fixture(params=[False, True], ids=["reply-arrives", "reply-lost"])
def lost(request: pytest.FixtureRequest) -> bool:
    return cast(bool, request.param)


@pytest.fixture
def cipher() -> TokenCipher:
    return TokenCipher(parse_encryption_keys(ENCRYPTION_KEYS, "test"))


@pytest.fixture
async def direct(
    redis_server: RedisServer, cipher: TokenCipher, prefix: str
) -> AsyncIterator[RedisStore]:
    """A store straight to Redis, for reading what Redis holds; it loads the scripts."""
    store = RedisStore.from_url(
        redis_server.url, cipher, prefix=prefix, events_stream=f"{prefix}events"
    )
    for script in SCRIPTS:
        assert (await store.client.script_load(script)).encode() == sha(script)
    yield store
    await store.close()


@pytest.fixture
async def proxy(redis_server: RedisServer, direct: RedisStore) -> AsyncIterator[ReplyDroppingProxy]:
    async with ReplyDroppingProxy("127.0.0.1", redis_server.port) as running:
        yield running


@pytest.fixture
async def store(
    proxy: ReplyDroppingProxy, cipher: TokenCipher, prefix: str
) -> AsyncIterator[RedisStore]:
    """The store under test, through the proxy, with the production retry settings."""
    store = RedisStore.from_url(proxy.url, cipher, prefix=prefix, events_stream=f"{prefix}events")
    yield store
    await store.close()


def arm(proxy: ReplyDroppingProxy, script: str, lost: bool) -> None:
    """When ``lost``: the reply to the next run of ``script`` never reaches the client."""
    if lost:
        proxy.drop_reply_after(sha(script))


async def events(direct: RedisStore, account_id: str) -> list[tuple[str, int, str]]:
    """(kind, generation, reason) of the account's events, oldest first."""
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await direct.client.xrange(direct.events_stream)
    )
    return [
        (fields[b"kind"].decode(), int(fields[b"generation"]), fields[b"reason"].decode())
        for _id, fields in entries
        if fields[b"account_id"].decode() == account_id
    ]


async def connect(store: RedisStore, account_id: str, access: str = "access-0") -> int:
    return await store.connect(
        account_id,
        provider=PROVIDER,
        scopes=["openid"],
        tokens=StoredTokens(access, "refresh-0"),
        token_type="Bearer",
        expires_at=time.time() + 3600,
        now=time.time(),
    )


async def test_connect_appends_one_event_and_bumps_once(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, lost: bool
) -> None:
    arm(proxy, _CONNECT, lost)
    assert await connect(store, "acct", "access-1") == 1
    assert proxy.dropped == int(lost)
    assert await events(direct, "acct") == [("CONNECTED", 1, "")]
    record = await direct.get_account("acct")
    assert record is not None
    assert (record.generation, record.connected) == (1, True)
    assert await direct.list_account_ids() == ["acct"]

    arm(proxy, _CONNECT, lost)  # a reconnect of the same account
    assert await connect(store, "acct", "access-2") == 2
    assert proxy.dropped == 2 * int(lost)
    assert await events(direct, "acct") == [("CONNECTED", 1, ""), ("CONNECTED", 2, "")]
    record = await direct.get_account("acct")
    assert record is not None
    assert record.generation == 2
    assert direct.decrypt_tokens(record).access_token == "access-2"


async def test_a_refresh_appends_one_event_bumps_once_and_releases_the_lock(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, lost: bool
) -> None:
    await connect(store, "acct")
    owner = await store.try_lock("acct", ttl_seconds=30)
    assert owner is not None

    arm(proxy, _REFRESH, lost)
    generation = await store.store_refreshed(
        "acct",
        expected_generation=1,
        tokens=StoredTokens("access-1", "refresh-1"),
        token_type="Bearer",
        expires_at=time.time() + 3600,
        scopes=["openid"],
        now=time.time(),
        lock_owner=owner,
    )
    assert generation == 2  # not 0: the re-sent copy is not taken for a fenced-out one
    assert proxy.dropped == int(lost)
    assert await events(direct, "acct") == [("CONNECTED", 1, ""), ("REFRESHED", 2, "")]
    record = await direct.get_account("acct")
    assert record is not None
    assert record.generation == 2
    assert direct.decrypt_tokens(record) == StoredTokens("access-1", "refresh-1")
    assert not await direct.lock_held("acct")


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "user"])
async def test_a_disconnect_appends_one_event_and_bumps_once(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, lost: bool, fenced: bool
) -> None:
    await connect(store, "acct")

    arm(proxy, _DISCONNECT, lost)
    generation = await store.disconnect(
        "acct", reason="user", expected_generation=1 if fenced else None, now=time.time()
    )
    assert generation == 2  # not 0: the re-sent copy is not taken for "already disconnected"
    assert proxy.dropped == int(lost)
    assert await events(direct, "acct") == [("CONNECTED", 1, ""), ("DISCONNECTED", 2, "user")]
    record = await direct.get_account("acct")
    assert record is not None
    assert (record.status, record.generation, record.disconnect_reason) == (
        "disconnected",
        2,
        "user",
    )
    assert record.tokens_blob is None


@pytest.mark.parametrize("answer_lost", [False, True], ids=["failed", "answer-lost"])
async def test_a_refresh_failure_counts_once(
    store: RedisStore,
    direct: RedisStore,
    proxy: ReplyDroppingProxy,
    lost: bool,
    answer_lost: bool,
) -> None:
    await connect(store, "acct")

    arm(proxy, _REFRESH_FAILED, lost)
    failures = await store.record_refresh_failure(
        "acct",
        expected_generation=1,
        reason="token endpoint timed out",
        retry_at=time.time() + 5,
        now=time.time(),
        answer_lost=answer_lost,
    )
    assert failures == 1
    assert proxy.dropped == int(lost)
    assert await events(direct, "acct") == [
        ("CONNECTED", 1, ""),
        ("REFRESH_FAILED", 1, "token endpoint timed out"),
    ]
    record = await direct.get_account("acct")
    assert record is not None
    assert (record.failures, record.generation, record.connected) == (1, 1, True)
    assert record.answer_lost is answer_lost


async def test_a_lock_whose_reply_was_lost_is_still_acquired(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, lost: bool
) -> None:
    arm(proxy, _TRY_LOCK, lost)
    owner = await store.try_lock("acct", ttl_seconds=30)
    assert owner is not None  # the re-sent SET NX does not find its own lock "busy"
    assert proxy.dropped == int(lost)
    lock_key = direct.lock_key("acct")
    assert await direct.client.get(lock_key) == owner.encode()
    assert 0 < await direct.client.pttl(lock_key) <= 30_000

    assert await store.try_lock("acct", ttl_seconds=30) is None
    assert await direct.client.get(lock_key) == owner.encode()


async def test_a_flow_claim_whose_reply_was_lost_still_gets_the_flow(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, lost: bool, prefix: str
) -> None:
    flow = FlowRecord(
        flow_id="flow1",
        account_id="acct",
        provider=PROVIDER,
        redirect_uri="http://127.0.0.1/callback",
        state="state-1",
        verifier="v" * 43,
        expires_at=time.time() + 600,
    )
    await store.put_flow(flow, ttl_seconds=600)

    arm(proxy, TAKE_ONCE, lost)
    assert await store.claim_flow("flow1") == flow  # the re-sent claim is not "gone"
    assert proxy.dropped == int(lost)
    assert await direct.get_flow("flow1") is None
    # The claim key served the re-sent copy inside the call; then it is gone.
    claims = [key async for key in direct.client.scan_iter(match=f"{prefix}flow:flow1:*")]
    assert claims == []

    assert await store.claim_flow("flow1") is None  # another call finds nothing
    assert await direct.claim_flow("flow1") is None


async def test_the_client_does_resend_a_write_whose_reply_was_lost(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, prefix: str
) -> None:
    """Why the scripts need their op ids: a plain INCR through the same client runs twice."""
    key = f"{prefix}incr"
    proxy.drop_reply_after(key.encode())
    assert await store.client.incr(key) == 2
    assert proxy.dropped == 1
    assert await direct.client.get(key) == b"2"


async def test_a_resent_write_is_recognised_after_another_write_landed_in_between(
    direct: RedisStore,
) -> None:
    """The operation key, not a field of the account, remembers the first run: a re-sent
    failure record that arrives after another replica's write still counts once."""
    await connect(direct, "acct")
    op_key = direct.new_operation()

    async def record_failure(op: str) -> int:
        # Exactly what record_refresh_failure sends, with the operation key fixed.
        keys = [direct._account_key("acct"), direct.events_stream, op]
        args: list[str | int] = [
            "acct",
            "1",
            "503",
            repr(time.time() + 5),
            "1000",
            int(time.time() * 1000),
        ]
        return int(await direct._refresh_failed(keys=keys, args=[*args, "0", "", 60_000]))

    assert await record_failure(op_key) == 1
    assert await record_failure(direct.new_operation()) == 2  # another write, in between
    assert await record_failure(op_key) == 1  # the re-sent first one: its first answer
    failures = [e for e in await events(direct, "acct") if e[0] == "REFRESH_FAILED"]
    assert len(failures) == 2
    record = await direct.get_account("acct")
    assert record is not None
    assert record.failures == 2


async def test_a_web_login_state_whose_take_reply_was_lost_still_works(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, lost: bool, prefix: str
) -> None:
    """The web page's OAuth callback takes its state once (was a GETDEL: a re-sent copy
    answered "state mismatch" to a valid callback)."""
    sessions = SessionStore(store.client, prefix, ttl_seconds=600)
    _cookie, session = await sessions.create("admin")
    flow = PendingFlow(
        handle="h1",
        flow_id="f" * 32,
        account_id="acct",
        provider=PROVIDER,
        authorize_url="http://127.0.0.1/authorize",
        expires_at=time.time() + 600,
        via_callback=True,
    )
    await sessions.add_pending(session, flow, "state-xyz")

    arm(proxy, TAKE_ONCE, lost)
    taken = await sessions.take_state("state-xyz")
    assert proxy.dropped == int(lost)
    assert taken is not None
    assert taken[1] == flow
    assert await sessions.take_state("state-xyz") is None  # each state works once


async def test_key_writes_append_one_event_and_bump_the_version_once(
    store: RedisStore, direct: RedisStore, proxy: ReplyDroppingProxy, lost: bool
) -> None:
    keys, readback = KeyStore(store), KeyStore(direct)
    key_id = "gk-0123456789abcdef"

    arm(proxy, _CREATE_KEY, lost)
    created = await keys.create_key(
        key_id,
        name="ci",
        key_sha256="sha256:" + "0f" * 32,
        route=Route("acct"),
        limits=Limits(requests_per_minute=5),
        expires_at=0,
        now=time.time(),
    )
    assert created == await readback.get_key(key_id)  # not "id taken" by its own first run

    arm(proxy, _CHANGE_KEY, lost)
    changes = KeyChanges(name="renamed")
    # Expecting version 1: a re-sent copy is not refused as "no longer at version 1".
    assert await keys.update_key(key_id, changes, expected_version=1, now=time.time()) == 2

    arm(proxy, _CHANGE_KEY, lost)
    assert (
        await keys.revoke_key(key_id, expected_version=None, now=time.time()) == 3
    )  # not "revoked"
    assert proxy.dropped == 3 * int(lost)
    assert await events(direct, "acct") == [
        ("KEY_CHANGED", 1, "created"),
        ("KEY_CHANGED", 2, "updated"),
        ("KEY_CHANGED", 3, "revoked"),
    ]
    record = await readback.get_key(key_id)
    assert record is not None
    assert (record.name, record.version, record.revoked) == ("renamed", 3, True)
