"""The gateway worker as a plain ASGI application (served by uvicorn on uvloop + httptools).

No framework: the routes are a handful of fixed paths and the hot path should
do the least work possible. One request, ``POST /v1/messages``:

1. the gateway key (``x-api-key`` or ``Authorization: Bearer``) is hashed and
   looked up in the key book (config keys, then keys created at runtime, which
   ``KeyFollower`` keeps current): a route (account, mode, profile, upstream);
   a raw key seen before costs a dict lookup and a version compare;
2. the body is read up to ``max_request_bytes`` and parsed;
   then, for a key with limits (its own or its account's), one call to the
   limits store admits it or answers 429 (``_admit``); a key without limits
   makes no call at all;
3. the upstream credential: a cached OAuth token (no RPC in steady state) or
   the route's explicitly configured API key (``auto`` falls back to it only
   when the account is not connected);
4. the profile's request transforms (pure, ``gateway.core``);
5. the upstream call; on a 401 in OAuth mode, one retry with a newer token
   (before any byte reached the client);
6. the response: JSON mapped back in one piece, SSE through the stream
   transformer chunk by chunk;
7. metrics and one JSON log line (never a token or key); an admitted request's
   usage and cost go to the limits store's batch (``LimitsStore.record``: no wait,
   sent within milliseconds), whether or not the client stayed.

Errors the gateway makes itself use the Anthropic shape (``gateway.core.errors``);
anything unexpected becomes a 500 ``api_error`` without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from keyrelay.gateway.config import GatewayConfig, PoolMember, PoolRoute, Route
from keyrelay.gateway.cooldowns import CoolDowns
from keyrelay.gateway.core.errors import (
    ACCOUNT_DISCONNECTED,
    AUTH_UNAVAILABLE,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    LIMITS_UNAVAILABLE,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    RATE_LIMITED,
    REQUEST_TOO_LARGE,
    UNKNOWN_KEY,
    GatewayError,
)
from keyrelay.gateway.core.pools import (
    COOLING_STATUSES,
    OVERLOADED_ERROR,
    Pool,
    Strategy,
    all_cooling_retry_after,
    available_mask,
    cool_down_until,
    order,
    session_of,
)
from keyrelay.gateway.core.ratelimit import Subject
from keyrelay.gateway.core.request_transform import (
    RequestShapeError,
    TransformedRequest,
    decode_json_body,
    transform_headers,
    transform_request,
)
from keyrelay.gateway.core.response_transform import (
    StreamTransformer,
    error_type_of,
    first_event,
    first_event_error_type,
    inspect_response_json,
)
from keyrelay.gateway.core.usage import Billing, Usage
from keyrelay.gateway.http.front_door import note
from keyrelay.gateway.http.metrics import GatewayMetrics
from keyrelay.gateway.http.upstream import UpstreamResponse, Upstreams
from keyrelay.gateway.key_book import NEVER, KeyBook
from keyrelay.gateway.key_follower import KeyFollower
from keyrelay.gateway.keys import key_hash
from keyrelay.gateway.limits_store import Lease, LimitsStore, LimitsUnavailable
from keyrelay.gateway.tokens import (
    READY_DEADLINE_SECONDS,
    READY_WITHOUT_AUTH,
    Readiness,
    TokenClient,
    TokenError,
)
from keyrelay.gateway.tracing import record_outcome, traced_post, traced_proxy
from keyrelay.limit_rules import Limits
from keyrelay.log_limit import LineLimiter
from keyrelay.logs import LineWriter, json_line
from keyrelay.tracing import NOOP_TRACER, Tracer

log = logging.getLogger("keyrelay.gateway")
access_log = logging.getLogger("keyrelay.gateway.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MESSAGES: Final = "/v1/messages"
COUNT_TOKENS: Final = "/v1/messages/count_tokens"
# Response headers the gateway sets or that only describe the upstream hop.
_DROPPED_RESPONSE_HEADERS: Final = frozenset(
    {
        b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
        b"content-encoding", b"date", b"server", b"proxy-connection", b"upgrade", b"trailer",
        b"te",
    }
)  # fmt: skip
_JSON: Final = [(b"content-type", b"application/json")]
_EVENT_STREAM: Final = b"text/event-stream"
_MAX_KNOWN_KEYS: Final = 4096
# The most one send of a stream writes: uvicorn's send waits for its write buffer
# (64 KiB high-water on uvloop) to drain before writing, so a stream's share of
# it stays under the high-water mark plus one send. Twice the upstream client's
# step: a step and the event it completed go out in one send, uncut; only a
# larger single read is cut.
_SEND_BYTES: Final = 128 << 10
_STORE_LOG_INTERVAL: Final = 10.0  # seconds between two store-error lines of one operation
_NO_USAGE: Final = Usage()
_ORDERS: Final = 4096  # member orders kept (per pool, session and members available)


class ClientGone(Exception):
    """The client disconnected; nothing more can be sent."""


@dataclass(slots=True)
class Credential:
    header: tuple[str, str]
    billing: Billing
    generation: int = 0

    @property
    def oauth(self) -> bool:
        return self.billing is Billing.INCLUDED


@dataclass(slots=True)
class Outcome:
    """What one request did, for metrics and the access log."""

    route: Route | None = None
    status: int = 0
    billing: Billing | None = None
    upstream_status: int = 0
    upstream_seconds: float = 0.0
    usage: Usage | None = None
    model: str | None = None
    stream: bool = False
    error: str | None = None
    retried: bool = False
    # Set once the last byte went out: a disconnect after that is no failure.
    finished: bool = False
    # A key with limits: the admission to finish (None when not admitted or the
    # store was down), and the x-keyrelay-ratelimit-* headers of every answer.
    lease: Lease | None = None
    limit_headers: list[tuple[bytes, bytes]] | None = None
    # The account of the credential used (a route's, or a pool member's), and the
    # pool member that served (its name; None without a pool).
    account: str | None = None
    member: str | None = None
    member_id: str | None = None  # (its id: what its cool-down is kept under)
    pool_retries: int = 0  # members that cooled down before one served
    served_by: Subject | None = None  # the pool member's usage subject


@dataclass(frozen=True, slots=True)
class _Call:
    """A client's request as every upstream attempt of it needs it."""

    path: str
    route: Route
    body: dict[str, Any]
    raw: bytes
    query: list[tuple[str, str]]
    headers: list[tuple[bytes, bytes]]


