"""The gateway's token client: a per-worker cache in front of ``GetToken``.

In steady state a request costs no RPC: a token is cached until
``expires_at - skew``, concurrent requests for an account share one in-flight
``GetToken``, and a ``WatchEvents`` subscription evicts an account the moment
another replica refreshes or disconnects it. When the subscription is down the
cache stays correct enough: an upstream 401 leads to
``GetToken(stale_generation=…)`` and one retry.

The gRPC channel load-balances over every auth replica (``round_robin`` over a
``dns:///`` headless service or an ``ipv4:`` list) and retries ``UNAVAILABLE``
per the service config below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyrelay.auth.v1 import EVENTS_CURSOR_METADATA, auth_pb2, auth_pb2_grpc
from keyrelay.gateway.tracing import GetToken, traced_get_token
from keyrelay.tracing import NOOP_TRACER, Tracer

log = logging.getLogger("keyrelay.gateway.tokens")
# The auth service refuses larger minimums (a token rarely lives longer than an hour).
MAX_MIN_TTL_SECONDS: Final = 3600

SERVICE_CONFIG: Final = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [
                    {"service": "keyrelay.auth.v1.AuthService", "method": "GetToken"},
                    {"service": "keyrelay.auth.v1.AuthService", "method": "GetAccount"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


# /readyz answers within this (the kubelet's probe waits 3 s: deploy/base/gateway.yaml).
READY_DEADLINE_SECONDS: Final = 0.8
# After a GetToken the auth service did not answer (unreachable, timed out), this
# long during which a pool tries first the members that need no GetToken.
UNREACHABLE_SECONDS: Final = 5.0
AUTH_SERVICE: Final = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
# GetAccount of an account that does not exist: NOT_FOUND says the store answered.
READY_PROBE_ACCOUNT: Final = "readyz-probe"


@dataclass(frozen=True, slots=True)
class Readiness:
    """What the gateway's ``/readyz`` says (README, "Readiness").

    ``result``: ``ready`` (an auth replica answers and takes this gateway's
    service token), ``auth_unreachable`` or ``token_refused``. ``store``: whether
    the auth service's token store answered (``ok``, ``unavailable``; ``unknown``
    when no replica did): it does not decide readiness, cached tokens serve while
    it is down. ``cached_tokens``: the tokens this worker holds that are still valid.
    ``runtime_keys``: ``loaded`` or ``loading`` (the first ``ListKeys`` has not
    answered yet: not ready, ``keys_loading``); "" without [gateway.auth].
    """

    result: str
    store: str  # "" for a gateway without [gateway.auth]
    cached_tokens: int
    runtime_keys: str = ""
    runtime_key_count: int = 0

    @property
    def ready(self) -> bool:
        return self.result == "ready"

    def body(self) -> bytes:
        """The JSON ``/readyz`` answers: ``{"status": ..., "store": ..., "cached_tokens": n}``."""
        entry: dict[str, object] = {"status": READINESS_STATUS[self.result]}
        if self.store:
            entry |= {"store": self.store, "cached_tokens": self.cached_tokens}
        if self.runtime_keys:
            entry |= {
                "runtime_keys": self.runtime_keys,
                "runtime_key_count": self.runtime_key_count,
            }
        return json.dumps(entry, separators=(",", ":")).encode()


READINESS_STATUS: Final = {
    "ready": "ready",
    "auth_unreachable": "auth service unreachable",
    "token_refused": "the auth service refused this gateway's service token",
    "keys_loading": "runtime keys not loaded yet (ListKeys has not answered)",
}
# Without [gateway.auth] (API-key routes only) nothing outside the worker is needed.
READY_WITHOUT_AUTH: Final = Readiness("ready", "", 0)


@dataclass(frozen=True, slots=True)
class CachedToken:
    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    generation: int


class TokenError(Exception):
    """No token for this account; carries what the client should be told."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def token_error(exc: aio.AioRpcError, account_id: str) -> TokenError:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return TokenError(401, "authentication_error", details)
    if code == grpc.StatusCode.NOT_FOUND:
        return TokenError(
            401,
            "authentication_error",
            f"account {account_id!r} is not connected; connect it with: "
            f"keyrelay connect {account_id} --provider PROVIDER",
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        log.error(
            "the auth service rejected this gateway's service token",
            extra={"status": code.name},
        )
    return TokenError(503, "api_error", "the auth service is unavailable; retry shortly")


def open_channel(
    target: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    keepalive_seconds: float = 30.0,
) -> aio.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        # Pings every keepalive_seconds, also under an event stream that carries no
        # data for hours (gRPC stops after 2 pings without data unless told not to);
        # the auth server permits them (auth.min_client_ping_interval_seconds).
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if ca_file is None:
        return aio.insecure_channel(target, options=options)
    with open(ca_file, "rb") as fh:
        ca = fh.read()
    key = cert = None
    if cert_file and key_file:
        with open(key_file, "rb") as fh:
            key = fh.read()
        with open(cert_file, "rb") as fh:
            cert = fh.read()
    return aio.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=options)


