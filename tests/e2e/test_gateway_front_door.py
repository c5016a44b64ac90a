"""The gateway's front door against hostile clients (issue 9, rows 2, 3 and 8).

Each test first reproduced its row on the old worker (uvicorn's stock httptools
protocol): an endless header read whole, connections that never send a byte
kept forever, file descriptors run out, a body over the limit read and
discarded to its end. Now every one of those has a bound (``[gateway]``
``max_header_bytes``, ``max_header_count``, ``header_timeout_seconds``,
``first_byte_timeout_seconds``, ``max_connections``, and the connection closed
after an answer that came before the body's end) and the tests hold it. So
does a body that never ends (``body_timeout_seconds``).

The tests that measure the worker's memory or file descriptors run
``keyrelay gateway serve`` as its own process (``/proc/<pid>``); the others
serve the gateway on the test's loop. A normal request is the official
``anthropic`` SDK through the gateway to the fake upstream. No timing is
asserted: deadlines are generous and only bound how long a test may wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.keys import key_hash
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import (
    API_KEY_KEY,
    GatewayProcess,
    RunningGateway,
    gateway_env,
    start_gateway,
)

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
KiB = 1 << 10
MiB = 1 << 20
# The client's send buffer in the floods: small, so that what the client managed
# to write is close to what the gateway accepted (the kernel doubles it).
SNDBUF = 64 * KiB


def config_data(upstream_url: str, **gateway: Any) -> dict[str, Any]:
    """One ``api_key`` route (no auth service needed) to the fake upstream."""
    return {
        "gateway": {"listen": "127.0.0.1:0", "log_level": "info", **gateway},
        "upstreams": {
            "default": {"url": upstream_url, "read_timeout_seconds": 10, "max_connections": 8}
        },
        "keys": [
            {
                "name": "apikey",
                "hash": key_hash(API_KEY_KEY),
                "mode": "api_key",
                "api_key": {"env": "KR_UPSTREAM_KEY"},
            }
        ],
    }


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = await FakeUpstream().start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def in_process(upstream: FakeUpstream, **gateway: Any) -> AsyncIterator[RunningGateway]:
    config = parse_gateway_config(config_data(upstream.url, **gateway), gateway_env())
    running = await start_gateway(config)
    try:
        yield running
    finally:
        await running.stop()


def serve_argv(config_path: Path, nofile: tuple[int, int] | None = None) -> list[str]:
    """``keyrelay gateway serve``; ``nofile``: its RLIMIT_NOFILE (soft, hard), set
    before the interpreter starts (then exec)."""
    serve = [sys.executable, "-m", "keyrelay", "gateway", "serve", "--config", str(config_path)]
    if nofile is None:
        return serve
    setup = (
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, {nofile}); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", setup, *serve]


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path, upstream_url: str, *, nofile: tuple[int, int] | None = None, **gateway: Any
) -> Iterator[GatewayProcess]:
    """``keyrelay gateway serve`` in its own process, serving once ready."""
    gw = GatewayProcess.write(tmp_path, "gateway", config_data(upstream_url, **gateway))
    with open(gw.log_path, "ab") as log:
        gw.process = subprocess.Popen(
            serve_argv(gw.config_path, nofile),
            env={**os.environ, **gateway_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def rss(pid: int) -> int:
    """Resident set size in bytes, from ``/proc/<pid>/status``."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1)) * KiB


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """The peak of a number sampled every 50 ms while a block runs."""

    def __init__(self, read: Any) -> None:
        self._read = read
        self.peak = read()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._read())
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, self._read())


