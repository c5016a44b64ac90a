"""The auth service's behaviour (DESIGN.md §1), free of gRPC.

The gRPC servicer only converts messages and calls into ``AuthService``; the
decisions come from ``core`` (pure), the state from ``RedisStore`` and the
token calls from ``ProviderClient``.

How ``get_token`` refreshes (§1.2, §1.2.1): every decision is taken by
``core.refresh.RefreshAttempt``, a state machine without I/O; this module is its
driver. It carries out the machine's commands (Redis reads and scripts, the token
call, sleeps), renews the lock's lease while a token call runs, and hands the
outcomes back with the time.

1. Fast path: the machine's first step runs inline: one ``HGETALL`` and a fresh
   token is decrypted and returned.
2. In a replica, concurrent callers of an account share one attempt (a task no
   caller can cancel); a caller whose own needs the shared result does not meet
   runs one attempt of its own.
3. ``drain`` (SIGTERM) stops new token calls and waits for those in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

from redis.exceptions import RedisError

from keyrelay.auth import metrics
from keyrelay.auth.config import (
    DEFAULT_EVENTS_MAX_SUBSCRIBERS,
    DEFAULT_EVENTS_SUBSCRIBER_QUEUE,
    ProviderConfig,
)
from keyrelay.auth.core import pkce
from keyrelay.auth.core.authorize import build_authorize_url
from keyrelay.auth.core.codes import parse_pasted_code, resolve_state
from keyrelay.auth.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from keyrelay.auth.core.gateway_keys import (
    KeyChanges,
    KeyRecord,
    Route,
    validate_changes,
    validate_expires_at,
    validate_key_id,
    validate_name,
    validate_route,
)
from keyrelay.auth.core.ids import validate_account_id
from keyrelay.auth.core.refresh import (
    AccountState,
    CallTokenEndpoint,
    CheckHolder,
    Command,
    Fail,
    HolderState,
    LetLeaseExpire,
    LockTaken,
    Outcome,
    ReadAccount,
    RecordFailure,
    RefreshAttempt,
    ReleaseLock,
    ServeFresh,
    ServeStored,
    Sleep,
    Timings,
    TryLock,
    WriteDisconnect,
    WriteRefreshed,
    Written,
    satisfies,
)
from keyrelay.auth.core.store_failure import store_operation
from keyrelay.auth.core.tokens import FailureKind, TokenEndpointError, TokenSet
from keyrelay.auth.core.usage import (
    UsageReport,
    UsageRow,
    check_rows,
    day_labels,
    report,
    utc_today,
    validate_query,
)
from keyrelay.auth.events import EventHub, Watch
from keyrelay.auth.provider_client import ProviderClient
from keyrelay.auth.store.crypto import DecryptError
from keyrelay.auth.store.keys_store import KeyStore, Refused, new_key_id
from keyrelay.auth.store.redis_store import (
    AccountRecord,
    FlowRecord,
    RedisStore,
    StoredTokens,
)
from keyrelay.auth.store.usage_store import UsageStore
from keyrelay.gateway.keys import key_hash, new_key
from keyrelay.limit_rules import Limits
from keyrelay.log_limit import LineLimiter
from keyrelay.tracing import NOOP_TRACER, Tracer

log = logging.getLogger("keyrelay.auth")

FLOW_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}\Z")
# Larger minimums would make every call refresh when the provider issues
# shorter-lived tokens; an hour is the common access-token lifetime.
MAX_MIN_TTL_SECONDS = 3600
DEFAULT_TIMINGS = Timings()
# Between tries to store tokens the provider already issued (Redis down meanwhile).
STORE_RETRY_SECONDS = 0.5
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}\Z")
MAX_EVENT_ID_PART = 2**64 - 1  # each half of a Redis stream id is a 64-bit number
# Store errors: one log line per operation and error class per this many seconds
# (each line counts those left out; the metric counts every error).
STORE_ERROR_LOG_INTERVAL_SECONDS = 10.0
STORE_ERROR_LINE = "token store (Redis) error"
STORE_BACK_LINE = "token store (Redis) answers again"
MAX_DETAIL_CHARS = 200
# Where store_operation finds the operation.
_STORE_MODULES = (RedisStore.__module__, KeyStore.__module__, UsageStore.__module__)
_ANSWERS_AGAIN = ("", "answers again")  # the limiter's key of STORE_BACK_LINE
# The readiness check of Redis (web /readyz) answers within this: a kubelet's probe
# waits 1 s by default, and redis-py's reconnect retries would take seconds.
READY_DEADLINE_SECONDS = 0.8


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    generation: int


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: KeyRecord
    secret: str = field(repr=False)  # the gateway key: returned once, stored nowhere


@dataclass(frozen=True, slots=True)
class StartedFlow:
    flow_id: str
    authorize_url: str
    expires_at: float


def _expected(version: int) -> int | None:
    """An RPC's ``expected_version``: 0 means "whatever the version is"."""
    if version < 0:
        raise InvalidArgument(f"expected_version must not be negative (got {version})")
    return version or None


