"""Collects ``WatchEvents`` in the background so tests can assert on exact counts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.support.stack import gateway_md

WAIT_SECONDS = 10.0


class EventWatcher:
    def __init__(
        self, stub: auth_pb2_grpc.AuthServiceAsyncStub, after_event_id: str = "0-0"
    ) -> None:
        # Each test has its own stream (key prefix), so "0-0" means "this test's events".
        self.events: list[auth_pb2.AccountEvent] = []
        self._call = stub.WatchEvents(
            auth_pb2.WatchEventsRequest(after_event_id=after_event_id), metadata=gateway_md()
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(aio.AioRpcError, asyncio.CancelledError):
            async for event in self._call:
                self.events.append(event)

    def of(
        self, account_id: str, kind: auth_pb2.AccountEvent.Kind.ValueType | None = None
    ) -> list[auth_pb2.AccountEvent]:
        return [
            e
            for e in self.events
            if e.account_id == account_id and (kind is None or e.kind == kind)
        ]

    async def wait_for(self, predicate: Callable[[list[auth_pb2.AccountEvent]], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not predicate(self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"events never matched; got {self.events}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
