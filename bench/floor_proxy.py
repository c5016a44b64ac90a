"""The floor of the gateway benchmark: a minimal forwarding proxy on the gateway's own stack.

uvicorn (uvloop + httptools, the gateway's settings) serving a bare ASGI app
that sends every ``POST`` to the upstream with a pooled aiohttp session and
forwards the answer: a JSON body read whole and sent with its length, an event
stream chunk by chunk as it arrives. No keys, transforms, usage, metrics or
logs. ``bench/gateway.py`` runs it beside the gateway so that the gateway's own
cost (everything above this floor) can be told apart from the frameworks' and
from the machine's load. Run: ``python -m bench.floor_proxy --upstream URL --port N``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import aiohttp
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class FloorProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=256), trust_env=False
                    )
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        assert self.session is not None
        headers = {"content-type": "application/json", "x-api-key": "sk-floor"}
        async with self.session.post(
            self.upstream + scope["path"], data=body, headers=headers
        ) as response:
            content_type = response.headers.get("content-type", "")
            out = [(b"content-type", content_type.encode())]
            if not content_type.startswith("text/event-stream"):
                data = await response.read()
                out.append((b"content-length", str(len(data)).encode()))
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": out}
                )
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        FloorProxy(args.upstream),
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