def gateway_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    bearer = None
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                bearer = token.strip()
    return bearer


class GatewayApp:
    def __init__(
        self,
        config: GatewayConfig,
        token_client: Callable[[], TokenClient] | None,
        metrics: GatewayMetrics | None = None,
        tracer: Tracer = NOOP_TRACER,
        access_writer: LineWriter | None = None,
    ) -> None:
        """``token_client`` makes the client at startup: a gRPC channel belongs to
        the event loop it was made on, and uvicorn makes its loop after this.

        ``access_writer``: where the access lines go, formatted as ``JsonFormatter``
        would, without a ``LogRecord`` (``None``: through ``logging``)."""
        self.config = config
        self.access_writer = access_writer
        self._token_client = token_client
        self.tokens: TokenClient | None = None
        self.metrics = metrics or GatewayMetrics()
        # Every configured upstream: runtime keys may name any of them.
        upstreams = {r.upstream.name: r.upstream for r in config.routes.values()}
        upstreams |= config.upstreams
        self.upstreams = Upstreams(upstreams)
        self.metrics.upstream_pools.watch(self.upstreams.stats)
        self.tracer = tracer
        # Chosen once: without tracing the plain functions, so a request does no span work.
        self._proxy_entry = traced_proxy(tracer, self._proxy) if tracer.enabled else self._proxy
        self._post = (
            traced_post(tracer, self.upstreams.post, propagate=config.tracing.propagate_upstream)
            if tracer.enabled
            else self.upstreams.post
        )
        self._watch: asyncio.Task[None] | None = None
        # Config keys and runtime keys; the follower (with [gateway.auth]) loads and
        # follows the runtime ones.
        self.keys = KeyBook(config)
        self.key_follower: KeyFollower | None = None
        self._follow: asyncio.Task[None] | None = None
        # Request ids need to be unique, not secret: a PRNG seeded from the OS
        # (a getrandom syscall per request otherwise).
        self._request_ids = random.Random()  # noqa: S311 -- unique ids, not secrets
        # The serving loop, set at startup: asyncio.create_task() and current_task()
        # look it up with a getpid syscall each on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None
        # The routes of the valid keys seen so far, with their expiry: SHA-256 once per
        # key, not per request. Forgotten whenever the key book changes (its version),
        # so a revoked or updated key is never served from here.
        # (The process holds upstream keys and tokens anyway; these are no more secret.)
        self._known_keys: dict[str, tuple[Route, float]] = {}
        self._known_version = 0
        # The limits store, made at startup (its connection belongs to the loop).
        self.limits: LimitsStore | None = None
        # Pools: their members' cool-downs (on the limits store's connection), the
        # task that follows the other workers', and this worker's request count
        # (round robin's rotation).
        self.cooldowns: CoolDowns | None = None
        self._cooling: asyncio.Task[None] | None = None
        # (per pool: each pool's rotation its own)
        self._pool_requests: dict[str, int] = {}
        # The order of a pool's members per pool name, availability mask and session:
        # a session asks again and again (that is what affinity is for); at most
        # _ORDERS kept in all (_orders_held).
        self._orders: dict[str, dict[int, dict[bytes, tuple[int, ...]]]] = {
            name: {} for name in config.pools
        }
        self._orders_held = 0
        # Per pool, per member (in configured order): its "served" attempts counter
        # and its usage subject (kind "member", id "<pool>/<member id>"; a pool key's
        # usage is recorded under the member that served it too). Made once: the
        # request that a member serves only picks them up.
        self._served: dict[str, tuple[tuple[Counter, Subject], ...]] = {
            name: tuple(
                (
                    self.metrics.pool_attempts_for(name, member.name, "served"),
                    Subject("member", f"{name}/{member.id}", Limits(), member.name),
                )
                for member in pooled.members
            )
            for name, pooled in config.pools.items()
        }
        # Per pool, per member: its credential when it is an API key (it never
        # changes; never mutated), else None (a token, asked for per request).
        self._key_credentials: dict[str, tuple[Credential | None, ...]] = {
            name: tuple(
                Credential(("x-api-key", member.api_key), Billing.METERED)
                if member.mode == "api_key" and member.api_key is not None
                else None
                for member in pooled.members
            )
            for name, pooled in config.pools.items()
        }
        self._store_lines: LineLimiter[str] = LineLimiter(_STORE_LOG_INTERVAL)

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.upstreams.start()
        limits = self.config.limits
        if limits is not None:
            self.limits = LimitsStore.from_url(
                limits.redis_url,
                prefix=limits.key_prefix,
                timeout=limits.timeout_seconds,
                observe=self.metrics.observe_store,
                on_dropped=self._usage_dropped,
            )
            self.metrics.watch_limits_store(self.limits)
            if self.config.pools:
                self.cooldowns = CoolDowns(
                    self.limits.client,
                    prefix=limits.key_prefix,
                    members=[
                        (name, member.id)
                        for name, pooled in self.config.pools.items()
                        for member in pooled.members
                    ],
                    observe=self.metrics.observe_store,
                )
                self._cooling = asyncio.create_task(self.cooldowns.run())
        if self._token_client is not None:
            self.tokens = self._token_client()
            self.metrics.watch_token_cache(self.tokens)
            self.key_follower = KeyFollower(self.keys, self.tokens, self.metrics)
            self.tokens.listener = self.key_follower
            self._follow = asyncio.create_task(self.key_follower.run())
            self._watch = asyncio.create_task(self.tokens.watch())

    async def shutdown(self) -> None:
        if self.cooldowns is not None:
            await self.cooldowns.close()  # (stops its task)
        for task in (self._watch, self._follow, self._cooling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.upstreams.close()
        if self.tokens is not None:
            await self.tokens.close()
        if self.limits is not None:
            await self.limits.close()  # bounded: sends what it holds, waits its timeout
        if self.access_writer is not None:
            self.access_writer.flush()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in (MESSAGES, COUNT_TOKENS):
            if method != "POST":
                await self._error(send, GatewayError(METHOD_NOT_ALLOWED, f"{path} takes POST"))
                return
            await self._proxy_entry(scope, receive, send, path)
        elif path == "/healthz":
            await _respond(send, 200, b'{"status":"ok"}', _JSON)
        elif path == "/readyz":
            # README, "Readiness": an auth replica answers and takes the service token,
            # within READY_DEADLINE_SECONDS; the auth service's store may be down.
            readiness = await self._readiness()
            self.metrics.readiness_checks.labels(readiness.result).inc()
            await _respond(send, 200 if readiness.ready else 503, readiness.body(), _JSON)
        elif path == "/metrics":
            await _respond(
                send,
                200,
                generate_latest(self.metrics.registry),
                [(b"content-type", CONTENT_TYPE_LATEST.encode())],
            )
        else:
            await self._error(send, GatewayError(NOT_FOUND, f"no such endpoint: {method} {path}"))

    async def _readiness(self) -> Readiness:
        """README, "Readiness": also not ready until the runtime keys are loaded (a
        worker that answers 401 to valid keys should not be given requests yet)."""
        if self.tokens is None:
            return READY_WITHOUT_AUTH
        follower = self.key_follower
        if follower is None:
            return await self.tokens.ready()
        readiness, loaded = await asyncio.gather(
            self.tokens.ready(), follower.first_load(READY_DEADLINE_SECONDS)
        )
        result = "keys_loading" if readiness.ready and not loaded else readiness.result
        return dataclasses.replace(
            readiness,
            result=result,
            runtime_keys="loaded" if loaded else "loading",
            runtime_key_count=len(self.keys),
        )

    async def _error(
        self,
        send: Send,
        error: GatewayError,
        request_id: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = list(_JSON)
        if request_id:
            headers.append((b"request-id", request_id.encode()))
        if error.retry_after is not None:
            headers.append((b"retry-after", str(error.retry_after).encode()))
        if extra:
            headers += extra
        await _respond(send, error.status, error.body(request_id=request_id), headers)

    # -- the proxy ------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        started = time.perf_counter()
        request_id = f"req_kr_{self._request_ids.getrandbits(96):024x}"
        outcome = Outcome()
        watcher: asyncio.Task[None] | None = None
        try:
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            outcome.route = route = self._route(headers)
            raw = await self._read_body(receive, headers)
            # From here on the client can only go away: watch for it, so a
            # stream to a vanished client is cancelled instead of read to the end.
            loop = self._loop or asyncio.get_running_loop()
            watcher = loop.create_task(
                _cancel_on_disconnect(receive, asyncio.current_task(loop), outcome)
            )
            await self._forward(scope, send, path, route, raw, request_id, outcome)
        except GatewayError as error:
            outcome.status, outcome.error = error.status, error.message
            await self._error(send, error, request_id, outcome.limit_headers)
        except asyncio.CancelledError:
            if watcher is None or not watcher.done():
                raise
            outcome.status, outcome.error = 499, "client disconnected"
        except ClientGone:
            outcome.status, outcome.error = 499, "client disconnected"
        except Exception:
            log.exception("unexpected error", extra={"request_id": request_id})
            outcome.status, outcome.error = 500, "internal error"
            with contextlib.suppress(Exception):
                await self._error(
                    send,
                    GatewayError(INTERNAL_ERROR, "internal gateway error; see the gateway log"),
                    request_id,
                )
        finally:
            if watcher is not None:
                watcher.cancel()
            cost = self._record(outcome, request_id, time.perf_counter() - started)
            if outcome.lease is not None and self.limits is not None:
                usage = outcome.usage
                self.limits.record(
                    outcome.lease,
                    usage or _NO_USAGE,
                    0.0 if usage is None else cost,
                    time.time(),
                    also=outcome.served_by,
                )

    def _route(self, headers: list[tuple[bytes, bytes]]) -> Route:
        key = gateway_key(headers)
        if not key:
            raise GatewayError(
                UNKNOWN_KEY, "missing gateway key: send it as x-api-key or Authorization: Bearer"
            )
        book = self.keys
        if self._known_version != book.version:  # a runtime key changed: forget them all
            self._known_keys.clear()
            self._known_version = book.version
        known = self._known_keys.get(key)
        if known is not None:
            route, expires_at = known
            if expires_at == NEVER or expires_at > time.time():
                return route
        # Raises for a runtime key that expired or that this gateway did not take.
        found = book.lookup(key_hash(key), time.time())
        if found is None:
            raise GatewayError(
                UNKNOWN_KEY,
                "invalid gateway key: this key is not in the gateway's [[keys]] nor among its "
                "runtime keys (a typo, a revoked key, or another gateway's); ask for one "
                "(`keyrelay keys new`)",
            )
        # Valid keys only (an unknown key is hashed every time), and bounded.
        if len(self._known_keys) >= _MAX_KNOWN_KEYS:
            self._known_keys.clear()
        self._known_keys[key] = found
        return found[0]

    async def _read_body(self, receive: Receive, headers: list[tuple[bytes, bytes]]) -> bytes:
        limit = self.config.max_request_bytes
        content_type = b""
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise self._body_too_large(limit)
            if name == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()
        if content_type != b"application/json":
            raise GatewayError(INVALID_REQUEST, "content-type must be application/json")
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body"):
            first: bytes = message.get("body", b"")
            if len(first) > limit:
                raise self._body_too_large(limit)
            return first
        body = bytearray()
        while True:
            if message["type"] == "http.disconnect":
                raise ClientGone
            body += message.get("body", b"")
            if len(body) > limit:
                raise self._body_too_large(limit)
            if not message.get("more_body"):
                return bytes(body)
            message = await receive()

    def _body_too_large(self, limit: int) -> GatewayError:
        """The 413, counted and logged with the front door's rejections. The
        connection is then closed rather than the rest read (``front_door``),
        unless the body declared a length of at most twice the limit."""
        self.metrics.front_door.rejected["body_too_large"] += 1
        note(self.metrics.front_door, "body_too_large", max_request_bytes=limit)
        return GatewayError(REQUEST_TOO_LARGE, _too_large(limit))

    async def _credential(self, mode: str, account: str | None, api_key: str | None) -> Credential:
        """The upstream credential of a route, or of a pool's member (the same fields)."""
        if mode == "api_key":
            assert api_key is not None  # config guarantees it
            return Credential(("x-api-key", api_key), Billing.METERED)
        # The config guarantees both for the oauth and auto modes.
        assert self.tokens is not None
        assert account is not None
        try:
            token = await self.tokens.get(account)
        except TokenError as exc:
            if mode == "auto" and exc.status == 401 and api_key is not None:
                return Credential(("x-api-key", api_key), Billing.METERED)
            kind = ACCOUNT_DISCONNECTED if exc.status == 401 else AUTH_UNAVAILABLE
            raise GatewayError(kind, exc.message) from None
        return Credential(
            ("authorization", f"{token.token_type} {token.access_token}"),
            Billing.INCLUDED,
            token.generation,
        )

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        path: str,
        route: Route,
        raw: bytes,
        request_id: str,
        outcome: Outcome,
    ) -> None:
        body = _decode(raw)
        if route.subjects:  # messages and count_tokens alike (see README, "Limits")
            await self._admit(route, outcome)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        outcome.model = model
        call = _Call(path, route, body, raw, _query(scope), scope["headers"])
        pooled = route.pool
        if pooled is not None:
            # The first member to try is an API key (the common case): it is asked
            # here, without the failover machinery (one coroutine less per request);
            # an answer that is not plainly the client's goes to _pooled as its.
            cooling, tried = self._plan(call, pooled)
            credential = self._key_credentials[pooled.pool.name][tried[0]] if tried else None
            if credential is None:
                response, request = await self._pooled(call, pooled, outcome, cooling, tried)
            else:
                index = tried[0]
                outcome.member = pooled.members[index].name
                response, request = await self._exchange(call, credential, None, outcome)
                status = response.status
                if (
                    status < 500
                    and status != 429
                    and not response.content_type.startswith(_EVENT_STREAM)
                ):
                    self._served_by(pooled, index, outcome)
                else:
                    response, request = await self._pooled(
                        call, pooled, outcome, cooling, tried, (response, request)
                    )
        else:
            credential = await self._credential(route.mode, route.account, route.api_key)
            response, request = await self._exchange(call, credential, route.account, outcome)
        try:
            headers = _response_headers(response, request_id, outcome.limit_headers)
            if response.content_type.startswith(_EVENT_STREAM):
                outcome.stream = True
                await self._stream(send, response, route, request.tool_names, headers, outcome)
            else:
                data = await response.read_all()
                inspected = inspect_response_json(data, request.tool_names)
                outcome.usage = inspected.usage
                outcome.model = inspected.model or model
                outcome.status = response.status
                await _respond(send, response.status, inspected.body, headers)
            outcome.finished = True
        finally:
            response.release()

    async def _exchange(
        self, call: _Call, credential: Credential, account: str | None, outcome: Outcome
    ) -> tuple[UpstreamResponse, TransformedRequest]:
        """One request to the upstream with ``credential`` (of ``account``, if any): its
        response (a refused OAuth token is refreshed and the request sent once more)."""
        route = call.route
        outcome.billing = credential.billing
        outcome.account = account
        client_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in call.headers]
        try:
            request = transform_request(
                call.body,
                client_headers,
                route.profile,
                upstream_auth=credential.header,
                query=call.query,
            )
        except RequestShapeError as exc:
            raise GatewayError(INVALID_REQUEST, str(exc)) from None
        payload = request.body_bytes(call.raw)
        path = call.path

        sent_at = time.perf_counter()
        response = await self._post(route.upstream, path, request.headers, request.query, payload)
        if response.status == 401 and credential.oauth and account is not None:
            refused = response
            try:
                response = await self._refreshed(
                    call, account, credential, refused, client_headers, request, payload, outcome
                )
            except BaseException:  # a refusal, or the client gone meanwhile: not leaked
                refused.release()  # (releasing twice is a no-op)
                raise
        outcome.upstream_seconds = time.perf_counter() - sent_at
        outcome.upstream_status = response.status
        self.metrics.tally.observe(
            self.metrics.upstream_latency_for(route.upstream.name), outcome.upstream_seconds
        )
        return response, request

    def _plan(self, call: _Call, pooled: PoolRoute) -> tuple[Mapping[str, float], tuple[int, ...]]:
        """The members of the pool cooling now (id -> until), and the order in which
        to try the others: those of disconnected accounts left out; while the auth
        service does not answer, the members that would wait for it last."""
        cooldowns = self.cooldowns
        assert cooldowns is not None  # a pool needs the limits store (config)
        pool = pooled.pool
        tokens = self.tokens
        cooling = cooldowns.cooling(pool.name, time.time())
        if cooling or (tokens is not None and tokens.disconnected):
            available = self._available(pooled, cooling)
        else:
            available = pool.all_mask
        tried = self._order(pool, call, available)
        if tokens is not None and tokens.unreachable_until > time.time():
            # The auth service did not answer lately: the members that would wait for
            # it go last, so a pool with API keys (or tokens cached) does not wait.
            tried = _waiting_last(tried, pooled, tokens)
        return cooling, tried

    def _served_by(self, pooled: PoolRoute, index: int, outcome: Outcome) -> None:
        """Member ``index`` served the request: its usage subject, id and counter."""
        served, outcome.served_by = self._served[pooled.pool.name][index]
        outcome.member_id = pooled.members[index].id
        self.metrics.tally.inc(served)

    def _available(self, pooled: PoolRoute, cooling: Mapping[str, float]) -> int:
        """The availability mask: the members neither ``cooling`` nor of a
        disconnected account."""
        tokens = self.tokens
        gone = tokens.disconnected if tokens is not None else None
        disconnected = (
            [m.id for m in pooled.members if m.mode == "oauth" and m.account in gone]
            if gone
            else ()
        )
        return available_mask(pooled.pool, time.time(), cooling, disconnected)

    def _order(self, pool: Pool, call: _Call, available: int) -> tuple[int, ...]:
        """``pools.order`` of the ``available`` members for ``call``. An affinity
        session's order is remembered: a session asks again and again (that is what
        affinity is for). Round robin, and a request with no session, turn by this
        worker's count of the pool's requests (each pool its own rotation)."""
        if pool.strategy is Strategy.AFFINITY:
            session = session_of(call.headers, call.body)
            if session is not None:
                by_mask = self._orders[pool.name]
                orders = by_mask.get(available)
                if orders is None:
                    orders = by_mask[available] = {}
                found = orders.get(session)
                if found is None:
                    if self._orders_held >= _ORDERS:  # all forgotten: bounded, and rare
                        self._orders_held = 0
                        for held in self._orders.values():
                            held.clear()
                        orders = self._orders[pool.name][available] = {}
                    found = orders[session] = order(pool, session, available)
                    self._orders_held += 1
                return found
        counter = self._pool_requests[pool.name] = self._pool_requests.get(pool.name, 0) + 1
        return order(pool, None, available, counter)

    async def _cool(
        self,
        pool: str,
        member: str,
        pooled: PoolRoute,
        response: UpstreamResponse,
        error_type: str | None = None,
    ) -> float:
        """A member answered 429, 529 or ``overloaded_error`` (``error_type``, when
        already read): it cools down until the reset the answer gives (README,
        "Credential pools"), for every worker; returns until when. The answer is
        released."""
        try:
            if error_type is None:
                # A body cut or too large: the status alone decides.
                with contextlib.suppress(GatewayError):
                    error_type = error_type_of(await response.read_all())
        finally:  # (also when the client went away meanwhile)
            response.release()
        return self._note_cool(pool, member, pooled, response, error_type)

    def _note_cool(
        self,
        pool: str,
        member: str,
        pooled: PoolRoute,
        response: UpstreamResponse,
        error_type: str | None,
    ) -> float:
        """``member`` cools down after ``response`` (``cool_down_until``; a default
        when it says nothing), noted for every worker; returns until when."""
        assert self.cooldowns is not None
        at = time.time()
        until = cool_down_until(
            response.status,
            response.headers,
            error_type,
            at,
            pooled.default_cool_down_seconds,
            pooled.max_cool_down_seconds,
        )
        if until is None:  # (a 429 or 529 always cools; the rule says so)
            until = at + pooled.default_cool_down_seconds
        self.cooldowns.note(pool, member, until, at)
        return until

    async def _refreshed(
        self,
        call: _Call,
        account: str,
        credential: Credential,
        response: UpstreamResponse,
        client_headers: list[tuple[str, str]],
        request: TransformedRequest,
        payload: bytes,
        outcome: Outcome,
    ) -> UpstreamResponse:
        """The upstream refused ``credential``'s token: with a newer generation, the
        request sent once more (``response`` released); else ``response``."""
        route, path = call.route, call.path
        # The token was refused: get a newer generation and try once more.
        assert self.tokens is not None
        try:
            token = await self.tokens.rejected(account, credential.generation)
        except TokenError as exc:  # (the caller releases ``response``)
            kind = ACCOUNT_DISCONNECTED if exc.status == 401 else AUTH_UNAVAILABLE
            raise GatewayError(kind, exc.message) from None
        # The same generation back means the auth service refused a new refresh
        # (its forced-refresh cool-down): a retry would be refused the same way,
        # so the upstream's 401 is the answer.
        if token.generation > credential.generation:
            response.release()
            retry_headers = transform_headers(
                client_headers,
                route.profile,
                upstream_auth=("authorization", f"{token.token_type} {token.access_token}"),
            )
            outcome.retried = True
            self.metrics.upstream_retries.labels(route.name).inc()
            response = await self._post(route.upstream, path, retry_headers, request.query, payload)
        return response

    async def _pooled(
        self,
        call: _Call,
        pooled: PoolRoute,
        outcome: Outcome,
        cooling: Mapping[str, float],
        tried: tuple[int, ...],
        first: tuple[UpstreamResponse, TransformedRequest] | None = None,
    ) -> tuple[UpstreamResponse, TransformedRequest]:
        """The response of the first member of the pool that serves the request (README,
        "Credential pools"): members in ``order`` (affinity or round robin), each at
        most once, skipping those cooling down or disconnected; a member that answers
        429, 529 or ``overloaded_error`` cools down (shared by every worker) and the
        next one is tried, since nothing has reached the client yet. Any other
        answer is the client's. None served: 429 with the earliest return.
        ``cooling`` and ``tried``: ``_plan``'s; ``first``: the first member's answer,
        when ``_forward`` asked it already."""
        pool = pooled.pool
        tokens = self.tokens
        attempts, tally = self.metrics.pool_attempts_for, self.metrics.tally
        # What this request met, for its answer if no member serves: the cool-downs
        # it saw or caused (they may have ended by then), and the last refusal.
        cooled: tuple[float, ...] = ()
        refused: GatewayError | None = None
        auth_down = False
        for index in tried:
            member = pooled.members[index]
            if first is not None:  # the first member's answer, asked for by _forward
                (response, request), first = first, None
            elif auth_down and _waits_for_auth(member, tokens):
                continue  # one wait for an unreachable auth service per request
            else:
                try:
                    credential = await self._credential(member.mode, member.account, member.api_key)
                except GatewayError as exc:  # disconnected, or the auth service unreachable
                    refused, auth_down = exc, auth_down or exc.kind is AUTH_UNAVAILABLE
                    tally.inc(attempts(pool.name, member.name, "no_credential"))
                    continue
                outcome.member, outcome.retried = member.name, False
                try:
                    response, request = await self._exchange(
                        call, credential, member.account, outcome
                    )
                except GatewayError as exc:
                    if exc.kind not in (ACCOUNT_DISCONNECTED, AUTH_UNAVAILABLE):
                        raise
                    # Its token was refused and no newer one came (disconnected meanwhile).
                    refused, auth_down = exc, auth_down or exc.kind is AUTH_UNAVAILABLE
                    tally.inc(attempts(pool.name, member.name, "no_credential"))
                    continue
            overloaded = None
            if response.status not in COOLING_STATUSES:
                # (a JSON answer under 500, the common one, has nothing to look at)
                if response.status >= 500 or response.content_type.startswith(_EVENT_STREAM):
                    overloaded = await _overloaded(response)
                if overloaded is None:
                    self._served_by(pooled, index, outcome)
                    return response, request
            until = await self._cool(pool.name, member.id, pooled, response, overloaded)
            cooled += (until,)
            tally.inc(attempts(pool.name, member.name, "cooled"))
            outcome.pool_retries += 1
        outcome.member, outcome.account, outcome.billing = None, None, None
        raise _none_served(pool.name, [*cooling.values(), *cooled], refused)

    async def _stream(
        self,
        send: Send,
        response: UpstreamResponse,
        route: Route,
        tool_names: Any,
        headers: list[tuple[bytes, bytes]],
        outcome: Outcome,
    ) -> None:
        """The event stream, each event the moment it is complete; only whole events.

        Memory: ``chunks()`` hands over steps of about ``STEP_BYTES`` and keeps the
        upstream read paused while this holds or sends them; a send waits
        while uvicorn's write buffer is full (its flow control), and one send is at
        most ``_SEND_BYTES``: a slow client holds the upstream back, nothing piles
        up. A cut (an upstream error mid-body, or a body that ends mid-event or
        before ``message_stop``) drops the partial event and ends the stream with
        an ``error`` event (``StreamTransformer.abort``/``close``)."""
        transformer = StreamTransformer(tool_names, self.config.max_event_bytes)
        outcome.status = response.status
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            try:
                async with contextlib.aclosing(response.chunks()) as body:
                    async for chunk in body:
                        out = transformer.feed(chunk)
                        del chunk  # not held while a send waits
                        if out:
                            await _send_body(send, out)
                        del out
                        if transformer.failed:
                            break
                tail = transformer.close()
            except GatewayError as error:
                # Headers are out: the failure travels as an error event.
                tail = transformer.abort(error.message, error.kind.type)
            outcome.error = transformer.error
        finally:
            # Also when the client went away (a cancel): the usage seen so far counts.
            outcome.usage = transformer.usage if transformer.usage_seen else None
            outcome.model = transformer.model or outcome.model
            pooled, member = route.pool, outcome.member_id
            if pooled is not None and member is not None:
                # Overloaded after the first byte: not retried (the client has its
                # first events), but the member cools down all the same; also when
                # the client hung up on the error event before the stream ended.
                error_type = transformer.upstream_error_type()
                if error_type == OVERLOADED_ERROR:
                    self._note_cool(pooled.pool.name, member, pooled, response, error_type)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    # -- limits ---------------------------------------------------------------

    async def _admit(self, route: Route, outcome: Outcome) -> None:
        """Admits the request against the limits of the key and its account (one store
        call), or raises the 429. The store unreachable: ``on_store_error``."""
        store, config = self.limits, self.config.limits
        assert store is not None  # subjects need a store (the config checks it)
        assert config is not None
        m = self.metrics
        try:
            admission = await store.admit(route.subjects, time.time())
        except LimitsUnavailable as exc:
            m.tally.inc(m.limit_decisions_for(route.name, "store_error", "-"))
            self._store_trouble("admit", exc, config.on_store_error)
            if config.on_store_error == "deny":
                raise GatewayError(
                    LIMITS_UNAVAILABLE,
                    "the gateway cannot check this key's limits (its limits store is "
                    "unreachable) and is configured to refuse requests meanwhile "
                    "(gateway.limits.on_store_error = deny); retry shortly",
                    retry_after=1,
                ) from None
            return
        decision = admission.decision
        outcome.limit_headers = list(admission.headers)
        if admission.lease is not None:
            outcome.lease = admission.lease
            m.tally.inc(m.limit_decisions_for(route.name, "allowed", "-"))
            return
        refused = decision.refused_by
        budget = decision.budget_exhausted
        m.tally.inc(
            m.limit_decisions_for(
                route.name, "budget" if budget else "limited", refused.kind if refused else "-"
            )
        )
        if budget:
            outcome.limit_headers.append((b"x-should-retry", b"false"))
        raise GatewayError(
            RATE_LIMITED,
            decision.message() or "rate limit exceeded",
            retry_after=decision.retry_after,
        )

    def _usage_dropped(self, count: int, reason: str) -> None:
        """The limits store gave up recording ``count`` requests' usage (their leases
        expire): counted, and told at most once per ``_STORE_LOG_INTERVAL``."""
        self.metrics.limits_usage_dropped.labels(reason).inc(count)
        config = self.config.limits
        policy = config.on_store_error if config is not None else "-"
        detail = f"{count} usage records dropped: " + (
            "too many waiting" if reason == "full" else "the store did not take them"
        )
        self._store_trouble("finish", LimitsUnavailable(detail), policy)

    def _store_trouble(self, operation: str, exc: LimitsUnavailable, policy: str) -> None:
        """A warning line, at most one per operation per ``_STORE_LOG_INTERVAL``
        (``suppressed``: the lines left out since); the metrics count every one."""
        left_out = self._store_lines.admit(operation, time.monotonic())
        if left_out is not None:
            log.warning(
                "limits store unavailable",
                extra={
                    "operation": operation,
                    "on_store_error": policy,
                    "error": str(exc),
                    "suppressed": left_out,
                },
            )

    # -- accounting -----------------------------------------------------------

    def _record(self, outcome: Outcome, request_id: str, seconds: float) -> float | None:
        """Metrics and the access line; returns the cost (None: metered, unpriced)."""
        route = outcome.route
        route_name = route.name if route else "-"
        billing = outcome.billing
        mode = billing.value if billing else "-"  # an enum's .value is a property call
        m = self.metrics
        tally = m.tally
        tally.inc(m.requests_for(route_name, str(outcome.status), mode))
        tally.observe(m.latency_for(route_name, "true" if outcome.stream else "false"), seconds)
        if outcome.stream and outcome.error:
            tally.inc(m.stream_errors_for(route_name))
        cost = None
        account = outcome.account or (route.account if route else None) or "-"
        if outcome.usage is not None and billing is not None:
            usage = outcome.usage
            for kind, count in (
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
                ("cache_creation", usage.cache_creation_input_tokens),
                ("cache_read", usage.cache_read_input_tokens),
            ):
                if count:
                    tally.inc(m.tokens_for(account, mode, kind), count)
            cost = self.config.prices.cost(usage, outcome.model, billing)
            if cost:
                tally.inc(m.cost_for(account, mode), cost)
        entry: dict[str, Any] = {
            "request_id": request_id,
            "route": route_name,
            "account": account,
            "billing": mode if billing else None,
            "status": outcome.status,
            "upstream_status": outcome.upstream_status or None,
            "stream": outcome.stream,
            "model": outcome.model,
            "duration_ms": round(seconds * 1000, 2),
            "upstream_ms": round(outcome.upstream_seconds * 1000, 2),
            "retried_after_401": outcome.retried,
        }
        if outcome.member is not None or outcome.pool_retries:
            entry["member"] = outcome.member
            entry["pool_retries"] = outcome.pool_retries
        if outcome.usage is not None:
            entry["usage"] = {
                "input": outcome.usage.input_tokens,
                "output": outcome.usage.output_tokens,
                "cache_creation": outcome.usage.cache_creation_input_tokens,
                "cache_read": outcome.usage.cache_read_input_tokens,
            }
            entry["cost_usd"] = cost
        if outcome.error:
            entry["error"] = outcome.error
        if access_log.isEnabledFor(logging.INFO):
            if self.access_writer is not None:
                self.access_writer.write(json_line(access_log.name, "info", "request", entry))
            else:
                _access(entry)
        if self.tracer.enabled:
            record_outcome(self.tracer, outcome, request_id)
        return cost