async def connect(
    port: int, *, sndbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def read_to_end(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, bool]:
    """Everything until the peer closes: (bytes, closed). ``closed`` is False when
    the connection was still open after ``seconds``; a reset counts as closed."""
    data = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return data, False
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                return data, True
            data += chunk
    except TimeoutError:
        return data, False
    except ConnectionError:
        return data, True


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def normal_request(url: str) -> None:
    """The official SDK through the gateway to the fake upstream."""
    async with anthropic.AsyncAnthropic(
        base_url=url, api_key=API_KEY_KEY, max_retries=0, timeout=30.0
    ) as client:
        message = await client.messages.create(**SIMPLE)
    assert message.stop_reason == "end_turn"


def status_of(answer: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def error_of(answer: bytes) -> dict[str, Any]:
    """The JSON error of a whole HTTP/1.1 answer with a Content-Length."""
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    assert length, head
    parsed: dict[str, Any] = json.loads(body[: int(length.group(1))])
    assert parsed["type"] == "error", parsed
    error: dict[str, Any] = parsed["error"]
    return error


def header_of(answer: bytes, name: bytes) -> bytes | None:
    head = answer.partition(b"\r\n\r\n")[0]
    match = re.search(rb"(?im)^" + re.escape(name) + rb": *([^\r\n]*)\r?$", head)
    return match.group(1) if match else None


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


async def metrics_text(url: str) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    return response.text


# -- row 2: one endless request header ------------------------------------------------------

FLOOD_BYTES = 24 * MiB  # per connection: the old worker took all of it without a word
FLOOD_SECONDS = 20.0


async def flood_header(port: int) -> tuple[int, bytes, bool]:
    """A request line, then one header whose value never ends, no gateway key.

    Returns (bytes the client managed to write, the answer, whether the gateway
    closed the connection before the client gave up)."""
    reader, writer = await connect(port, sndbuf=SNDBUF)
    loop = asyncio.get_running_loop()
    answer = b""
    written = 0
    closed = False

    async def collect() -> None:
        nonlocal answer, closed
        answer, closed = await read_to_end(reader, FLOOD_SECONDS + 10)

    reading = asyncio.create_task(collect())
    try:
        writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\nx-flood: ")
        chunk = b"a" * (64 * KiB)
        deadline = loop.time() + FLOOD_SECONDS
        while written < FLOOD_BYTES and loop.time() < deadline and not reading.done():
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), deadline - loop.time())
            written += len(chunk)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        if written >= FLOOD_BYTES or loop.time() >= deadline:
            reading.cancel()  # the client gives up: the gateway took everything
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await close(writer)
    return written, answer, closed


