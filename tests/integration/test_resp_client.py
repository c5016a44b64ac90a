"""The limits store's Redis client (``gateway/resp_client.py``): a real redis-server
for what Redis does, a tiny fake TCP server for what it should never do (garbage,
silence, replies nobody asked for, a close mid-reply). The tests that matter for
ordering and failure run on both loops (asyncio's and uvloop, the gateway's)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import uvloop

from keyrelay.gateway.core.ratelimit import Subject
from keyrelay.gateway.core.usage import Usage
from keyrelay.gateway.limits_store import LimitsStore, LimitsUnavailable
from keyrelay.gateway.resp_client import (
    Address,
    RedisUnavailable,
    ReplyError,
    RespClient,
    encode,
    parse_url,
)
from keyrelay.limit_rules import Limits
from tests.support.certs import make_pki
from tests.support.redis_server import AclUser, RedisServer

PASSWORD = "client-secret"
USER = AclUser("limits", PASSWORD, rules=("reset", "on", f">{PASSWORD}", "~*", "+@all", "-ping"))
NOW = float((int(time.time()) // 60 + 1) * 60)
LOOPS = ["asyncio", "uvloop"]


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path_factory.mktemp("resp-redis"), acl_user=USER).start()
    yield running
    running.stop()


# -- a fake Redis: answers as told -----------------------------------------------------

Answer = Callable[[list[bytes]], bytes | None]  # a command -> bytes to write (None: nothing)
CLOSE = b"<close>"


class FakeRedis:
    """Reads RESP commands; ``answer`` decides what goes back (``CLOSE``: hang up)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    reply = self.answer(command)
                    if reply == CLOSE:
                        writer.close()
                        return
                    if reply is not None:
                        writer.write(reply)
        except ConnectionError:
            pass

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._handlers:  # each ends at its connection's end (not cancelled)
            await asyncio.wait(self._handlers, timeout=1)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Answer], Awaitable[tuple[FakeRedis, RespClient]]]]:
    made: list[tuple[FakeRedis, RespClient]] = []

    async def make(answer: Answer, **kwargs: Any) -> tuple[FakeRedis, RespClient]:
        redis = FakeRedis(answer)
        port = await redis.start()
        kwargs.setdefault("timeout", 0.3)
        client = RespClient(Address(port=port), **kwargs)
        made.append((redis, client))
        return redis, client

    yield make
    for redis, client in made:
        await client.close()
        await redis.close()


def pong(_: list[bytes]) -> bytes:
    return b"+PONG\r\n"


# -- encoding and URLs -----------------------------------------------------------------