def _access(entry: dict[str, Any]) -> None:
    """``access_log.info("request", extra=entry)`` minus the caller lookup (a stack
    walk per line for file/line fields that the JSON lines do not carry)."""
    access_log.handle(
        access_log.makeRecord(
            access_log.name, logging.INFO, "", 0, "request", (), None, extra=entry
        )
    )


async def _send_body(send: Send, data: bytes) -> None:
    """Part of a stream to the client, in sends of at most ``_SEND_BYTES``: what
    one stream adds to uvicorn's write buffer before a send waits is bounded."""
    if len(data) <= _SEND_BYTES:
        await send({"type": "http.response.body", "body": data, "more_body": True})
        return
    for start in range(0, len(data), _SEND_BYTES):
        piece = data[start : start + _SEND_BYTES]
        await send({"type": "http.response.body", "body": piece, "more_body": True})


def _none_served(
    pool: str, cooling_until: list[float], refused: GatewayError | None
) -> GatewayError:
    """The answer when no member of ``pool`` served: 429 with the earliest return of
    the cool-downs the request met (``cooling_until``), else the last refusal, else
    (every member's account disconnected) that."""
    if cooling_until:
        return GatewayError(
            RATE_LIMITED,
            f"every member of pool {pool!r} is rate limited or overloaded "
            "upstream; retry after the time given",
            retry_after=all_cooling_retry_after(cooling_until, time.time()),
        )
    if refused is not None:
        return refused
    return GatewayError(
        ACCOUNT_DISCONNECTED,
        f"no member of pool {pool!r} can serve: the accounts of all of them are "
        "disconnected; connect one again (keyrelay connect)",
    )