class EventListener(Protocol):
    """Who else follows the event stream (``keyrelay.gateway.key_follower``)."""

    def key_changed(self, event: auth_pb2.AccountEvent) -> None:
        """A ``KEY_CHANGED`` event, in stream order."""

    def run_started(self, cursor: str) -> None:
        """A new unbroken run of events starts after ``cursor`` ("" when the server
        named none): the events before it, and any not yet seen, may be missed."""


class TokenClient:
    def __init__(
        self,
        channel: aio.Channel,
        service_token: str,
        *,
        skew: float = 30.0,
        rpc_timeout: float = 40.0,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        self._channel = channel
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._ready_check: asyncio.Task[Readiness] | None = None
        # Chosen once: without tracing, the stub's own callable (no span, no traceparent).
        self._get_token: GetToken = (
            traced_get_token(tracer, self._stub.GetToken) if tracer.enabled else self._stub.GetToken
        )
        self._metadata: tuple[tuple[str, str | bytes], ...] = (
            ("authorization", f"Bearer {service_token}"),
        )
        self._skew = skew
        # Ask for a token this worker will cache: expires_at travels in whole seconds
        # and the auth service's own skew may be smaller, so without a minimum a token
        # it still calls fresh could be stale here, and cost one RPC per request.
        self._min_ttl = min(math.ceil(skew) + 1, MAX_MIN_TTL_SECONDS)
        self._timeout = rpc_timeout
        self._clock = clock
        self._cache: dict[str, CachedToken] = {}
        self._inflight: dict[tuple[str, int], asyncio.Task[CachedToken]] = {}
        # Highest generation an event announced per account: a fetch that raced
        # the event and returned an older token is used once but not cached.
        self._floor: dict[str, int] = {}
        self._last_event_id = ""
        # Accounts known to be disconnected (a DISCONNECTED event, or GetToken said
        # so), until CONNECTED, REFRESHED or a token: pools skip their oauth members.
        # At most one entry per account of the auth service.
        self.disconnected: set[str] = set()
        # CONNECTED, REFRESHED and DISCONNECTED events applied per account: a GetToken
        # answer moves the mark only if none was applied while it was in flight (the
        # event is newer). As bounded as _floor. _marks_cleared counts the times every
        # mark was forgotten (an event stream restarted without a cursor): as new.
        self._mark_events: dict[str, int] = {}
        self._marks_cleared = 0
        # Until when (clock) the auth service counts as unreachable: the last GetToken
        # failed for want of an answer (UNREACHABLE_SECONDS after it); 0: it answered.
        self.unreachable_until = 0.0
        # Told of KEY_CHANGED events and of where the stream's unbroken run starts.
        self.listener: EventListener | None = None
        self.hits = 0
        self.misses = 0
        self.rpcs = 0

    @property
    def stub(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        """The auth service's stub on this client's channel (for the key follower)."""
        return self._stub

    @property
    def call_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The service token, as every call to the auth service carries it."""
        return self._metadata

    def cached(self, account_id: str) -> bool:
        """Whether ``get`` would answer from the cache, without a GetToken."""
        cached = self._cache.get(account_id)
        return cached is not None and cached.expires_at - self._skew > self._clock()

    async def get(self, account_id: str) -> CachedToken:
        cached = self._cache.get(account_id)
        if cached is not None and cached.expires_at - self._skew > self._clock():
            self.hits += 1
            return cached
        self.misses += 1
        return await self._shared_fetch(account_id, 0)

    async def _shared_fetch(self, account_id: str, stale_generation: int) -> CachedToken:
        """One in-flight ``GetToken`` per (account, stale generation) in this worker."""
        key = (account_id, stale_generation)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(account_id, stale_generation))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        # Shielded: one client going away must not cancel the fetch others wait on.
        return await asyncio.shield(task)

    async def rejected(self, account_id: str, generation: int) -> CachedToken:
        """The upstream refused the token of ``generation``: get a newer one."""
        current = self._cache.get(account_id)
        if current is not None and current.generation > generation:
            return current
        self._cache.pop(account_id, None)
        return await self._shared_fetch(account_id, generation)

    def _done(self, key: tuple[str, int], task: asyncio.Task[CachedToken]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved by every waiter; keep asyncio quiet

    async def _fetch(self, account_id: str, stale_generation: int) -> CachedToken:
        self.rpcs += 1
        marks = self._marks_of(account_id)
        try:
            reply = await self._get_token(
                auth_pb2.GetTokenRequest(
                    account_id=account_id,
                    min_ttl_seconds=self._min_ttl,
                    stale_generation=stale_generation,
                ),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except aio.AioRpcError as exc:
            error = token_error(exc, account_id)
            if error.status == 503:  # (also: it refused this gateway's service token)
                self.unreachable_until = self._clock() + UNREACHABLE_SECONDS
            else:
                self.unreachable_until = 0.0
                if error.status == 401 and self._marks_of(account_id) == marks:
                    self.disconnected.add(account_id)
            raise error from None
        self.unreachable_until = 0.0
        if self._marks_of(account_id) == marks:
            self.disconnected.discard(account_id)
        token = CachedToken(
            reply.access_token,
            reply.token_type or "Bearer",
            float(reply.expires_at),
            reply.generation,
        )
        if token.generation >= self._floor.get(account_id, 0):
            self._cache[account_id] = token
        return token

    def _marks_of(self, account_id: str) -> tuple[int, int]:
        """What has moved ``account_id``'s disconnected mark so far, as a value that
        changes whenever something does (an event, or all marks forgotten)."""
        return self._marks_cleared, self._mark_events.get(account_id, 0)

    def evict(self, account_id: str, generation: int = 0) -> None:
        self._cache.pop(account_id, None)
        if generation > self._floor.get(account_id, 0):
            self._floor[account_id] = generation

    def apply_event(self, event: auth_pb2.AccountEvent) -> None:
        self._last_event_id = event.event_id
        if event.kind in (
            auth_pb2.AccountEvent.DISCONNECTED,
            auth_pb2.AccountEvent.REFRESHED,
            auth_pb2.AccountEvent.CONNECTED,
        ):
            self.evict(event.account_id, event.generation)
            self._mark_events[event.account_id] = self._mark_events.get(event.account_id, 0) + 1
            if event.kind == auth_pb2.AccountEvent.DISCONNECTED:
                self.disconnected.add(event.account_id)
            else:
                self.disconnected.discard(event.account_id)
        elif event.kind == auth_pb2.AccountEvent.KEY_CHANGED and self.listener is not None:
            self.listener.key_changed(event)

    async def watch(self, *, max_backoff: float = 5.0) -> None:
        """Follows ``WatchEvents`` forever, resuming after the last event seen.

        The stream's initial metadata names the event it starts after, so even a
        watcher that has seen no event resumes without a gap, and an auth outage
        leaves the cached (still valid) tokens in place.
        """
        backoff = 0.1
        rng = random.Random()  # noqa: S311  # jitter, not secrets
        first = True
        while True:
            after = self._last_event_id
            call = self._stub.WatchEvents(
                auth_pb2.WatchEventsRequest(after_event_id=after), metadata=self._metadata
            )
            try:
                self._resume_point(await call.initial_metadata(), call, first=first, after=after)
                first = False
                async for event in call:
                    self.apply_event(event)
                    backoff = 0.1
            except aio.AioRpcError as exc:
                log.warning("event stream lost; reconnecting", extra={"status": exc.code().name})
            finally:
                call.cancel()
            await asyncio.sleep(backoff * rng.uniform(0.5, 1.5))
            backoff = min(max_backoff, backoff * 2)

    def _resume_point(
        self, metadata: aio.Metadata | None, call: aio.Call, *, first: bool, after: str = ""
    ) -> None:
        """``after``: the event id this stream was asked to start after ("": from now)."""
        cursor = dict(metadata or ()).get(EVENTS_CURSOR_METADATA)
        if isinstance(cursor, str) and cursor:
            if not self._last_event_id:
                self._last_event_id = cursor
            if not after:
                # A stream from "now": an unbroken run of events starts after cursor
                # (a stream resumed after an id continues the run it belongs to).
                self._run_started(cursor)
        elif not self._last_event_id and not call.done():
            # A connected stream from a server that names no cursor: the events
            # since the last stream are unknown, so start clean.
            if not first:
                self._cache.clear()
                self.disconnected.clear()  # a reconnection may be among those missed
                self._marks_cleared += 1  # (a GetToken in flight is older than this)
            self._run_started("")

    def _run_started(self, cursor: str) -> None:
        if self.listener is not None:
            self.listener.run_started(cursor)

    async def close(self) -> None:
        await self._channel.close()

    async def ready(self) -> Readiness:
        """For ``/readyz``, within READY_DEADLINE_SECONDS. Concurrent callers share
        one check: probes, however many, cost two RPCs at a time."""
        check = self._ready_check
        if check is None or check.done():
            check = self._ready_check = asyncio.create_task(self._check_ready())
        return await asyncio.shield(check)

    async def _check_ready(self) -> Readiness:
        """Two RPCs at once, each with the deadline: the health service answers from
        the replica's memory (reachable?), ``GetAccount`` of an account that does not
        exist goes through the service-token check and Redis (NOT_FOUND: both fine)."""
        replica_answered, code = await asyncio.gather(self._health_answers(), self._probe_store())
        store_answered = code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
        store = "ok" if store_answered else "unknown"
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            result = "token_refused"
        elif store_answered:
            result = "ready"
        elif replica_answered:
            # A replica answered, its store did not in time: cached tokens still serve.
            result, store = "ready", "unavailable"
        else:
            result = "auth_unreachable"
        now = self._clock()
        valid = sum(1 for t in self._cache.values() if t.expires_at - self._skew > now)
        return Readiness(result, store, valid)

    async def _health_answers(self) -> bool:
        """Whether a replica answers the health service (whatever the status it gives:
        a draining one is one of several)."""
        try:
            await self._health.Check(
                health_pb2.HealthCheckRequest(service=AUTH_SERVICE),
                timeout=READY_DEADLINE_SECONDS,
            )
        except aio.AioRpcError:
            return False
        return True

    async def _probe_store(self) -> grpc.StatusCode:
        try:
            await self._stub.GetAccount(
                auth_pb2.GetAccountRequest(account_id=READY_PROBE_ACCOUNT),
                metadata=self._metadata,
                timeout=READY_DEADLINE_SECONDS,
            )
        except aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def watching(client: TokenClient) -> Any:
    task = asyncio.create_task(client.watch())
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
