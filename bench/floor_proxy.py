"""The floor of the gateway benchmark: a minimal forwarding proxy on the gateway's own stack.

uvicorn (uvloop + httptools, the gateway's settings) serving a bare ASGI app
that sends every ``POST`` to the upstream with a pooled client and forwards
the answer: a JSON body read whole and sent with its length, an event stream
chunk by chunk as it arrives. No keys, transforms, usage, metrics or logs.
``bench/gateway.py`` runs it beside the gateway so that the gateway's own cost
(everything above this floor) can be told apart from the frameworks' and from
the machine's load.

``--client aiohttp`` (the default: the issue's reference floor, uvicorn +
aiohttp's client) or ``--client keyrelay`` (the gateway's own upstream client,
``keyrelay.gateway.http.upstream``): the two side by side in one run are the
measurement behind the gateway's choice of upstream client.
Run: ``python -m bench.floor_proxy --upstream URL --port N [--client keyrelay]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import aiohttp
import uvicorn

from keyrelay.gateway.config import UpstreamConfig
from keyrelay.gateway.http.upstream import Upstreams

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_UPSTREAM_HEADERS = {"content-type": "application/json", "x-api-key": "sk-floor"}


async def _lifespan(
    receive: Receive,
    send: Send,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _relay(
    send: Send,
    status: int,
    content_type: bytes,
    whole: Callable[[], Awaitable[bytes]],
    chunks: Callable[[], AsyncIterator[bytes]],
) -> None:
    """The answer to the client: a JSON body with its length, a stream chunk by chunk."""
    out = [(b"content-type", content_type)]
    if not content_type.startswith(b"text/event-stream"):
        data = await whole()
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": data})
        return
    await send({"type": "http.response.start", "status": status, "headers": out})
    async for chunk in chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _body(receive: Receive) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class FloorProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), trust_env=False
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.start, self.stop)
            return
        if scope["type"] != "http":
            return
        body = await _body(receive)
        assert self.session is not None
        async with self.session.post(
            self.upstream + scope["path"], data=body, headers=_UPSTREAM_HEADERS
        ) as response:
            content_type = response.headers.get("content-type", "").encode()
            await _relay(
                send, response.status, content_type, response.read, response.content.iter_any
            )


class KeyrelayFloorProxy:
    """The same proxy on the gateway's own upstream client."""

    def __init__(self, upstream: str) -> None:
        self.config = UpstreamConfig(name="floor", url=upstream.rstrip("/"))
        self.upstreams = Upstreams({"floor": self.config})
        self.headers = list(_UPSTREAM_HEADERS.items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.upstreams.start, self.upstreams.close)
            return
        if scope["type"] != "http":
            return
        body = await _body(receive)
        response = await self.upstreams.post(self.config, scope["path"], self.headers, [], body)
        try:
            await _relay(
                send, response.status, response.content_type, response.read_all, response.chunks
            )
        finally:
            response.release()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=("aiohttp", "keyrelay"), default="aiohttp")
    args = parser.parse_args(argv)
    app = FloorProxy if args.client == "aiohttp" else KeyrelayFloorProxy
    uvicorn.run(
        app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=75,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