def _key_log(record: KeyRecord) -> dict[str, object]:
    return {
        "key_id": record.key_id,
        "key_name": record.name,
        "account_id": record.route.account_id,
        "version": record.version,
    }


def failure_level(kind: FailureKind) -> int:
    """``invalid_client`` and other misconfiguration need an operator: error; the rest warn."""
    return logging.ERROR if kind is FailureKind.MISCONFIGURED else logging.WARNING


class _Run:
    """The I/O state of one refresh attempt: what the driver read, holds and received."""

    __slots__ = ("attempt", "fresh", "lock_settled", "owner", "record", "renewer", "sent", "tokens")

    def __init__(self, attempt: RefreshAttempt) -> None:
        self.attempt = attempt
        self.owner: str | None = None  # the lock's owner token, once taken
        self.record: AccountRecord | None = None  # the last read
        self.tokens: StoredTokens | None = None  # decrypted from it
        self.fresh: TokenSet | None = None  # the provider's answer
        self.renewer: asyncio.Task[None] | None = None
        self.sent = False  # a token call may have reached the provider
        self.lock_settled = False  # released, left to expire, or released by the write

    async def stop_renewing(self) -> None:
        if self.renewer is not None:
            self.renewer.cancel()
            await asyncio.gather(self.renewer, return_exceptions=True)
            self.renewer = None


