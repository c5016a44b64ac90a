"""The reply-dropping TCP proxy of the tests, against a real Redis."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import ReplyDroppingProxy


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[ReplyDroppingProxy]:
    async with ReplyDroppingProxy("127.0.0.1", redis_server.port) as running:
        yield running


@pytest.fixture
async def direct(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client straight to Redis, to see what Redis holds whatever the proxy did."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def client_via(proxy: ReplyDroppingProxy, *, retries: int) -> aioredis.Redis:
    if retries:
        return aioredis.Redis.from_url(
            proxy.url,
            retry=Retry(NoBackoff(), retries),
            retry_on_error=[RedisConnectionError],
        )
    return aioredis.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), 0))


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """What arrives until the proxy closes the connection (a reset counts as a close)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=5)
    except ConnectionResetError:
        return b""


async def test_commands_pipelines_and_large_values_pass_through_untouched(
    proxy: ReplyDroppingProxy, direct: aioredis.Redis, prefix: str
) -> None:
    client = client_via(proxy, retries=0)
    try:
        assert await client.set(f"{prefix}plain", b"value") is True
        assert await client.get(f"{prefix}plain") == b"value"

        async with client.pipeline(transaction=True) as pipe:
            pipe.set(f"{prefix}p1", 1)
            pipe.incr(f"{prefix}p1")
            pipe.get(f"{prefix}p1")
            pipe.rpush(f"{prefix}list", b"a", b"b")
            pipe.lrange(f"{prefix}list", 0, -1)
            assert await pipe.execute() == [True, 2, b"2", 2, [b"a", b"b"]]

        big = os.urandom(1 << 20)
        assert await client.set(f"{prefix}big", big) is True
        assert await client.get(f"{prefix}big") == big
        assert await direct.get(f"{prefix}big") == big
    finally:
        await client.aclose()
    assert proxy.dropped == 0


async def test_a_lost_reply_fails_a_client_without_retries_though_redis_ran_it(
    proxy: ReplyDroppingProxy, direct: aioredis.Redis, prefix: str
) -> None:
    key = f"{prefix}incr-once"
    proxy.drop_reply_after(key.encode())
    client = client_via(proxy, retries=0)
    bystander = client_via(proxy, retries=0)
    try:
        # Other connections and other commands are relayed while the proxy is armed.
        assert await bystander.set(f"{prefix}other", b"x") is True
        assert await client.get(f"{prefix}other") == b"x"
        assert proxy.dropped == 0

        with pytest.raises(RedisConnectionError):
            await client.incr(key)
        assert await direct.get(key) == b"1"
        assert proxy.dropped == 1

        # Armed once: the next call reconnects through the proxy and gets its reply.
        assert await client.incr(key) == 2
        assert await bystander.get(f"{prefix}other") == b"x"
    finally:
        await client.aclose()
        await bystander.aclose()
    assert proxy.dropped == 1


async def test_a_retrying_client_runs_a_write_twice_when_its_reply_is_lost(
    proxy: ReplyDroppingProxy, direct: aioredis.Redis, prefix: str
) -> None:
    """The double-write hazard: INCR retried on ConnectionError after Redis ran it."""
    key = f"{prefix}incr-retried"
    proxy.drop_reply_after(key.encode())
    client = client_via(proxy, retries=3)
    try:
        assert await client.incr(key) == 2
    finally:
        await client.aclose()
    assert await direct.get(key) == b"2"
    assert proxy.dropped == 1


async def test_a_needle_split_across_two_reads_still_matches(
    proxy: ReplyDroppingProxy, direct: aioredis.Redis, prefix: str
) -> None:
    key = f"{prefix}split-needle".encode()
    command = b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key), key)
    cut = command.index(key) + len(key) // 2
    proxy.drop_reply_after(key)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(command[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)  # so the proxy reads the halves apart
        writer.write(command[cut:])
        await writer.drain()
        assert await read_to_end(reader) == b""  # closed without the reply
    finally:
        writer.close()
        await writer.wait_closed()
    assert await direct.get(key) == b"1"
    assert proxy.dropped == 1


async def test_close_ends_every_connection_and_leaves_no_task(redis_server: RedisServer) -> None:
    before = asyncio.all_tasks()
    proxy = ReplyDroppingProxy("127.0.0.1", redis_server.port)
    await proxy.start()
    client = client_via(proxy, retries=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        assert await client.ping() is True
        writer.write(b"PING\r\n")
        await writer.drain()
        assert await reader.readline() == b"+PONG\r\n"

        await proxy.close()

        assert asyncio.all_tasks() - before == set()
        assert await read_to_end(reader) == b""
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
    finally:
        writer.close()
        await writer.wait_closed()
        await client.aclose()