def test_encode() -> None:
    assert encode("EVALSHA", b"ab", 12) == b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$2\r\n12\r\n"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:7000/2", Address("h", 7000, db=2)),
        (
            "redis://gw%3Auser:p%40ss@127.0.0.1/0",
            Address(username="gw:user", password="p@ss"),
        ),
        ("redis://:only@h", Address("h", password="only")),
        ("rediss://h:6380", Address("h", 6380, tls=True)),
        ("unix:///run/redis.sock?db=3", Address(path="/run/redis.sock", db=3)),
    ],
)
def test_parse_url(url: str, expected: Address) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "redis://, rediss:// or unix://"),
        ("redis://h/zero", "must be a number"),
        ("redis://h?socket_timeout=1", "unsupported Redis URL parameter"),
        ("unix://", "socket path"),
        ("redis://h:99999", "bad port"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


# -- against redis-server -------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_thousand_callers_get_their_own_replies(server: RedisServer, loop: str) -> None:
    async def main() -> None:
        client = RespClient.from_url(server.acl_url, timeout=5.0)
        try:
            replies = await asyncio.gather(*(client.execute("ECHO", i) for i in range(1000)))
            assert replies == [str(i).encode() for i in range(1000)]
            # Again, with a caller that gave up (cancelled) in the middle of them.
            sent = [client.send(encode("ECHO", i)) for i in range(1000)]
            sent[500].cancel()
            for i, future in enumerate(sent):
                if i != 500:
                    assert await future == str(i).encode()
            assert client.connections_made == 1
            assert client.pending == 0
        finally:
            await client.close()

    run(loop, main)


async def test_error_replies_and_acl_refusals(server: RedisServer) -> None:
    client = RespClient.from_url(server.acl_url, timeout=2.0)
    try:
        with pytest.raises(ReplyError, match=r"^NOPERM .*'ping'"):
            await client.execute("PING")
        with pytest.raises(ReplyError, match=r"^ERR unknown command"):
            await client.execute("NOSUCHCOMMAND")
        assert await client.execute("ECHO", "still") == b"still"  # the connection is fine
    finally:
        await client.close()


async def test_a_wrong_password_fails_every_call_with_the_reason(server: RedisServer) -> None:
    url = server.acl_url.replace(PASSWORD, "wrong")
    client = RespClient.from_url(url, timeout=2.0)
    try:
        calls = [client.send(encode("ECHO", i)) for i in range(3)]
        for call in calls:
            with pytest.raises(RedisUnavailable, match="AUTH refused: WRONGPASS"):
                await call
    finally:
        await client.close()


async def test_select_db(server: RedisServer) -> None:
    with server.client() as admin:
        admin.execute_command("SELECT", 3)
        admin.set("resp-db", "three")
    client = RespClient.from_url(server.acl_url.replace("/0", "/3"), timeout=2.0)
    try:
        assert await client.execute("GET", "resp-db") == b"three"
    finally:
        await client.close()
        with server.client() as admin:
            admin.execute_command("SELECT", 3)
            admin.delete("resp-db")


@pytest.mark.parametrize("loop", LOOPS)
def test_redis_killed_and_restarted(tmp_path: Path, loop: str) -> None:
    redis = RedisServer(tmp_path / "redis", acl_user=USER).start()

    async def main() -> None:
        client = RespClient.from_url(redis.acl_url, timeout=0.5)
        try:
            assert await client.execute("ECHO", "up") == b"up"
            redis.kill()
            for _ in range(3):  # lost, then refused, then backing off: each at once
                started = time.monotonic()
                with pytest.raises(RedisUnavailable):
                    await client.execute("ECHO", "down")
                assert time.monotonic() - started < 0.5
            redis.start()
            # The backoff is at most 1 s; a call waits for the next attempt when it
            # is due before the call's deadline, else fails at once.
            deadline = time.monotonic() + 5
            while True:
                try:
                    assert await client.execute("ECHO", "again") == b"again"
                    break
                except RedisUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            assert client.connections_made == 2
        finally:
            await client.close()
            redis.stop()

    run(loop, main)


async def test_the_store_loads_its_scripts_again_after_a_flush(server: RedisServer) -> None:
    store = LimitsStore.from_url(server.acl_url, prefix="resp:", timeout=2.0)
    key = Subject("key", "flushed", Limits(requests_per_minute=10))
    try:
        first = await store.admit([key], NOW)
        with server.client() as admin:
            admin.script_flush()
        second = await store.admit([key], NOW)
        assert first.lease is not None
        assert second.lease is not None
        assert second.decision.checks[0].used == 1
        with server.client() as admin:
            admin.script_flush()
        assert await store.finish(second.lease, Usage(1), 0.0, NOW)  # loaded again too
    finally:
        await store.close()


async def test_unix_socket(tmp_path: Path) -> None:
    socket = tmp_path / "redis.sock"
    redis = RedisServer(
        tmp_path / "redis", extra_args=("--unixsocket", str(socket), "--unixsocketperm", "700")
    ).start()
    client = RespClient.from_url(f"unix://{socket}", timeout=2.0)
    try:
        assert await client.execute("ECHO", "unix") == b"unix"
    finally:
        await client.close()
        redis.stop()


# -- hostile servers -------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_server_that_never_answers(loop: str) -> None:
    async def main() -> None:
        redis = FakeRedis(lambda _: None)
        client = RespClient(Address(port=await redis.start()), timeout=0.3)
        try:
            started = time.monotonic()
            calls = [client.send(encode("PING")) for _ in range(50)]
            for call in calls:
                with pytest.raises(RedisUnavailable, match=r"no reply within 0\.3 s"):
                    await call
            assert 0.3 <= time.monotonic() - started < 0.6
            assert client.pending == 0
            redis.answer = pong  # the next call gets a new connection
            assert await client.execute("PING") == b"PONG"
            assert redis.connections == 2
        finally:
            await client.close()
            await redis.close()

    run(loop, main)


async def test_garbage_fails_every_call_on_the_connection(fake: Any) -> None:
    _, client = await fake(lambda _: b"?not resp\r\n")
    calls = [client.send(encode("PING")) for _ in range(3)]
    for call in calls:
        with pytest.raises(RedisUnavailable, match="not RESP"):
            await call


async def test_a_reply_nobody_asked_for(fake: Any) -> None:
    _, client = await fake(lambda _: b"+PONG\r\n+PONG\r\n")
    # The first call gets the first reply; the second reply has no call: closed.
    assert await client.execute("PING") == b"PONG"
    await asyncio.sleep(0.05)
    assert client.pending == 0
    assert await client.execute("PING") == b"PONG"  # a new connection
    assert client.connections_made == 2


async def test_a_close_resends_once_what_may_be_resent(fake: Any) -> None:
    redis, client = await fake(lambda _: CLOSE)
    with pytest.raises(RedisUnavailable, match="closed by the server"):
        await client.execute("ECHO", "once")
    with pytest.raises(RedisUnavailable, match="closed by the server"):
        await client.send(encode("ECHO", "twice"), resend=True)
    sent = [command[1] for command in redis.commands]
    assert sent == [b"once", b"twice", b"twice"]


async def test_a_close_mid_reply(fake: Any) -> None:
    half = {"sent": False}

    def partial(_: list[bytes]) -> bytes:
        if half["sent"]:
            return CLOSE
        half["sent"] = True
        return b"$10\r\nabc"  # then the second command closes the connection

    _, client = await fake(partial)
    first = client.send(encode("ECHO", "partial"))
    await asyncio.sleep(0.05)
    second = client.send(encode("ECHO", "closes"))
    for call in (first, second):
        with pytest.raises(RedisUnavailable, match="closed by the server"):
            await call


async def test_at_most_max_pending_calls(fake: Any) -> None:
    _, client = await fake(lambda _: None, max_pending=10)
    calls = [client.send(encode("PING")) for _ in range(10)]
    with pytest.raises(RedisUnavailable, match=r"10 calls are already waiting.*max_pending = 10"):
        client.send(encode("PING"))
    for call in calls:
        with pytest.raises(RedisUnavailable):
            await call


async def test_nothing_listening_backs_off() -> None:
    redis = FakeRedis(pong)
    port = await redis.start()
    await redis.close()  # the port is free: connections are refused
    client = RespClient(Address(port=port), timeout=0.2)
    try:
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(RedisUnavailable):
                await client.execute("PING")
        assert time.monotonic() - started < 1.0
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("reply", "operation"),
    [
        (b"+OK\r\n", "admit"),
        (b"*2\r\n:1\r\n$1\r\nx\r\n", "admit"),
        (b"*5\r\n:1\r\n:0\r\n:0\r\n:0\r\n:0\r\n", "admit"),  # no ticket count
        (b"*6\r\n:1\r\n:0\r\n:0\r\n:0\r\n:0\r\n:129\r\n", "admit"),  # > GRANT_TICKETS
        (b"*6\r\n:1\r\n:0\r\n:0\r\n:0\r\n:0\r\n:-1\r\n", "admit"),
        (b"*1\r\n:2\r\n", "admit"),  # a re-sent copy's reply without its tickets
        (b"*2\r\n:3\r\n:0\r\n", "admit"),
        (b":7\r\n", "finish"),
        (b"-ERR boom\r\n", "finish"),
    ],
)
async def test_the_store_refuses_unexpected_replies(
    fake: Any, reply: bytes, operation: str
) -> None:
    good_admit = b"*6\r\n:1\r\n:0\r\n:0\r\n:0\r\n:0\r\n:0\r\n"

    def answer(command: list[bytes]) -> bytes:
        admit = command[1] == store._admit.sha.encode()
        if operation == "admit":
            return reply if admit else b":1\r\n"
        return good_admit if admit else reply

    _, client = await fake(answer)
    store = LimitsStore(client, prefix="resp:")  # (answer reads it when called)
    key = Subject("key", "odd", Limits(requests_per_minute=10))
    if operation == "admit":
        with pytest.raises(LimitsUnavailable, match=r"admit failed.*unexpected reply"):
            await store.admit([key], NOW)
        return
    admission = await store.admit([key], NOW)
    assert admission.lease is not None
    with pytest.raises(LimitsUnavailable, match=r"finish failed.*(unexpected reply|ERR boom)"):
        await store.finish(admission.lease, Usage(1), 0.0, NOW)


async def test_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(pki.server_cert, pki.server_key)
    redis = FakeRedis(pong)
    port = await redis.start(served)
    trusting = ssl.create_default_context(cafile=str(pki.ca_cert))
    client = RespClient(Address("localhost", port, tls=True), timeout=2.0, ssl_context=trusting)
    untrusting = RespClient(Address("localhost", port, tls=True), timeout=2.0)
    try:
        assert await client.execute("PING") == b"PONG"
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            await untrusting.execute("PING")
    finally:
        await client.close()
        await untrusting.close()
        await redis.close()