async def test_endless_header_from_several_connections_is_cut_at_the_header_limit(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Row 2: 4 connections each send one endless header (no key). Each is
    answered 431 (or reset) and closed after at most the header limit plus socket
    buffers; the worker's RSS stays within 40 MB of where it was; a normal request
    through the SDK is served meanwhile."""
    with gateway_process(tmp_path, upstream.url) as gw:  # the default header limit: 32 KiB
        assert gw.process is not None
        pid = gw.process.pid
        await normal_request(gw.url)  # warm: the first request's allocations are not the flood's
        before = rss(pid)
        async with Sampler(lambda: rss(pid)) as peak:
            floods = [asyncio.create_task(flood_header(gw.port)) for _ in range(4)]
            await asyncio.sleep(0.5)
            await normal_request(gw.url)
            results = await asyncio.gather(*floods)
        for written, answer, closed in results:
            assert closed, f"the gateway took {written} bytes of one header and kept reading"
            assert written < 8 * MiB, f"the client wrote {written} bytes of one header"
            if answer:  # else: reset before the client read the answer
                assert status_of(answer) == 431, answer[:300]
        growth = peak.peak - before
        assert growth < 40 * MiB, f"RSS grew by {growth / MiB:.0f} MB"
        await normal_request(gw.url)
        text = await metrics_text(gw.url)
        assert metric(text, "keyrelay_gateway_rejected_requests_total", reason="header_bytes") >= 4
        assert gw.log().count('"header_bytes"') <= 2, "the limit's log line is rate-limited"


# -- row 3: idle and slow connections -------------------------------------------------------


async def dribble_header(port: int, seconds: float) -> tuple[bytes, bool]:
    """A request head sent one byte a second (never finished within ``seconds``):
    (the answer, whether the gateway closed the connection)."""
    reader, writer = await connect(port)
    head = b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\nx-slow: " + b"s" * 1000
    answer = b""
    closed = False

    async def collect() -> None:
        nonlocal answer, closed
        answer, closed = await read_to_end(reader, seconds)

    reading = asyncio.create_task(collect())
    try:
        for byte in head:
            if reading.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.wait([reading], timeout=1.0)
    except ConnectionError:
        pass
    finally:
        await reading
        await close(writer)
    return answer, closed


async def test_slowloris_connections_are_closed_and_requests_still_served(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Row 3: 300 connections that never send a byte and 20 that send their headers
    one byte a second. The silent ones are closed after ``first_byte_timeout_seconds``
    without an answer, the slow ones get 408 after ``header_timeout_seconds``; a
    normal request is served meanwhile and the RSS stays within 40 MB."""
    with gateway_process(
        tmp_path, upstream.url, first_byte_timeout_seconds=2, header_timeout_seconds=3
    ) as gw:
        assert gw.process is not None
        pid = gw.process.pid
        await normal_request(gw.url)
        before = rss(pid)
        async with Sampler(lambda: rss(pid)) as peak:
            silent = [await connect(gw.port) for _ in range(300)]
            slow = [asyncio.create_task(dribble_header(gw.port, 25.0)) for _ in range(20)]
            await normal_request(gw.url)
            try:
                closes = await asyncio.gather(*(read_to_end(r, 25.0) for r, _ in silent))
            finally:
                for _, writer in silent:
                    await close(writer)
            dribbled = await asyncio.gather(*slow)
        assert [c for c in closes if c != (b"", True)] == [], "silent connections kept open"
        for answer, closed in dribbled:
            assert closed, f"a header sent one byte a second was still read: {answer[:100]!r}"
            assert status_of(answer) == 408, answer[:300]
            assert header_of(answer, b"connection") == b"close"
            assert error_of(answer)["type"] == "invalid_request_error"
        growth = peak.peak - before
        assert growth < 40 * MiB, f"RSS grew by {growth / MiB:.0f} MB"
        await normal_request(gw.url)
        text = await metrics_text(gw.url)
        assert metric(text, "keyrelay_gateway_closed_connections_total", reason="idle") >= 300
        assert (
            metric(text, "keyrelay_gateway_rejected_requests_total", reason="header_timeout") >= 20
        )


async def test_connections_over_the_worker_limit_get_503_and_fds_do_not_run_out(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Row 3: a worker allowed 512 file descriptors and ``max_connections = 200``
    meets 600 connections that never send a byte. The 400 beyond the limit are
    answered 503 at once and closed; the worker's descriptors stay below its
    limit; a normal request is answered 503 (in the Anthropic shape) while the
    200 are held, and served once they go."""
    with gateway_process(
        tmp_path,
        upstream.url,
        nofile=(512, 512),
        max_connections=200,
        first_byte_timeout_seconds=60,
    ) as gw:
        assert gw.process is not None
        pid = gw.process.pid
        connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            async with Sampler(lambda: open_fds(pid)) as fds:
                for _ in range(600):
                    connections.append(await connect(gw.port))
                # The held ones send nothing and hear nothing: give the refused time to
                # hear their answer and their close.
                answers = await asyncio.gather(*(read_to_end(r, 5.0) for r, _ in connections))
                async with anthropic.AsyncAnthropic(
                    base_url=gw.url, api_key=API_KEY_KEY, max_retries=0, timeout=30
                ) as client:
                    with pytest.raises(anthropic.APIStatusError) as refused:
                        await client.messages.create(**SIMPLE)
            refused_answers = [a for a, closed in answers if closed]
            held = [a for a, closed in answers if not closed]
            # 200 at most; a few fewer if the readiness probes' connections were
            # not yet seen closed when these came.
            assert 190 <= len(held) <= 200, f"{len(held)} connections held, 200 allowed"
            assert held == [b""] * len(held)
            assert len(refused_answers) == 600 - len(held)
            assert {status_of(a) for a in refused_answers} == {503}, refused_answers[:3]
            assert error_of(refused_answers[0])["type"] == "overloaded_error"
            assert header_of(refused_answers[0], b"retry-after") is not None
            assert refused.value.status_code == 503
            assert fds.peak < 512 - 16, f"the worker had {fds.peak} descriptors open of 512"
        finally:
            for _, writer in connections:
                await close(writer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # until the worker has seen the held connections go
            try:
                await normal_request(gw.url)
                break
            except anthropic.APIStatusError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        text = await metrics_text(gw.url)
        assert metric(text, "keyrelay_gateway_refused_connections_total") >= 400
        assert metric(text, "keyrelay_gateway_open_connections") <= 2
        assert gw.log().count("connection limit") <= 2, "the limit's log line is rate-limited"


def soft_nofile(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)
    assert match, limits
    return int(match.group(1))


def test_the_worker_raises_its_descriptor_limit_to_what_its_limits_need(tmp_path: Path) -> None:
    # Soft 256, hard 4096: max_connections 500 + 8 upstream + 128 reserved = 636.
    with gateway_process(
        tmp_path, "http://127.0.0.1:9", nofile=(256, 4096), max_connections=500
    ) as gw:
        assert gw.process is not None
        assert soft_nofile(gw.process.pid) == 636


def test_a_worker_that_may_not_open_enough_descriptors_does_not_start(tmp_path: Path) -> None:
    config = config_data("http://127.0.0.1:9", max_connections=1000)
    gw = GatewayProcess.write(tmp_path, "gateway", config)
    run = subprocess.run(
        serve_argv(gw.config_path, (512, 512)),
        env={**os.environ, **gateway_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode != 0
    # 1000 + 8 upstream connections + 128 reserved
    assert "need 1136 file descriptors" in run.stderr, run.stderr
    assert "may open 512" in run.stderr
    assert "gateway.max_connections" in run.stderr


# -- header byte and count limits, and the timeouts -----------------------------------------

VALID_HEAD = (
    b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
    + f"x-api-key: {API_KEY_KEY}\r\n".encode()
)


def with_body(head: bytes, body: bytes = b"") -> bytes:
    body = body or json.dumps(SIMPLE).encode()
    return head + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body


def head_length(data: bytes) -> int:
    return data.index(b"\r\n\r\n") + 4


async def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Sends ``data`` and reads the answer until the gateway closes (10 s at most)."""
    reader, writer = await connect(port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_to_end(reader, 10.0)
    finally:
        await close(writer)


@pytest.mark.parametrize(
    ("request_bytes", "fragment"),
    [
        (with_body(VALID_HEAD + b"x-big: " + b"b" * 9000 + b"\r\n"), "8192 bytes"),
        (with_body(VALID_HEAD.replace(b"/v1/messages", b"/v1/messages?q=" + b"q" * 9000)),
         "8192 bytes"),
        (with_body(VALID_HEAD + b"".join(b"x-h%d: v\r\n" % i for i in range(17))), "20 headers"),
        # Small headers, far within the byte limit: the count stops them.
        (with_body(VALID_HEAD + b"".join(b"x-h%d: v\r\n" % i for i in range(400))), "20 headers"),
    ],
    ids=["header-bytes", "url-bytes", "header-count", "many-headers"],
)  # fmt: skip
async def test_headers_over_the_limits_get_431_and_a_close(
    upstream: FakeUpstream, request_bytes: bytes, fragment: str
) -> None:
    async with in_process(upstream, max_header_bytes=8192, max_header_count=20) as gw:
        answer, closed = await exchange(gw.port, request_bytes)
        assert closed
        assert status_of(answer) == 431, answer[:300]
        assert header_of(answer, b"connection") == b"close"
        assert header_of(answer, b"content-type") == b"application/json"
        error = error_of(answer)
        assert error["type"] == "invalid_request_error"
        assert fragment in error["message"]
        assert upstream.requests == []
        await normal_request(gw.url)


async def test_headers_within_the_limits_are_served(upstream: FakeUpstream) -> None:
    async with in_process(upstream, max_header_bytes=8192, max_header_count=20) as gw:
        # Exactly at both limits: 20 headers (3 in VALID_HEAD, 14, x-fill, and 2 added
        # by with_body) in 8192 bytes from the request line to the blank line.
        head = VALID_HEAD + b"".join(b"x-h%d: v\r\n" % i for i in range(14))
        filler = 8192 - head_length(with_body(head + b"x-fill: \r\n"))
        data = with_body(head + b"x-fill: " + b"f" * filler + b"\r\n")
        assert head_length(data) == 8192
        answer, _ = await exchange(gw.port, data)
        assert status_of(answer) == 200, answer[:300]
        assert len(upstream.requests) == 1


async def test_the_header_limit_is_per_head_not_per_read(upstream: FakeUpstream) -> None:
    """Reads longer than the head limit: a body after a small head, and 40
    pipelined requests in one write (each head small, all of them together far
    over the limit) are served."""
    async with in_process(upstream, max_header_bytes=1024) as gw:
        body = json.dumps({**SIMPLE, "metadata": {"user_id": "u" * 5000}}).encode()
        answer, _ = await exchange(gw.port, with_body(VALID_HEAD, body))
        assert status_of(answer) == 200, answer[:300]
        one = b"GET /healthz HTTP/1.1\r\nhost: gw\r\nx-pad: " + b"p" * 60 + b"\r\n\r\n"
        last = one.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        answer, closed = await exchange(gw.port, one * 39 + last)
        assert closed
        assert answer.count(b"HTTP/1.1 200 OK") == 40, answer[:300]


async def test_a_silent_connection_is_closed_after_the_first_byte_timeout(
    upstream: FakeUpstream,
) -> None:
    async with in_process(upstream, first_byte_timeout_seconds=1) as gw:
        reader, writer = await connect(gw.port)
        try:
            assert await read_to_end(reader, 15.0) == (b"", True)
        finally:
            await close(writer)
        assert gw.app.metrics.front_door.closed["idle"] == 1


async def test_an_unfinished_head_gets_408_and_a_close(upstream: FakeUpstream) -> None:
    async with in_process(upstream, header_timeout_seconds=1) as gw:
        answer, closed = await exchange(gw.port, b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\n")
        assert closed
        assert status_of(answer) == 408, answer[:300]
        assert header_of(answer, b"connection") == b"close"
        assert "1 s" in error_of(answer)["message"]
        assert gw.app.metrics.front_door.rejected["header_timeout"] == 1


async def test_keep_alive_connections_are_not_cut_by_the_first_byte_timeout(
    upstream: FakeUpstream,
) -> None:
    """The first-byte timeout is for new connections; between two requests the
    keep-alive timeout (75 s) applies, and the header timeout once a head begins."""
    async with in_process(upstream, first_byte_timeout_seconds=1, header_timeout_seconds=1) as gw:
        reader, writer = await connect(gw.port)
        try:
            for _ in range(2):
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert status_of(head) == 200
                await asyncio.wait_for(reader.readexactly(15), 10)  # {"status":"ok"}
                await asyncio.sleep(2.5)  # idle past both timeouts
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # a head begins and stalls
            await writer.drain()
            answer, closed = await read_to_end(reader, 15.0)
        finally:
            await close(writer)
        assert closed
        assert status_of(answer) == 408, answer[:300]


# -- a body that does not arrive -------------------------------------------------------------

BODY_TIMEOUT = 1.0  # body_timeout_seconds of these tests
UNENDING = 1000  # pieces: far longer than any wait below


async def send_slowly(
    port: int, head: bytes, pieces: Iterable[bytes], gap: float, seconds: float = 20.0
) -> tuple[bytes, bool, float]:
    """Sends ``head``, then each of ``pieces`` ``gap`` seconds after the last,
    reading meanwhile: (the answer, whether the gateway closed the connection
    within ``seconds``, the seconds from the head to that close or to the end of
    the wait)."""
    reader, writer = await connect(port)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def collect() -> tuple[bytes, bool, float]:
        answer, closed = await read_to_end(reader, seconds)
        return answer, closed, loop.time() - started

    reading = asyncio.create_task(collect())
    try:
        writer.write(head)
        for piece in pieces:
            await asyncio.wait([reading], timeout=gap)
            if reading.done():
                break
            writer.write(piece)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        result = await reading
        await close(writer)
    return result


async def no_task_left(gw: RunningGateway) -> None:
    """Every request's app task has ended (none is left waiting for a body)."""
    tasks = gw.server.server_state.tasks
    for _ in range(100):
        if not tasks:
            return
        await asyncio.sleep(0.05)
    assert not tasks, f"{len(tasks)} app tasks still running"


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer with a Content-Length, on a connection that stays open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = header_of(head, b"content-length")
    assert length is not None, head
    return head + await asyncio.wait_for(reader.readexactly(int(length)), 10)


async def send_last(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes
) -> bytes:
    """Sends ``data``, the end of a request with ``connection: close``: the rest
    of the answers, read until the gateway closes."""
    writer.write(data)
    await writer.drain()
    answer, closed = await read_to_end(reader, 10.0)
    assert closed
    return answer


KEEP_ALIVE = with_body(VALID_HEAD).replace(b"connection: close\r\n", b"")
LENGTH_HEAD = VALID_HEAD + b"content-length: 10000\r\n\r\n"
CHUNKED_HEAD = VALID_HEAD + b"transfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "pieces"),
    [
        # One byte every 0.2 s: each gap far within the limit, the whole far beyond.
        (LENGTH_HEAD, [b"x"] * UNENDING),
        # Half of the declared length, then nothing.
        (LENGTH_HEAD + b"x" * 5000, []),
        # Chunks, one every 0.2 s, never the last one.
        (CHUNKED_HEAD, [b"1\r\nx\r\n"] * UNENDING),
    ],
    ids=["trickled", "stopped-halfway", "chunked-unending"],
)
async def test_a_body_not_ended_within_the_body_timeout_gets_408_and_a_close(
    upstream: FakeUpstream, head: bytes, pieces: list[bytes]
) -> None:
    """A head sent at once, then a body that does not end: 408 at
    ``body_timeout_seconds`` after the head, however the body's bytes come; the
    connection closed; the app's task waiting for the body released. A normal
    request on another connection is served meanwhile."""
    async with in_process(upstream, body_timeout_seconds=BODY_TIMEOUT) as gw:
        (answer, closed, seconds), _ = await asyncio.gather(
            send_slowly(gw.port, head, pieces, gap=0.2), normal_request(gw.url)
        )
        assert closed, f"a body that did not end was still read after {seconds:.1f} s"
        assert BODY_TIMEOUT * 0.9 <= seconds < BODY_TIMEOUT + 5, seconds
        assert status_of(answer) == 408, answer[:300]
        assert header_of(answer, b"connection") == b"close"
        error = error_of(answer)
        assert error["type"] == "invalid_request_error"
        assert "body did not arrive within 1 s" in error["message"]
        assert gw.app.metrics.front_door.rejected["body_timeout"] == 1
        assert len(upstream.requests) == 1  # the normal request's only
        await no_task_left(gw)
        await normal_request(gw.url)
        text = await metrics_text(gw.url)
        assert metric(text, "keyrelay_gateway_rejected_requests_total", reason="body_timeout") == 1
        # The app had the request's head: it saw the client go (README: 499 in its log).
        requests = "keyrelay_gateway_requests_total"
        assert metric(text, requests, route="apikey", status="499", mode="-") == 1


async def test_a_body_in_slow_pieces_within_the_body_timeout_is_served(
    upstream: FakeUpstream,
) -> None:
    """The limit is on the whole body, not on each read: a body sent in pieces
    0.2 s apart, all within ``body_timeout_seconds``, is served; so is the next
    request on the connection, sent after the limit has passed."""
    async with in_process(upstream, body_timeout_seconds=3) as gw:
        split = head_length(KEEP_ALIVE)
        body = KEEP_ALIVE[split:]
        reader, writer = await connect(gw.port)
        try:
            writer.write(KEEP_ALIVE[:split])
            for i in range(0, len(body), 20):
                await asyncio.sleep(0.2)
                writer.write(body[i : i + 20])
                await writer.drain()
            first = await read_answer(reader)
            assert status_of(first) == 200, first[:300]
            await asyncio.sleep(3.5)  # past the limit: no timer of that body is left
            answer = await send_last(writer, reader, with_body(VALID_HEAD))
        finally:
            await close(writer)
        assert status_of(answer) == 200, answer[:300]
        assert len(upstream.requests) == 2
        assert gw.app.metrics.front_door.rejected["body_timeout"] == 0


async def test_a_pipelined_body_is_timed_from_when_its_request_starts(
    upstream: FakeUpstream,
) -> None:
    """A request pipelined behind one the upstream takes 2.5 s to answer, its
    body half sent: the wait is the gateway's, not the client's. The first answer
    is not cut at ``body_timeout_seconds``, and the second request is served when
    its body ends shortly after the first answer."""
    upstream.header_delay = 2.5
    async with in_process(upstream, body_timeout_seconds=BODY_TIMEOUT) as gw:
        second = with_body(VALID_HEAD)
        half = head_length(second) + 10
        reader, writer = await connect(gw.port)
        try:
            writer.write(KEEP_ALIVE + second[:half])
            await writer.drain()
            first = await read_answer(reader)
            assert status_of(first) == 200, first[:300]
            await asyncio.sleep(0.3)
            answer = await send_last(writer, reader, second[half:])
        finally:
            await close(writer)
        assert status_of(answer) == 200, answer[:300]
        assert len(upstream.requests) == 2
        assert gw.app.metrics.front_door.rejected["body_timeout"] == 0


# -- row 8: an answer before the body's end closes the connection ---------------------------

BODY_LIMIT = 1 * MiB
SEND_AT_MOST = 200 * MiB


async def send_endless_body(port: int, head: bytes, chunked: bool) -> tuple[int, bytes, bool]:
    """Sends ``head`` and then a body with no end in sight, reading meanwhile:
    (bytes the client managed to write, the answer, whether the gateway closed)."""
    reader, writer = await connect(port, sndbuf=SNDBUF)
    loop = asyncio.get_running_loop()
    answer = b""
    closed = False
    written = 0

    async def collect() -> None:
        nonlocal answer, closed
        answer, closed = await read_to_end(reader, 40.0)

    reading = asyncio.create_task(collect())
    piece = b" " * (64 * KiB)
    chunk = b"10000\r\n" + piece + b"\r\n" if chunked else piece
    deadline = loop.time() + 30
    try:
        writer.write(head)
        while written < SEND_AT_MOST and loop.time() < deadline and not reading.done():
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), deadline - loop.time())
            written += len(piece)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        if not closed and not reading.done():
            # The gateway may still be sending the answer: wait for its close.
            await asyncio.wait([reading], timeout=10)
            reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await close(writer)
    return written, answer, closed


@pytest.mark.parametrize(
    ("head", "chunked", "status"),
    [
        (VALID_HEAD + b"transfer-encoding: chunked\r\n\r\n", True, 413),
        (VALID_HEAD + b"content-length: 10000000000\r\n\r\n", False, 413),
        (VALID_HEAD.replace(API_KEY_KEY.encode(), b"kr-unknown")
         + b"transfer-encoding: chunked\r\n\r\n", True, 401),
    ],
    ids=["chunked-413", "declared-10GB-413", "chunked-unknown-key-401"],
)  # fmt: skip
async def test_an_answer_before_the_body_ends_closes_the_connection(
    upstream: FakeUpstream, head: bytes, chunked: bool, status: int
) -> None:
    """Row 8: a body far over ``max_request_bytes`` (or one the gateway refuses
    before reading it) is not read to its end: the answer, then the connection is
    closed after at most the limit plus a bounded linger and socket buffers."""
    async with in_process(upstream, max_request_bytes=BODY_LIMIT) as gw:
        written, answer, closed = await send_endless_body(gw.port, head, chunked)
        assert closed, f"the gateway read {written} bytes of the body and kept reading"
        assert written < BODY_LIMIT + 8 * MiB, f"the client wrote {written} bytes"
        assert status_of(answer) == status, answer[:300]
        assert upstream.requests == []
        await normal_request(gw.url)
        if status == 413:
            assert gw.app.metrics.front_door.rejected["body_too_large"] == 1


async def test_a_body_declared_within_twice_the_limit_is_drained_and_answered(
    upstream: FakeUpstream,
) -> None:
    """A client that only reads after sending (httpx, hence the Python SDK) still
    sees the 413 when the body is declared at most twice the limit: the gateway
    reads that rest, and the connection stays usable."""
    async with (
        in_process(upstream, max_request_bytes=BODY_LIMIT) as gw,
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        for size in (BODY_LIMIT + 1, 2 * BODY_LIMIT):
            response = await http.post(
                "/v1/messages",
                content=b"x" * size,
                headers={"content-type": "application/json", "x-api-key": API_KEY_KEY},
            )
            assert response.status_code == 413
            assert response.json()["error"]["type"] == "request_too_large"
        assert (await http.get("/healthz")).status_code == 200


# -- what the front door must not break -----------------------------------------------------


async def test_an_upgrade_request_is_answered_and_ends_the_connection(
    upstream: FakeUpstream,
) -> None:
    """No protocol switch is served: the request is answered as a plain one, and
    what follows its head (a body, a pipelined request) is never read as HTTP."""
    async with in_process(upstream) as gw:
        upgrade = (
            b"GET /healthz HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
        )
        smuggled = b"GET /metrics HTTP/1.1\r\nhost: gw\r\n\r\n"
        answer, closed = await exchange(gw.port, upgrade + smuggled)
        assert closed
        assert status_of(answer) == 200, answer[:300]
        assert header_of(answer, b"connection") == b"close"
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        await normal_request(gw.url)


@pytest.mark.parametrize(
    "data",
    [
        b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n"
        b"content-length: 6\r\n\r\nhello!",
        b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\n x-folded: yes\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nhost : gw\r\n\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "te-not-chunked", "bad-chunk-size", "obs-fold", "space-colon"],
)
async def test_request_smuggling_variants_still_get_400(
    upstream: FakeUpstream, data: bytes
) -> None:
    async with in_process(upstream) as gw:
        answer, closed = await exchange(gw.port, data)
        assert closed
        assert status_of(answer) == 400, answer[:300]
        assert upstream.requests == []
        await normal_request(gw.url)