def _waits_for_auth(member: PoolMember, tokens: TokenClient | None) -> bool:
    """Would this member's credential need a GetToken now (no token cached)?"""
    return (
        member.mode != "api_key"
        and tokens is not None
        and member.account is not None
        and not tokens.cached(member.account)
    )


def _waiting_last(
    tried: tuple[int, ...], pooled: PoolRoute, tokens: TokenClient
) -> tuple[int, ...]:
    """``tried`` with the members that would wait for the auth service moved to the
    end, in their order: tried only when no other member served."""
    members = pooled.members
    waiting = [i for i in tried if _waits_for_auth(members[i], tokens)]
    return tuple([i for i in tried if i not in waiting] + waiting) if waiting else tried


# What of an answer is read for an overload that its status does not tell: an
# error body, or a stream's first event (the Messages API's are far smaller).
_PEEK_BYTES: Final = 16 << 10
# The longest a pool key's stream response is held for its first event: the API
# sends it with the headers; an upstream that trickles comments meanwhile is
# passed on as it comes after this.
_HOLD_SECONDS: Final = 10.0


async def _overloaded(response: UpstreamResponse) -> str | None:
    """``overloaded_error`` when an answer that is not a 429 or 529 says so all the
    same, before any of it has reached the client: a 5xx whose error body has
    that type (a proxy on the way may turn a 529 into a 503), or a 200 stream
    whose first event is such an ``error`` event; else None. What is read to
    know stays in the answer, for the client (``UpstreamResponse.peek``). The
    answer is released if this raises (the client gone meanwhile, or a stream
    that broke before its first event)."""
    try:
        return await _overload_of(response)
    except BaseException:
        response.release()
        raise


