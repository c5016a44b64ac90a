"""Loads the runtime keys into the key book and follows their changes (DESIGN §6.1).

One task per worker, beside the token client's ``WatchEvents`` stream (which hands
it every ``KEY_CHANGED`` event and tells it where each unbroken run of events
starts: ``TokenClient.listener``):

- **Load**: ``ListKeys`` replaces every runtime key of the book. Its
  ``events_cursor`` is read before the keys, so every change after it arrives as
  an event on a stream that started at or before it. The stream's run starts
  where the server says (``keyrelay-events-cursor``); when that is *after* the
  list's cursor (the stream connected later, or started again without a cursor
  to resume from: a new run), the changes in between could be missed, so the
  keys are listed again: that list's cursor is at or after the run's start.
- **Follow**: a ``KEY_CHANGED`` event queues its key id (events the last list
  already covers are dropped); queued keys are refetched with ``GetKey``, up to
  ``FETCH_BATCH`` at once: put or replaced, or removed (revoked, ``NOT_FOUND``).
- **Failures** (the auth service unreachable, its store down): the worker keeps
  serving what it has (config keys always), retries with jittered backoff up to
  ``max_backoff`` seconds, and logs at most one line per ``LOG_INTERVAL``.
  ``loaded`` (for ``/readyz``) turns true with the first list that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Final

import grpc
from grpc import aio

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.http.metrics import GatewayMetrics
from keyrelay.gateway.key_book import Entry, KeyBook, runtime_key
from keyrelay.gateway.tokens import TokenClient
from keyrelay.log_limit import LineLimiter

log = logging.getLogger("keyrelay.gateway.keys")

FETCH_BATCH: Final = 32  # GetKey calls in flight at once
LOG_INTERVAL: Final = 10.0  # seconds between two failure lines of one kind
REFUSED_LOG_INTERVAL: Final = 3600.0  # a key not taken: one line per version an hour
RPC_TIMEOUT: Final = 5.0


def event_order(event_id: str) -> tuple[int, int]:
    """A stream id ``<ms>-<seq>`` as a comparable pair ((0, 0) for anything else)."""
    ms, _, seq = event_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


class KeyFollower:
    def __init__(
        self,
        book: KeyBook,
        tokens: TokenClient,
        metrics: GatewayMetrics,
        *,
        rpc_timeout: float = RPC_TIMEOUT,
        max_backoff: float = 5.0,
    ) -> None:
        self._book = book
        self._stub = tokens.stub
        self._metadata = tokens.call_metadata
        self._metrics = metrics
        self._timeout = rpc_timeout
        self._max_backoff = max_backoff
        self._wake = asyncio.Event()
        self._list_due = True
        self._listed: tuple[int, int] | None = None  # the last list's events_cursor
        self._run_start: tuple[int, int] | None = None  # where the stream's run starts
        self._pending: dict[str, tuple[int, int]] = {}  # key id -> its latest event
        self._lines: LineLimiter[object] = LineLimiter(LOG_INTERVAL)
        self._refused_lines: LineLimiter[object] = LineLimiter(REFUSED_LOG_INTERVAL)
        self.loaded = False
        self._attempted = asyncio.Event()  # set once the first ListKeys answered or failed

    async def first_load(self, within: float) -> bool:
        """Waits at most ``within`` seconds for the first ``ListKeys`` to answer or
        fail (a probe just after start need not find the keys still loading);
        returns ``loaded``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), within)
        return self.loaded

    # -- the token client's listener ------------------------------------------------

    def key_changed(self, event: auth_pb2.AccountEvent) -> None:
        order = event_order(event.event_id)
        if self._listed is not None and order <= self._listed:
            return  # the last list already holds this change
        if order > self._pending.get(event.key_id, (-1, -1)):
            self._pending[event.key_id] = order
        self._wake.set()

    def run_started(self, cursor: str) -> None:
        start = event_order(cursor) if cursor else None
        self._run_start = start
        if start is None or self._listed is None or start > self._listed:
            self._list_due = True
            self._wake.set()

    # -- the task -----------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.1
        rng = random.Random()  # noqa: S311  # jitter, not secrets
        while True:
            if not self._list_due and not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._list_due:
                    await self._load()
                if self._pending:
                    await self._refetch()
            except aio.AioRpcError as exc:
                self._trouble("runtime keys: the auth service did not answer; retrying", exc)
            except Exception:  # a bug: logged, and the follower carries on after a pause
                log.exception("runtime keys: unexpected error; retrying")
            else:
                backoff = 0.1
                continue
            await asyncio.sleep(backoff * rng.uniform(0.5, 1.5))
            backoff = min(self._max_backoff, backoff * 2)

    async def _load(self) -> None:
        try:
            await self._list()
        finally:
            self._attempted.set()

    async def _list(self) -> None:
        self._list_due = False
        try:
            reply = await self._stub.ListKeys(
                auth_pb2.ListKeysRequest(), metadata=self._metadata, timeout=self._timeout
            )
        except aio.AioRpcError as exc:
            self._metrics.runtime_key_loads.labels("error").inc()
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # An auth service older than runtime keys: there are none to load.
                log.warning("the auth service has no runtime keys (ListKeys unimplemented)")
                self._listed = (0, 0)
                self.loaded = True
                return
            self._list_due = True
            raise
        refused = self._book.replace(runtime_key(m) for m in reply.keys)
        listed = event_order(reply.events_cursor)
        self._listed = listed
        self._pending = {k: v for k, v in self._pending.items() if v > listed}
        if self._run_start is not None and self._run_start > listed:
            self._list_due = True  # the stream's run starts after this list: once more
        self._metrics.runtime_key_loads.labels("ok").inc()
        for entry in refused:
            self._refused(entry)
        self._metrics.runtime_keys.set(len(self._book))
        if not self.loaded:
            log.info(
                "runtime keys loaded",
                extra={"keys": len(self._book), "not_taken": len(refused)},
            )
        self.loaded = True

    async def _refetch(self) -> None:
        pending, self._pending = self._pending, {}
        ids = list(pending)
        failed: aio.AioRpcError | None = None
        for start in range(0, len(ids), FETCH_BATCH):
            batch = ids[start : start + FETCH_BATCH]
            replies = await asyncio.gather(*(self._get(i) for i in batch), return_exceptions=True)
            for key_id, reply in zip(batch, replies, strict=True):
                if isinstance(reply, auth_pb2.GatewayKey):
                    self._apply(reply)
                elif isinstance(reply, aio.AioRpcError) and reply.code() in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    if self._book.remove(key_id):
                        log.info("runtime key removed", extra={"key_id": key_id})
                elif isinstance(reply, aio.AioRpcError):
                    failed = failed or reply
                    if pending[key_id] > self._pending.get(key_id, (-1, -1)):
                        self._pending[key_id] = pending[key_id]
                else:
                    raise reply  # not an RPC failure: a bug (logged by run)
        self._metrics.runtime_keys.set(len(self._book))
        if failed is not None:
            raise failed

    async def _get(self, key_id: str) -> auth_pb2.GatewayKey:
        reply: auth_pb2.GatewayKey = await self._stub.GetKey(
            auth_pb2.GetKeyRequest(key_id=key_id), metadata=self._metadata, timeout=self._timeout
        )
        return reply

    def _apply(self, message: auth_pb2.GatewayKey) -> None:
        key = runtime_key(message)
        held = self._book.entry(key.key_id) is not None
        entry = self._book.put(key)
        if key.revoked:
            if held:
                log.info("runtime key revoked", extra={"key_id": key.key_id, "key_name": key.name})
        elif entry is not None and entry.refusal is not None:
            self._refused(entry)
        elif entry is not None:
            log.info(
                "runtime key updated" if held else "runtime key taken",
                extra={"key_id": key.key_id, "key_name": key.name, "version": key.version},
            )

    def _refused(self, entry: Entry) -> None:
        assert entry.refusal is not None
        self._metrics.runtime_keys_refused.labels(entry.refusal.value).inc()
        left_out = self._refused_lines.admit(
            (entry.key_id, entry.version, entry.refusal), time.monotonic()
        )
        if left_out is not None:
            log.warning(
                "runtime key not taken",
                extra={
                    "key_id": entry.key_id,
                    "key_name": entry.name,
                    "version": entry.version,
                    "reason": entry.refusal.value,
                    "detail": entry.message
                    or "its hash is a [[keys]] entry's of the gateway config, which wins",
                },
            )

    def _trouble(self, message: str, exc: aio.AioRpcError) -> None:
        left_out = self._lines.admit(exc.code(), time.monotonic())
        if left_out is not None:
            log.warning(
                message,
                extra={
                    "status": exc.code().name,
                    "error": exc.details(),
                    "suppressed": left_out,
                },
            )