class StoreErrors:
    """The one place where Redis and decryption failures become domain errors:
    ``with self._store_errors:`` around store calls.

    Every failure is counted (``keyrelay_auth_store_errors_total``, by operation and
    error class) and logged as an error naming the operation (the store method, read
    from the traceback: ``store_operation``), the error class and the Redis address
    without credentials; at most one line per operation and class per
    ``interval`` seconds, which says how many lines were left out before it
    (``suppressed``). The first success after Redis errors logs, as a warning,
    that the store answers again and how many operations failed meanwhile (no
    more often than ``interval`` either: what is not logged is carried on).
    """

    __slots__ = ("_address", "_clock", "_errors", "_failing", "_first_error_at", "_lines")

    def __init__(
        self,
        address: str,
        *,
        interval: float = STORE_ERROR_LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = address or "unknown"
        self._lines: LineLimiter[tuple[str, str]] = LineLimiter(interval)
        self._clock = clock
        self._failing = False  # the last store operation failed with a Redis error
        self._errors = 0  # Redis errors since the last "answers again" line
        self._first_error_at = 0.0  # the first of those

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            if self._failing:
                self.answered()
        elif isinstance(exc, RedisError):
            kind = type(exc).__name__
            self.failed(store_operation(tb, _STORE_MODULES), kind, str(exc))
            raise Unavailable(f"token store (Redis) unavailable: {kind}") from exc
        elif isinstance(exc, DecryptError):
            operation = store_operation(tb, _STORE_MODULES)
            metrics.store_error(operation, "DecryptError")
            suppressed = self._lines.admit((operation, "DecryptError"), self._clock())
            if suppressed is not None:
                log.error(
                    "stored tokens cannot be decrypted",
                    extra={"error": str(exc), "suppressed": suppressed},
                )
            raise Unavailable(
                "stored tokens cannot be decrypted with the configured encryption keys"
            ) from exc

    def failed(self, operation: str, kind: str, detail: str) -> None:
        """A Redis operation failed: count it, log it (rate-limited)."""
        metrics.store_error(operation, kind)
        now = self._clock()
        if self._errors == 0:
            self._first_error_at = now
        self._errors += 1
        self._failing = True
        suppressed = self._lines.admit((operation, kind), now)
        if suppressed is not None:
            log.error(
                STORE_ERROR_LINE,
                extra={
                    "operation": operation,
                    "error": kind,
                    "detail": detail[:MAX_DETAIL_CHARS],
                    "address": self._address,
                    "suppressed": suppressed,
                },
            )

    def answered(self) -> None:
        """A Redis operation succeeded."""
        if not self._failing:
            return
        self._failing = False
        now = self._clock()
        if self._lines.admit(_ANSWERS_AGAIN, now) is None:
            return
        log.warning(
            STORE_BACK_LINE,
            extra={
                "address": self._address,
                "errors": self._errors,
                "down_seconds": round(now - self._first_error_at, 1),
            },
        )
        self._errors = 0


class AuthService:
    def __init__(
        self,
        store: RedisStore,
        providers: Mapping[str, ProviderConfig],
        provider_client: ProviderClient,
        timings: Timings = DEFAULT_TIMINGS,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        tracer: Tracer = NOOP_TRACER,
        store_address: str = "",
        events: EventHub | None = None,
    ) -> None:
        """``store_address``: how log lines name Redis, without credentials
        (``store_failure.redis_address`` of the configured URL). ``events``: the
        replica's reader of the event stream (default: one with the default limits)."""
        self._store = store
        self._keys = KeyStore(store)
        self._usage = UsageStore(store)
        self._events = events or EventHub(
            store,
            queue_events=DEFAULT_EVENTS_SUBSCRIBER_QUEUE,
            max_subscribers=DEFAULT_EVENTS_MAX_SUBSCRIBERS,
        )
        self._store_errors = StoreErrors(store_address)
        self._ready_check: asyncio.Task[bool] | None = None
        self._providers = providers
        self._client = provider_client
        self._t = timings
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._refreshes: dict[str, asyncio.Task[Token]] = {}
        self._stopping = False
        self._tracer = tracer

    # -- flows --------------------------------------------------------------

    def _provider(self, name: str) -> ProviderConfig:
        provider = self._providers.get(name)
        if provider is None:
            known = ", ".join(sorted(self._providers)) or "none"
            raise NotFound(f"unknown provider {name!r} (configured: {known})")
        return provider

    async def start_flow(
        self, account_id: str, provider_name: str, redirect_uri: str = ""
    ) -> StartedFlow:
        validate_account_id(account_id)
        provider = self._provider(provider_name)
        redirect_uri = redirect_uri or provider.redirect_uris[0]
        if redirect_uri not in provider.redirect_uris:
            raise InvalidArgument(
                f"redirect_uri is not allowed for provider {provider.name!r}; "
                f"allowed: {', '.join(provider.redirect_uris)}"
            )
        verifier = pkce.new_verifier()
        state = pkce.new_state()
        now = self._clock()
        flow = FlowRecord(
            flow_id=secrets.token_urlsafe(24),
            account_id=account_id,
            provider=provider.name,
            redirect_uri=redirect_uri,
            state=state,
            verifier=verifier,
            expires_at=now + self._t.flow_ttl,
        )
        url = build_authorize_url(
            provider.authorize_url,
            client_id=provider.client_id,
            redirect_uri=redirect_uri,
            scopes=provider.scopes,
            state=state,
            code_challenge=pkce.s256_challenge(verifier),
            extra_params=dict(provider.authorize_params),
        )
        with self._store_errors:
            await self._store.put_flow(flow, self._t.flow_ttl)
        log.info("flow started", extra={"account_id": account_id, "provider": provider.name})
        return StartedFlow(flow.flow_id, url, flow.expires_at)

    async def _get_flow(self, flow_id: str) -> FlowRecord:
        flow = None
        if FLOW_ID.match(flow_id):
            with self._store_errors:
                flow = await self._store.get_flow(flow_id)
        if flow is None:
            raise NotFound("flow not found: it expired, was cancelled or was already used")
        return flow

    async def submit_code(self, flow_id: str, pasted: str, state: str = "") -> AccountRecord:
        flow = await self._get_flow(flow_id)
        code = parse_pasted_code(pasted)
        resolve_state(code, state or None, flow.state)
        with self._store_errors:
            claimed = await self._store.claim_flow(flow_id)
        if claimed is None:
            raise NotFound("flow not found: it expired, was cancelled or was already used")
        provider = self._provider(claimed.provider)
        try:
            with self._token_call(provider.name, "exchange"):
                # Shielded: a caller that goes away must not cut a code exchange in
                # flight, whose answer holds the only copy of the new grant's tokens.
                tokens = await asyncio.shield(
                    self._client.exchange_code(
                        provider,
                        code=code.code,
                        verifier=claimed.verifier,
                        redirect_uri=claimed.redirect_uri,
                        now=self._clock(),
                        answer_within=self._t.refresh_deadline,
                    )
                )
        except TokenEndpointError as err:
            log.log(
                failure_level(err.kind),
                "code exchange failed",
                extra={"account_id": claimed.account_id, "kind": err.kind.name, "error": err.error},
            )
            if err.kind is FailureKind.NOT_SENT:
                raise Unavailable(f"{err}; the code was not used, but start a new flow") from None
            if err.kind in (FailureKind.TRANSIENT, FailureKind.ANSWER_LOST):
                raise Unavailable(f"{err}; the code may be used up, so start a new flow") from None
            raise FailedPrecondition(
                f"the provider refused the code: {err.error or 'error'}"
                f"{': ' + err.description if err.description else ''}; start a new flow"
            ) from None
        now = self._clock()
        with self._store_errors:
            await self._store.connect(
                claimed.account_id,
                provider=provider.name,
                scopes=tokens.scopes,
                tokens=StoredTokens(tokens.access_token, tokens.refresh_token),
                token_type=tokens.token_type,
                expires_at=tokens.expires_at,
                now=now,
            )
            metrics.event("CONNECTED")
            record = await self._store.get_account(claimed.account_id)
        log.info(
            "account connected",
            extra={"account_id": claimed.account_id, "provider": provider.name},
        )
        assert record is not None  # written by the line above
        return record

    async def cancel_flow(self, flow_id: str) -> None:
        deleted = False
        if FLOW_ID.match(flow_id):
            with self._store_errors:
                deleted = await self._store.delete_flow(flow_id)
        if not deleted:
            raise NotFound("flow not found: it expired, was cancelled or was already used")

    # -- accounts -----------------------------------------------------------

    async def get_account(self, account_id: str) -> AccountRecord:
        validate_account_id(account_id)
        with self._store_errors:
            record = await self._store.get_account(account_id)
        if record is None:
            raise NotFound(f"account {account_id!r} was never connected")
        return record

    async def list_accounts(self) -> list[AccountRecord]:
        with self._store_errors:
            ids = await self._store.list_account_ids()
            records = [await self._store.get_account(i) for i in ids]
        return [r for r in records if r is not None]

    async def disconnect(self, account_id: str) -> AccountRecord:
        record = await self.get_account(account_id)
        if record.connected:
            await self._revoke_quietly(record)
            with self._store_errors:
                if await self._store.disconnect(
                    account_id, reason="user", expected_generation=None, now=self._clock()
                ):
                    metrics.event("DISCONNECTED")
            log.info("account disconnected by user", extra={"account_id": account_id})
        return await self.get_account(account_id)

    async def _revoke_quietly(self, record: AccountRecord) -> None:
        provider = self._providers.get(record.provider)
        if provider is None or provider.revoke_url is None or record.tokens_blob is None:
            return
        try:
            with self._store_errors:
                tokens = self._store.decrypt_tokens(record)
            if tokens.refresh_token:
                token, hint = tokens.refresh_token, "refresh_token"
            else:
                token, hint = tokens.access_token, "access_token"
            with self._token_call(provider.name, "revoke"):
                await self._client.revoke(provider, token=token, token_type_hint=hint)
        except (TokenEndpointError, Unavailable) as exc:
            log.warning(
                "revocation at the provider failed; tokens are deleted here anyway",
                extra={"account_id": record.account_id, "error": str(exc)},
            )

    # -- tokens -------------------------------------------------------------

    async def get_token(
        self, account_id: str, min_ttl: float = 0.0, stale_generation: int = 0
    ) -> Token:
        validate_account_id(account_id)
        if not 0 <= min_ttl <= MAX_MIN_TTL_SECONDS:
            raise InvalidArgument(f"min_ttl_seconds must be between 0 and {MAX_MIN_TTL_SECONDS}")
        if stale_generation < 0:
            raise InvalidArgument("stale_generation must not be negative")
        # The fast path is the machine's first step, run inline: one HGETALL, one decrypt.
        attempt = self._attempt(account_id, min_ttl, stale_generation)
        run = _Run(attempt)
        command = attempt.step(
            await self._execute(run, attempt.start(self._clock())), self._clock()
        )
        if attempt.done:
            return self._finish(run, command)
        # A refresh is needed. Callers in this replica share one attempt, and a caller
        # that goes away never cancels it (nor a token call it has in flight).
        for _joins in range(2):
            task, joined = self._shared_attempt(account_id, min_ttl, stale_generation)
            token = await asyncio.shield(task)
            if not joined or satisfies(
                generation=token.generation,
                expires_at=token.expires_at,
                now=self._clock(),
                min_ttl=min_ttl,
                skew=self._t.skew,
                stale_generation=stale_generation,
            ):
                return token
            # Another caller's attempt answered another question (a shorter min_ttl, an
            # older stale generation): one attempt for this caller's own.
        return token

    def _attempt(self, account_id: str, min_ttl: float, stale_generation: int) -> RefreshAttempt:
        return RefreshAttempt(
            account_id,
            min_ttl=min_ttl,
            stale_generation=stale_generation,
            timings=self._t,
            rng=self._rng,
        )

    def _shared_attempt(
        self, account_id: str, min_ttl: float, stale_generation: int
    ) -> tuple[asyncio.Task[Token], bool]:
        """The attempt in flight for the account, or a new one; and whether it was joined."""
        task = self._refreshes.get(account_id)
        if task is not None:
            return task, True
        task = asyncio.create_task(self._refresh_task(account_id, min_ttl, stale_generation))
        self._refreshes[account_id] = task
        task.add_done_callback(lambda t: self._forget_refresh(account_id, t))
        return task, False

    async def _refresh_task(self, account_id: str, min_ttl: float, stale: int) -> Token:
        # The task copies the first caller's context: its span is this one's parent.
        with self._tracer.span("keyrelay.refresh", {"keyrelay.account": account_id}):
            attempt = self._attempt(account_id, min_ttl, stale)
            run = _Run(attempt)
            try:
                command = attempt.start(self._clock())
                while not attempt.done:
                    outcome = await self._execute(run, command)
                    command = attempt.step(outcome, self._clock(), stopping=self._stopping)
                return self._finish(run, command)
            finally:
                await run.stop_renewing()
                if run.owner is not None and not run.lock_settled:
                    await self._after_error(run)

    async def _after_error(self, run: _Run) -> None:
        """An error (Redis down, a bug) ended the attempt while it held the lock."""
        if run.sent:
            # The provider may have rotated the refresh token: never release early.
            log.warning(
                "refresh attempt failed after its token call; the lock is left to expire",
                extra={"account_id": run.attempt.account_id},
            )
            return
        assert run.owner is not None
        await self._release(run.attempt.account_id, run.owner)

    async def drain(self) -> None:
        """Stop starting token calls and wait for the attempts in flight (each ends by
        its deadline): SIGTERM never abandons a refresh whose answer is on its way."""
        self._stopping = True
        if self._refreshes:
            await asyncio.wait(list(self._refreshes.values()))

    @contextmanager
    def _token_call(self, provider: str, call: str) -> Iterator[None]:
        """Times one token-endpoint call (metrics) and, with tracing on, spans it."""
        started = time.perf_counter()
        try:
            with self._tracer.client_span(
                f"keyrelay.token_endpoint.{call}", {"keyrelay.provider": provider}
            ):
                yield
        finally:
            metrics.token_endpoint(provider, call, time.perf_counter() - started)

    def _refresh_outcome(self, provider: str, outcome: str) -> None:
        metrics.refresh(provider, outcome)
        self._tracer.annotate({"keyrelay.refresh.outcome": outcome})

    def _forget_refresh(self, account_id: str, task: asyncio.Task[Token]) -> None:
        if self._refreshes.get(account_id) is task:
            del self._refreshes[account_id]
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter already got it

    # The driver: carries out the machine's commands ----------------------------------

    async def _execute(self, run: _Run, command: Command) -> Outcome:
        account_id = run.attempt.account_id
        match command:
            case ReadAccount():
                return await self._read_state(run, account_id)
            case TryLock():
                with self._store_errors:
                    run.owner = await self._store.try_lock(account_id, self._t.lock_ttl)
                self._tracer.annotate({"keyrelay.lock": "acquired" if run.owner else "waited"})
                if run.owner is None:
                    metrics.LOCK_WAITS.inc()
                return LockTaken(run.owner is not None)
            case Sleep(seconds=seconds):
                await asyncio.sleep(seconds)
                return None
            case CheckHolder():
                with self._store_errors:
                    current = await self._store.get_account(account_id)
                    held = await self._store.lock_held(account_id)
                return HolderState(None if current is None else current.generation, held)
            case CallTokenEndpoint(deadline=deadline):
                return await self._call_token_endpoint(run, deadline)
            case WriteRefreshed():
                return await self._write_refreshed(run, command)
            case WriteDisconnect():
                return await self._write_disconnect(run, command)
            case RecordFailure():
                return await self._record_failure(run, command)
            case ReleaseLock():
                await run.stop_renewing()
                run.lock_settled = True
                assert run.owner is not None
                await self._release(account_id, run.owner)
                return None
            case LetLeaseExpire():
                await run.stop_renewing()
                run.lock_settled = True
                log.warning(
                    "refresh answer lost; the lock is left to expire",
                    extra={"account_id": account_id},
                )
                return None
        raise AssertionError(f"not a step command: {command!r}")

    def _finish(self, run: _Run, command: Command) -> Token:
        match command:
            case ServeStored(cooling=cooling):
                if cooling:
                    metrics.FORCED_REFRESHES_REFUSED.inc()
                assert run.record is not None
                assert run.tokens is not None
                record = run.record
                return Token(
                    run.tokens.access_token, record.token_type, record.expires_at, record.generation
                )
            case ServeFresh(generation=generation):
                assert run.fresh is not None
                fresh = run.fresh
                return Token(fresh.access_token, fresh.token_type, fresh.expires_at, generation)
            case Fail(error=error):
                raise error
        raise AssertionError(f"not a terminal command: {command!r}")

    async def _read_state(self, run: _Run, account_id: str) -> AccountState:
        with self._store_errors:
            record = await self._store.get_account(account_id)
            run.record = record
            run.tokens = None
            if record is None:
                return AccountState(account_id, found=False)
            if record.connected:
                run.tokens = self._store.decrypt_tokens(record)
        return AccountState(
            account_id,
            found=True,
            connected=record.connected,
            provider=record.provider,
            provider_configured=record.provider in self._providers,
            generation=record.generation,
            expires_at=record.expires_at,
            retry_at=record.retry_at,
            failures=record.failures,
            last_error=record.last_error,
            disconnect_reason=record.disconnect_reason,
            has_refresh_token=bool(run.tokens and run.tokens.refresh_token),
            forced_at=record.forced_at,
            answer_lost=record.answer_lost,
        )

    async def _call_token_endpoint(
        self, run: _Run, deadline: float
    ) -> TokenSet | TokenEndpointError:
        record, tokens = run.record, run.tokens
        assert record is not None
        assert tokens is not None
        assert tokens.refresh_token
        assert run.owner is not None
        provider = self._providers[record.provider]
        run.renewer = asyncio.create_task(self._renew_lease(record.account_id, run.owner))
        run.sent = True  # from here on an error must not release the lock
        try:
            with self._token_call(provider.name, "refresh"):
                run.fresh = await self._client.refresh(
                    provider,
                    refresh_token=tokens.refresh_token,
                    scopes=record.scopes,
                    now=self._clock(),
                    answer_within=max(0.0, deadline - self._clock()),
                )
        except TokenEndpointError as err:
            if err.kind is FailureKind.NOT_SENT:
                run.sent = False
            return err
        return run.fresh

    async def _write_refreshed(self, run: _Run, command: WriteRefreshed) -> Written:
        record, old, fresh = run.record, run.tokens, run.fresh
        assert record is not None
        assert old is not None
        assert fresh is not None
        # Keep the old refresh token when the provider does not rotate it.
        kept = StoredTokens(fresh.access_token, fresh.refresh_token or old.refresh_token)
        # The provider may have rotated the refresh token: these tokens exist nowhere
        # else, so a Redis outage is waited out (one operation, re-sent safely) for up
        # to one more deadline before they are given up.
        operation = self._store.new_operation()
        give_up_at = time.monotonic() + self._t.refresh_deadline
        while True:
            try:
                # Each failed try is counted and logged (rate-limited) as any store error.
                with self._store_errors:
                    # A written refresh releases our lock in the same step: dying between
                    # two steps would leave the others waiting out the lease.
                    generation = await self._store.store_refreshed(
                        record.account_id,
                        expected_generation=command.expected_generation,
                        tokens=kept,
                        token_type=fresh.token_type,
                        expires_at=fresh.expires_at,
                        scopes=fresh.scopes,
                        now=self._clock(),
                        lock_owner=run.owner,
                        forced=command.forced,
                        operation=operation,
                    )
                break
            except Unavailable:
                if time.monotonic() >= give_up_at:
                    log.error(
                        "refreshed tokens could not be stored; the lock is left to expire",
                        extra={"account_id": record.account_id},
                    )
                    raise
                await asyncio.sleep(STORE_RETRY_SECONDS)
        await run.stop_renewing()
        if generation == 0:
            self._refresh_outcome(record.provider, "fenced")
            log.warning(
                "refreshed tokens fenced out by a newer generation",
                extra={"account_id": record.account_id, "generation": record.generation},
            )
        else:
            run.lock_settled = True
            self._refresh_outcome(record.provider, "refreshed")
            metrics.event("REFRESHED")
            log.info(
                "token refreshed",
                extra={"account_id": record.account_id, "generation": generation},
            )
        return Written(generation)

    async def _write_disconnect(self, run: _Run, command: WriteDisconnect) -> Written:
        record = run.record
        assert record is not None
        self._refresh_outcome(record.provider, "invalid_grant")
        with self._store_errors:
            generation = await self._store.disconnect(
                record.account_id,
                reason=command.reason,
                expected_generation=command.expected_generation,
                now=self._clock(),
            )
        if generation:
            metrics.event("DISCONNECTED")
            log.warning(
                "account disconnected: grant rejected by the provider",
                extra={"account_id": record.account_id, "reason": command.reason},
            )
        return Written(generation)

    async def _record_failure(self, run: _Run, command: RecordFailure) -> Written:
        record = run.record
        assert record is not None
        self._refresh_outcome(record.provider, command.kind.value)
        log.log(
            failure_level(command.kind),
            "token refresh failed; account kept",
            extra={
                "account_id": record.account_id,
                "kind": command.kind.name,
                "reason": command.reason,
                "retry_in_seconds": round(command.retry_at - self._clock(), 3),
            },
        )
        with self._store_errors:
            failures = await self._store.record_refresh_failure(
                record.account_id,
                expected_generation=command.expected_generation,
                reason=command.reason,
                retry_at=command.retry_at,
                now=self._clock(),
                answer_lost=command.answer_lost,
                forced=command.forced,
            )
        if failures:
            metrics.event("REFRESH_FAILED")
        return Written(failures)

    async def _renew_lease(self, account_id: str, owner: str) -> None:
        interval = self._t.lock_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._store.extend_lock(account_id, owner, self._t.lock_ttl):
                    log.warning(
                        "refresh lock lost while refreshing; fencing protects the write",
                        extra={"account_id": account_id},
                    )
                    return
            except RedisError as exc:
                log.warning(
                    "could not renew the refresh lock",
                    extra={"account_id": account_id, "error": type(exc).__name__},
                )

    async def _release(self, account_id: str, owner: str) -> None:
        try:
            await self._store.release_lock(account_id, owner)
        except RedisError as exc:
            # It expires by itself; others wait at most one lease.
            log.warning(
                "could not release the refresh lock",
                extra={"account_id": account_id, "error": type(exc).__name__},
            )

    # -- gateway keys (DESIGN §6.1; rules: core.gateway_keys) ---------------------

    async def create_key(
        self, name: str, route: Route, limits: Limits, expires_at: int = 0
    ) -> CreatedKey:
        now = self._clock()
        name = validate_name(name)
        route = validate_route(route)  # limits: valid once they are a Limits
        expires_at = validate_expires_at(expires_at, now)
        secret = new_key()
        with self._store_errors:
            created = await self._keys.create_key(
                new_key_id(),
                name=name,
                key_sha256=key_hash(secret),
                route=route,
                limits=limits,
                expires_at=expires_at,
                now=now,
            )
        if isinstance(created, Refused):  # a random id or hash met again: no key was made
            raise FailedPrecondition(f"no key was created ({created.name}); try again")
        metrics.event("KEY_CHANGED")
        log.info("gateway key created", extra=_key_log(created))
        return CreatedKey(created, secret)

    async def update_key(
        self, key_id: str, changes: KeyChanges, expected_version: int = 0
    ) -> KeyRecord:
        validate_key_id(key_id)
        changes = validate_changes(changes, self._clock())
        with self._store_errors:
            result = await self._keys.update_key(
                key_id,
                changes,
                expected_version=_expected(expected_version),
                now=self._clock(),
            )
        return await self._key_changed(key_id, result, "updated", expected_version)

    async def revoke_key(self, key_id: str, expected_version: int = 0) -> KeyRecord:
        validate_key_id(key_id)
        with self._store_errors:
            result = await self._keys.revoke_key(
                key_id, expected_version=_expected(expected_version), now=self._clock()
            )
        return await self._key_changed(key_id, result, "revoked", expected_version)

    async def _key_changed(
        self, key_id: str, result: int | Refused, what: str, expected_version: int
    ) -> KeyRecord:
        match result:
            case Refused.NOT_FOUND:
                raise NotFound(f"gateway key {key_id} not found")
            case Refused.REVOKED:
                raise FailedPrecondition(
                    f"gateway key {key_id} is revoked and cannot change; create a new key"
                )
            case Refused.VERSION_MISMATCH:
                raise FailedPrecondition(
                    f"gateway key {key_id} is no longer at version {expected_version}: "
                    "read it again and retry"
                )
        metrics.event("KEY_CHANGED")
        record = await self.get_key(key_id)
        log.info(f"gateway key {what}", extra=_key_log(record))
        return record

    async def get_key(self, key_id: str) -> KeyRecord:
        validate_key_id(key_id)
        with self._store_errors:
            record = await self._keys.get_key(key_id)
        if record is None:
            raise NotFound(f"gateway key {key_id} not found")
        return record

    async def list_keys(self, *, include_revoked: bool = False) -> tuple[list[KeyRecord], str]:
        """The keys, oldest first, and the last event id read before them: a watcher
        resuming after it misses no change to them."""
        with self._store_errors:
            cursor = await self._store.last_event_id()
            records = await self._keys.list_keys()
        return [r for r in records if include_revoked or not r.revoked], cursor

    # -- usage (recorded by the gateways; rules: core.usage) -----------------------

    async def get_usage(
        self,
        *,
        key_id: str = "",
        key_sha256: str = "",
        account_id: str = "",
        days: int | None = None,
    ) -> UsageReport:
        """Usage per subject and UTC day over ``days`` days ending today: of the key
        (by runtime id or by hash) and/or the account named, or of every subject
        with usage then. Keys known to the auth service are named in the rows."""
        query = validate_query(key_id, key_sha256, account_id, days)
        labels = day_labels(utc_today(self._clock()), query.days)
        if query.key_id:
            key_sha256 = (await self.get_key(query.key_id)).key_sha256
        subjects = [("key", key_sha256)] if key_sha256 else []
        if query.account_id:
            subjects.append(("account", query.account_id))
        with self._store_errors:
            if query.filtered:
                cells = [(kind, sid, day) for day in labels for kind, sid in subjects]
            else:
                check_rows(await self._usage.count_subjects(labels), query.days)
                cells = await self._usage.subjects_on(labels)
            found = [
                (cell, usage)
                for cell, usage in zip(cells, await self._usage.read(cells), strict=True)
                if not usage.empty
            ]
            hashes = sorted({sid for (kind, sid, _), _ in found if kind == "key"})
            keys = await self._keys.keys_by_sha256(hashes)
        rows = []
        for (kind, sid, day), usage in found:
            key = keys.get(sid) if kind == "key" else None
            rows.append(
                UsageRow(day, kind, sid, usage, key.key_id if key else "", key.name if key else "")
            )
        return report(labels, rows)

    # -- events -------------------------------------------------------------

    @property
    def events(self) -> EventHub:
        """The replica's one reader of the event stream (the server starts and stops it)."""
        return self._events

    def watch_events(self, after_event_id: str = "", *, peer: str = "") -> Watch:
        """The events after ``after_event_id`` ("": from now on), from the replica's one
        reader (``keyrelay.auth.events``); ``starting_point`` names where it starts.
        No Redis call unless the cursor is older than the reader's memory."""
        if after_event_id and not (
            EVENT_ID.match(after_event_id)
            and all(int(part) <= MAX_EVENT_ID_PART for part in after_event_id.split("-"))
        ):
            raise InvalidArgument("after_event_id must be a stream id like 1700000000000-0")
        return self._events.subscribe(after_event_id, peer=peer)

    async def ready(self) -> bool:
        """Redis answers a PING within READY_DEADLINE_SECONDS (web ``/readyz``).

        Concurrent callers share one check, so probes, however many, cost one
        PING at a time; a caller that goes away leaves the check to the others.
        """
        check = self._ready_check
        if check is None or check.done():
            check = self._ready_check = asyncio.create_task(self._check_ready())
        return await asyncio.shield(check)

    async def _check_ready(self) -> bool:
        try:
            # The deadline cuts redis-py's reconnect retries short: an answer that
            # waited them out (seconds) would come after the prober gave up.
            async with asyncio.timeout(READY_DEADLINE_SECONDS):
                await self._store.client.ping()
        except RedisError as exc:
            self._store_errors.failed("ping", type(exc).__name__, str(exc))
            metrics.readiness("not_ready")
            return False
        except TimeoutError:
            self._store_errors.failed(
                "ping", "deadline", f"no answer within {READY_DEADLINE_SECONDS} s"
            )
            metrics.readiness("timeout")
            return False
        self._store_errors.answered()
        metrics.readiness("ready")
        return True
