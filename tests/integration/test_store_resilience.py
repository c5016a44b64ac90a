"""Fencing, Redis restarts, secrets at rest and in logs, and misconfiguration."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc import aio

from keyrelay.auth.config import parse_auth_config, parse_encryption_keys
from keyrelay.auth.rpc.server import start_server
from keyrelay.auth.store.crypto import TokenCipher
from keyrelay.auth.store.redis_store import (
    EVENTS_BLOCK_MS,
    SOCKET_TIMEOUT_SECONDS,
    RedisStore,
    StoredTokens,
)
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import AuthFactory, rpc_code
from tests.integration.test_auth_flow import connect
from tests.support.oidc import CONFIDENTIAL_CLIENT_ID, DEFAULT_CLIENT_SECRET, OidcServer
from tests.support.redis_server import RedisServer
from tests.support.stack import (
    ENCRYPTION_KEYS,
    PROVIDER,
    admin_md,
    auth_config_data,
    auth_env,
    gateway_md,
    write_replica_configs,
)

EV = auth_pb2.AccountEvent


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    cipher = TokenCipher(parse_encryption_keys(ENCRYPTION_KEYS, "test"))
    store = RedisStore.from_url(
        redis_server.url, cipher, prefix=prefix, events_stream=f"{prefix}events"
    )
    yield store
    await store.close()


async def connect_with_tokens(store: RedisStore, account_id: str) -> None:
    await store.connect(
        account_id,
        provider=PROVIDER,
        scopes=["openid"],
        tokens=StoredTokens("access-0", "refresh-0"),
        token_type="Bearer",
        expires_at=1.0,
        now=0.0,
    )


async def test_a_holder_stalled_past_its_lease_is_fenced_out(store: RedisStore) -> None:
    await connect_with_tokens(store, "fenced")
    stalled_owner = await store.try_lock("fenced", ttl_seconds=0.2)
    assert stalled_owner is not None
    stalled_view = await store.get_account("fenced")
    assert stalled_view is not None
    assert await store.try_lock("fenced", ttl_seconds=5) is None  # held

    await asyncio.sleep(0.3)  # the stalled holder's lease runs out
    fresh_owner = await store.try_lock("fenced", ttl_seconds=5)
    assert fresh_owner is not None
    generation = await store.store_refreshed(
        "fenced",
        expected_generation=stalled_view.generation,
        tokens=StoredTokens("access-1", "refresh-1"),
        token_type="Bearer",
        expires_at=100.0,
        scopes=["openid"],
        now=1.0,
    )
    assert generation == stalled_view.generation + 1

    # The stalled holder wakes up with the generation it read before its call.
    late_write = await store.store_refreshed(
        "fenced",
        expected_generation=stalled_view.generation,
        tokens=StoredTokens("access-late", "refresh-late"),
        token_type="Bearer",
        expires_at=200.0,
        scopes=["openid"],
        now=2.0,
    )
    assert late_write == 0
    assert (
        await store.disconnect(
            "fenced", reason="invalid_grant", expected_generation=stalled_view.generation, now=2.0
        )
        == 0
    )
    assert (
        await store.record_refresh_failure(
            "fenced",
            expected_generation=stalled_view.generation,
            reason="late",
            retry_at=9.0,
            now=2.0,
        )
        == 0
    )
    assert not await store.extend_lock("fenced", stalled_owner, 5)
    assert not await store.release_lock("fenced", stalled_owner)
    assert await store.lock_held("fenced")  # the fresh holder's lock survived

    current = await store.get_account("fenced")
    assert current is not None
    assert current.connected
    assert current.generation == generation
    assert store.decrypt_tokens(current) == StoredTokens("access-1", "refresh-1")
    events = await store.read_events("0-0", block_ms=0)
    assert [e.kind for e in events] == ["CONNECTED", "REFRESHED"]
    assert await store.release_lock("fenced", fresh_owner)


async def test_the_refreshed_write_releases_the_holders_lock_in_the_same_step(
    store: RedisStore,
) -> None:
    """Found by tests/e2e/test_cluster.py: a replica killed right after writing a
    refresh, before its separate release, left a lease that every other replica
    waited out (lock_ttl) before it could refresh the then-expiring token."""
    await connect_with_tokens(store, "released")
    view = await store.get_account("released")
    assert view is not None

    def write(generation: int, owner: str) -> Any:
        return store.store_refreshed(
            "released",
            expected_generation=generation,
            tokens=StoredTokens(f"access-{generation}", f"refresh-{generation}"),
            token_type="Bearer",
            expires_at=100.0,
            scopes=["openid"],
            now=1.0,
            lock_owner=owner,
        )

    owner = await store.try_lock("released", ttl_seconds=30)
    assert owner is not None
    generation = await write(view.generation, owner)
    assert generation == view.generation + 1
    assert not await store.lock_held("released")  # nothing left for a dead holder to leave

    # Another holder's lock is never released by a write, nor by a fenced-out one.
    other = await store.try_lock("released", ttl_seconds=30)
    assert other is not None
    assert await write(view.generation, other) == 0  # fenced out: nothing written
    assert await store.lock_held("released")
    assert await write(generation, "not-the-owner") == generation + 1
    assert await store.lock_held("released")
    assert await store.release_lock("released", other)


async def test_a_quiet_event_stream_read_ends_empty_before_the_socket_timeout(
    store: RedisStore,
) -> None:
    """A blocking XREAD as long as the read timeout made every quiet watch fail."""
    options = store.client.connection_pool.connection_kwargs
    assert EVENTS_BLOCK_MS / 1000 < options["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
    assert await store.read_events(await store.last_event_id()) == []


async def test_a_second_disconnect_adds_no_event(store: RedisStore) -> None:
    await store.connect(
        "twice",
        provider=PROVIDER,
        scopes=[],
        tokens=StoredTokens("a", None),
        token_type="Bearer",
        expires_at=1.0,
        now=0.0,
    )
    assert await store.disconnect("twice", reason="user", expected_generation=None, now=1) == 2
    assert await store.disconnect("twice", reason="user", expected_generation=None, now=1) == 0
    events = await store.read_events("0-0", block_ms=0)
    assert [e.kind for e in events] == ["CONNECTED", "DISCONNECTED"]
    record = await store.get_account("twice")
    assert record is not None
    assert record.tokens_blob is None


async def test_redis_restart_keeps_accounts_and_the_service_reconnects(
    tmp_path: Path, oidc: OidcServer, prefix: str
) -> None:
    own_redis = RedisServer(tmp_path / "redis").start()
    factory = AuthFactory(own_redis.url, oidc, prefix)
    try:
        _, stub = await factory.start()
        first_account = await connect(stub, "durable", login="durable-user")
        before = await stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="durable"), metadata=gateway_md()
        )

        own_redis.kill()  # SIGKILL: only the AOF survives
        with pytest.raises(aio.AioRpcError) as info:
            await stub.GetToken(
                auth_pb2.GetTokenRequest(account_id="durable"), metadata=gateway_md(), timeout=60
            )
        assert rpc_code(info.value) == grpc.StatusCode.UNAVAILABLE
        assert "Redis" in (info.value.details() or "")
        own_redis.start()

        after = await stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="durable"), metadata=gateway_md()
        )
        assert after.access_token == before.access_token
        assert after.generation == first_account.generation
        refreshed = await stub.GetToken(
            auth_pb2.GetTokenRequest(account_id="durable", stale_generation=after.generation),
            metadata=gateway_md(),
        )
        assert refreshed.generation == after.generation + 1
        assert oidc.userinfo(refreshed.access_token).status_code == 200
        listed = await stub.ListAccounts(auth_pb2.ListAccountsRequest(), metadata=admin_md())
        assert [a.account_id for a in listed.accounts] == ["durable"]
    finally:
        await factory.close()
        own_redis.stop()


def every_stored_byte(client: redis.Redis, prefix: str) -> list[bytes]:
    """Every key, field and value under the prefix (redis-py's reply types are loose)."""
    blobs: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}*"):
        blobs.append(key)
        kind = client.type(key)
        if kind == b"hash":
            for field, value in client.hgetall(key).items():
                blobs += [field, value]
        elif kind == b"string":
            blobs.append(client.get(key) or b"")
        elif kind == b"set":
            blobs += list(client.smembers(key))
        elif kind == b"stream":
            for entry_id, fields in client.xrange(key) or []:
                blobs.append(entry_id)
                for field, value in (fields or {}).items():
                    blobs += [field, value]
    return blobs


