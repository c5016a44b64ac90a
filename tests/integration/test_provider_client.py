"""The provider client tells a refresh that never left from one whose answer was lost
(DESIGN §1.2.1), against scripted loopback servers that do exactly one thing wrong.

Only the first kind is safe to retry: the second may have rotated the refresh token.
The split is made on whether the request was written, so a reset reads as "lost"
whether the peer processed the request or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from keyrelay.auth.config import ProviderConfig
from keyrelay.auth.core.tokens import FailureKind, TokenEndpointError, TokenSet
from keyrelay.auth.provider_client import ProviderClient
from tests.support.redis_server import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TOKENS = b'{"access_token": "a1", "token_type": "Bearer", "expires_in": 60, "refresh_token": "r2"}'


def answer(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", "content-type: application/json", *headers]
    head.append(f"content-length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def provider(url: str) -> ProviderConfig:
    return ProviderConfig(
        name="scripted",
        authorize_url="http://127.0.0.1/authorize",
        token_url=url,
        client_id="keyrelay",
        redirect_uris=("http://127.0.0.1/callback",),
    )


# A server that never answers lets go of its connection when the test is over.


@pytest.fixture
async def test_over() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()


@pytest.fixture
async def serve(test_over: asyncio.Event) -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []
    handlers: list[asyncio.Task[None]] = []

    async def start(handler: Handler) -> str:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.append(task)
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/token"

    yield start
    test_over.set()
    await asyncio.gather(*handlers, return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[ProviderClient]:
    # send_timeout is small on purpose: it must never end a sent call early.
    created = ProviderClient.create(send_timeout=0.2)
    yield created
    await created.aclose()


async def refresh(client: ProviderClient, url: str, answer_within: float) -> TokenSet:
    return await client.refresh(
        provider(url), refresh_token="r1", scopes=(), now=0.0, answer_within=answer_within
    )


async def failure_of(client: ProviderClient, url: str, answer_within: float = 2.0) -> FailureKind:
    with pytest.raises(TokenEndpointError) as caught:
        await refresh(client, url, answer_within)
    return caught.value.kind


async def test_nobody_listening_is_not_sent(client: ProviderClient) -> None:
    assert await failure_of(client, f"http://127.0.0.1:{free_port()}/token") is (
        FailureKind.NOT_SENT
    )


async def test_a_tls_handshake_that_fails_is_not_sent(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def plain_http(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    url = (await serve(plain_http)).replace("http://", "https://")
    assert await failure_of(client, url) is FailureKind.NOT_SENT


async def test_a_cut_after_the_request_arrived_is_an_answer_lost(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def read_then_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()  # RST, no answer

    assert await failure_of(client, await serve(read_then_cut)) is FailureKind.ANSWER_LOST


async def test_an_answer_cut_in_the_middle_is_an_answer_lost(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def half_an_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        full = answer("200 OK", TOKENS)
        writer.write(full[: len(full) - 10])
        await writer.drain()
        writer.close()

    assert await failure_of(client, await serve(half_an_answer)) is FailureKind.ANSWER_LOST


async def test_a_late_answer_inside_the_deadline_is_kept(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    """The answer comes 0.6 s after the request: three times the send timeout (the old
    per-call timeout, which cut a sent refresh at 10 s against a 30 s deadline)."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.6)
        writer.write(answer("200 OK", TOKENS))
        await writer.drain()
        writer.close()

    started = time.monotonic()
    tokens = await refresh(client, await serve(slow), answer_within=5.0)
    assert tokens.access_token == "a1"
    assert tokens.refresh_token == "r2"
    assert time.monotonic() - started >= 0.6


async def test_no_answer_by_the_deadline_is_an_answer_lost(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]], test_over: asyncio.Event
) -> None:
    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await test_over.wait()

    started = time.monotonic()
    assert await failure_of(client, await serve(silent), answer_within=0.8) is (
        FailureKind.ANSWER_LOST
    )
    waited = time.monotonic() - started
    assert 0.8 <= waited < 5, waited  # the deadline, not the 0.2 s send timeout


async def test_a_cancelled_call_after_sending_is_not_reported_as_not_sent(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]], test_over: asyncio.Event
) -> None:
    """Cancellation is the caller's business (the service never cancels a sent refresh);
    it propagates unchanged rather than as a retryable NOT_SENT."""
    arrived = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await test_over.wait()

    call = asyncio.create_task(refresh(client, await serve(silent), answer_within=5.0))
    await asyncio.wait_for(arrived.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_a_transient_answer_brings_its_retry_after(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = b'{"error": "temporarily_unavailable"}'
        writer.write(answer("503 Service Unavailable", body, "retry-after: 7"))
        await writer.drain()
        writer.close()

    with pytest.raises(TokenEndpointError) as caught:
        await refresh(client, await serve(busy), answer_within=2.0)
    assert caught.value.kind is FailureKind.TRANSIENT
    assert caught.value.status == 503
    assert caught.value.retry_after == 7.0


async def test_an_oversized_answer_is_transient_not_lost(
    client: ProviderClient, serve: Callable[[Handler], Awaitable[str]]
) -> None:
    """An answer arrived (too big to be tokens): the provider answered, nothing is lost."""

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer("200 OK", b" " * (2 << 20)))
        await writer.drain()
        writer.close()

    with pytest.raises(TokenEndpointError) as caught:
        await refresh(client, await serve(huge), answer_within=5.0)
    assert caught.value.kind is FailureKind.TRANSIENT
    assert caught.value.status == 200