async def _overload_of(response: UpstreamResponse) -> str | None:
    status = response.status
    if status >= 500:
        error_type = error_type_of(await response.peek(_PEEK_BYTES))
    elif status == 200 and response.content_type.startswith(_EVENT_STREAM):
        try:
            async with asyncio.timeout(_HOLD_SECONDS):
                head = await response.peek(_PEEK_BYTES, lambda head: first_event(head) is not None)
        except TimeoutError:  # no first event yet (comments trickling): hold no longer
            return None
        if response.error is not None and first_event(head) is None:
            # It broke before its first event: nothing has reached the client, so it
            # gets the error's own status (502, 504), not a 200 and an error event.
            raise response.error
        error_type = first_event_error_type(head)
    else:
        return None
    return error_type if error_type == OVERLOADED_ERROR else None


def _too_large(limit: int) -> str:
    return f"request body is larger than the gateway's limit of {limit} bytes"


def _query(scope: Scope) -> list[tuple[str, str]]:
    raw: bytes = scope.get("query_string", b"")
    if not raw:
        return []
    return parse_qsl(raw.decode("latin-1"), keep_blank_values=True)


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        return decode_json_body(raw)
    except ValueError as exc:
        raise GatewayError(INVALID_REQUEST, f"request body is not valid JSON: {exc}") from None


def _response_headers(
    response: UpstreamResponse, request_id: str, extra: list[tuple[bytes, bytes]] | None
) -> list[tuple[bytes, bytes]]:
    headers = [h for h in response.headers if h[0] not in _DROPPED_RESPONSE_HEADERS]
    headers.append((b"x-keyrelay-request-id", request_id.encode()))
    if extra:
        headers += extra
    return headers


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _cancel_on_disconnect(
    receive: Receive, task: asyncio.Task[Any] | None, outcome: Outcome
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if task is not None and not outcome.finished:
                task.cancel()
            return


__all__ = ["GatewayApp", "gateway_key"]