async def test_no_plaintext_token_in_redis_aof_or_logs(
    tmp_path: Path, oidc: OidcServer, prefix: str
) -> None:
    own_redis = RedisServer(tmp_path / "redis").start()
    data = auth_config_data(own_redis.url, oidc, prefix=prefix, log_level="debug")
    (replica,) = write_replica_configs(tmp_path, 1, data)
    replica.start()
    cipher = TokenCipher(parse_encryption_keys(ENCRYPTION_KEYS, "test"))
    seen_tokens: list[str] = []
    try:
        async with aio.insecure_channel(replica.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await connect(stub, "secret", login="secret-user")
            with own_redis.client() as client:
                seen_tokens += decrypted_tokens(client, cipher, prefix, "secret")
                first = await stub.GetToken(
                    auth_pb2.GetTokenRequest(account_id="secret", stale_generation=1),
                    metadata=gateway_md(),
                )
                seen_tokens += decrypted_tokens(client, cipher, prefix, "secret")
                assert first.access_token in seen_tokens
                assert len(set(seen_tokens)) == 4  # two access and two refresh tokens
                stored = every_stored_byte(client, prefix)
        aof = b"".join(p.read_bytes() for p in (tmp_path / "redis").rglob("*.aof*"))
        assert len(aof) > 0
        log = replica.log()
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        # The log was written, at debug level.
        assert any(line["msg"] == "token refreshed" for line in lines)
        for token in seen_tokens:
            secret = token.encode()
            assert not any(secret in blob for blob in stored), "plaintext token in Redis"
            assert secret not in aof, "plaintext token in the AOF file"
            assert token not in log, "token in the service log"
    finally:
        replica.stop()
        own_redis.stop()


def decrypted_tokens(
    client: redis.Redis, cipher: TokenCipher, prefix: str, account: str
) -> list[str]:
    blob = client.hget(f"{prefix}account:{account}", "tokens")
    assert isinstance(blob, bytes)
    data = json.loads(cipher.decrypt(f"account:{account}", blob))
    return [data["a"], data["r"]]


async def test_invalid_client_on_refresh_never_disconnects(
    redis_server: RedisServer, oidc: OidcServer, prefix: str, tmp_path: Path
) -> None:
    def confidential_config(secret: str) -> dict[str, object]:
        data = auth_config_data(redis_server.url, oidc, prefix=prefix)
        provider = data["providers"][PROVIDER]
        provider["client_id"] = CONFIDENTIAL_CLIENT_ID
        secret_file = tmp_path / f"secret-{len(secret)}"
        secret_file.write_text(secret + "\n")
        provider["client_secret"] = {"file": str(secret_file)}
        data["auth"]["refresh_backoff_base_seconds"] = 0.05
        # The good replica forces a refresh right after the bad one's: no cool-down.
        data["auth"]["forced_refresh_cooldown_seconds"] = 0
        return data

    good = await start_server(
        parse_auth_config(confidential_config(DEFAULT_CLIENT_SECRET), auth_env())
    )
    bad = await start_server(parse_auth_config(confidential_config("wrong-secret!"), auth_env()))
    try:
        async with (
            aio.insecure_channel(f"127.0.0.1:{good.port}") as good_channel,
            aio.insecure_channel(f"127.0.0.1:{bad.port}") as bad_channel,
        ):
            good_stub = auth_pb2_grpc.AuthServiceStub(good_channel)
            bad_stub = auth_pb2_grpc.AuthServiceStub(bad_channel)
            account = await connect(good_stub, "misconf", login="misconf-user")
            served = await bad_stub.GetToken(
                auth_pb2.GetTokenRequest(account_id="misconf", stale_generation=1),
                metadata=gateway_md(),
            )
            assert served.generation == account.generation  # the old, still valid token
            state = await bad_stub.GetAccount(
                auth_pb2.GetAccountRequest(account_id="misconf"), metadata=admin_md()
            )
            assert state.status == auth_pb2.Account.CONNECTED
            assert "invalid_client" in state.last_error
            await asyncio.sleep(0.2)
            fixed = await good_stub.GetToken(
                auth_pb2.GetTokenRequest(account_id="misconf", stale_generation=1),
                metadata=gateway_md(),
            )
            assert fixed.generation == account.generation + 1
    finally:
        await good.stop(0.2)
        await bad.stop(0.2)
