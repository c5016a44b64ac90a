"""Slow readers cannot grow the gateway: memory per stream is bounded by the high-water mark.

``keyrelay gateway serve`` runs as its own process. An upstream that streams
as fast as the gateway reads (an endless, well-formed event stream) serves 200
clients that read very slowly, a few KiB at a time through small socket
buffers. Whatever the gateway holds for a stream (the upstream client's
buffer, the bytes between it and the server, the server's write buffer) must
stay within the budget the docs promise: the process's peak RSS growth under
200 x 2 x the upstream client's high-water mark. Back-pressure must reach the
upstream: while the clients read slowly, the upstream is not read faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from keyrelay.gateway.http.upstream import HIGH_WATER_BYTES
from keyrelay.gateway.keys import key_hash
from tests.support.gateway import GatewayProcess

STREAMS = 200
KEY = "kr-test-slow-reader-key-0123456789abcdef"
READ_BYTES = 8192  # per read of a slow client (at most: its socket buffer is small)
READ_EVERY = 0.1  # seconds between two reads: at most 80 KB/s per stream
BLOCK = b"".join(
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"' + b"%04d " % i + b"x" * 900 + b'"}}\n\n'
    for i in range(64)
)  # ~60 KiB of whole events, written again and again as one HTTP chunk
START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01",'
    b'"type":"message","role":"assistant","model":"claude-test-1","content":[],'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}}\n\n'
)


class EndlessUpstream:
    """Answers every request with an event stream that never ends (chunked), written
    as fast as the reader takes it; counts the body bytes it got rid of."""

    def __init__(self) -> None:
        self.written = 0
        self.streams = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> EndlessUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.streams += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(START) + START + b"\r\n"
            )
            framed = b"%x\r\n" % len(BLOCK) + BLOCK + b"\r\n"
            while True:
                writer.write(framed)
                await writer.drain()
                self.written += len(BLOCK)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in KiB, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


class SlowReader:
    """A raw socket with a small receive buffer, reading ``READ_BYTES`` per ``READ_EVERY``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received = 0
        self.head = b""  # the first bytes: the status line and headers

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            body = b'{"model":"claude-test-1","max_tokens":10,"stream":true,"messages":[]}'
            await loop.sock_sendall(
                sock,
                b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                b"x-api-key: " + KEY.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
                + body,
            )  # fmt: skip
            while not stop.is_set():
                data = await loop.sock_recv(sock, READ_BYTES)
                if not data:
                    return
                if len(self.head) < 4096:
                    self.head += data[:4096]
                self.received += len(data)
                await asyncio.sleep(READ_EVERY)
        finally:
            sock.close()

    @property
    def streaming(self) -> bool:
        """A 200 event stream whose events are arriving."""
        return self.head.startswith(b"HTTP/1.1 200 ") and b"content_block_delta" in self.head


@pytest.fixture
async def upstream() -> AsyncIterator[EndlessUpstream]:
    server = await EndlessUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
def gateway(tmp_path: Path, upstream: EndlessUpstream) -> Iterator[GatewayProcess]:
    data = {
        "gateway": {"listen": "127.0.0.1:0", "log_level": "warning"},
        "upstreams": {
            "default": {"url": f"http://127.0.0.1:{upstream.port}", "read_timeout_seconds": 120}
        },
        "keys": [
            {"name": "slow", "hash": key_hash(KEY), "mode": "api_key",
             "api_key": {"env": "KR_UPSTREAM_KEY"}},
        ],
    }  # fmt: skip
    process = GatewayProcess.write(tmp_path, "gateway", data)
    process.spawn()
    try:
        yield process
    finally:
        process.stop()


async def test_200_slow_readers_hold_at_most_twice_the_high_water_mark_each(
    gateway: GatewayProcess, upstream: EndlessUpstream
) -> None:
    await asyncio.to_thread(gateway.wait_ready)
    assert gateway.process is not None
    pid = gateway.process.pid
    # Warm the worker up (imports, first-request paths) before the baseline.
    stop = asyncio.Event()
    warm = [SlowReader(gateway.port) for _ in range(4)]
    tasks = [asyncio.create_task(r.run(stop)) for r in warm]
    await wait_until(lambda: all(r.streaming for r in warm), "warm-up streams started")
    stop.set()
    await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)
    baseline = memory_kib(pid)["VmRSS"]

    stop = asyncio.Event()
    readers = [SlowReader(gateway.port) for _ in range(STREAMS)]
    tasks = [asyncio.create_task(r.run(stop)) for r in readers]
    try:
        await wait_until(lambda: all(r.streaming for r in readers), "every stream started")
        # Until the gateway's memory settles (it stops growing for 5 s), at most 90 s.
        settled_at, peak = time.monotonic(), 0
        deadline = time.monotonic() + 90
        while time.monotonic() - settled_at < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            now = memory_kib(pid)["VmHWM"]
            if now > peak * 1.01:
                settled_at, peak = time.monotonic(), now
        written_before = upstream.written
        read_before = sum(r.received for r in readers)
        await asyncio.sleep(3)
        taken = upstream.written - written_before
        read = sum(r.received for r in readers) - read_before
        peak = memory_kib(pid)["VmHWM"]
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await http.get(f"{gateway.url}/healthz")).status_code == 200
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    growth = (peak - baseline) * 1024
    budget = STREAMS * 2 * HIGH_WATER_BYTES
    print(
        f"RSS {baseline} KiB -> peak {peak} KiB: {growth / STREAMS / 1024:.0f} KiB per stream "
        f"(budget {budget / STREAMS / 1024:.0f}); upstream {taken} B vs clients {read} B in 3 s"
    )
    # Every stream flowed all along: each client read more than its first screenful.
    assert read > STREAMS * READ_BYTES
    assert growth < budget, (
        f"{growth / STREAMS / 1024:.0f} KiB per slow stream, over 2 x the high-water mark"
    )
    # Back-pressure reaches the upstream: it is read about as fast as the clients read
    # (the slack: buffers refilled as the clients made room, a 60 KiB block at a time).
    assert taken <= read + STREAMS * len(BLOCK)


async def wait_until(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        await asyncio.sleep(0.05)
