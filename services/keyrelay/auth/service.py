"""The auth service's behaviour (DESIGN.md §1), free of gRPC.

The gRPC servicer only converts messages and calls into ``AuthService``; the
decisions come from ``core`` (pure), the state from ``RedisStore`` and the
token calls from ``ProviderClient``.

How ``get_token`` keeps to one refresh per expiry across replicas (§1.2):

1. Fast path: one ``HGETALL``; a fresh token is decrypted and returned.
2. In a replica, concurrent callers for one account share one refresh task
   (so one replica waits on Redis once, not once per caller).
3. Across replicas, the task takes ``lock:<account>`` with ``SET NX PX``. The
   holder re-reads, calls the token endpoint while a background task renews
   its lease, and writes through the fenced Lua script: a holder that stalled
   past its lease cannot overwrite a newer generation.
4. A replica without the lock never calls the token endpoint while the lock
   exists: it polls (jittered) until the generation moves or the lock goes.
5. A failed refresh sets ``retry_at`` (exponential backoff with jitter) so the
   next callers serve the still-valid token or fail fast instead of hammering
   a struggling provider. Only ``invalid_grant`` disconnects, and only through
   the fenced script.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from keyrelay.auth import metrics
from keyrelay.auth.core import pkce
from keyrelay.auth.core.authorize import build_authorize_url
from keyrelay.auth.core.codes import parse_pasted_code, resolve_state
from keyrelay.auth.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from keyrelay.auth.core.refresh import (
    Decision,
    backoff_delay,
    decide,
    still_usable,
    wait_delay,
)
from keyrelay.auth.core.tokens import FailureKind, TokenEndpointError, TokenSet
from keyrelay.auth.provider_client import ProviderClient
from keyrelay.auth.store.crypto import DecryptError
from keyrelay.auth.store.redis_store import (
    AccountRecord,
    FlowRecord,
    RedisStore,
    StoredEvent,
    StoredTokens,
)
from keyrelay.config import ProviderConfig
from keyrelay.tracing import NOOP_TRACER, Tracer

log = logging.getLogger("keyrelay.auth")

ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
FLOW_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# Larger minimums would make every call refresh when the provider issues
# shorter-lived tokens; an hour is the common access-token lifetime.
MAX_MIN_TTL_SECONDS = 3600
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    generation: int


@dataclass(frozen=True, slots=True)
class StartedFlow:
    flow_id: str
    authorize_url: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Timings:
    flow_ttl: float = 600.0
    skew: float = 30.0
    lock_ttl: float = 10.0
    refresh_deadline: float = 30.0
    wait_for_refresh: float = 35.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    wait_poll_base: float = 0.02
    wait_poll_cap: float = 0.25


def validate_account_id(account_id: str) -> str:
    if not ACCOUNT_ID.match(account_id):
        raise InvalidArgument(
            "account_id must be 1-128 characters of letters, digits and ._@+- "
            "starting with a letter or digit"
        )
    return account_id


def disconnected_message(record: AccountRecord) -> str:
    reason = record.disconnect_reason or "unknown reason"
    return (
        f"account {record.account_id!r} is disconnected ({reason}); reconnect it with: "
        f"keyrelay connect {record.account_id} --provider {record.provider}"
    )


def failure_level(err: TokenEndpointError) -> int:
    """``invalid_client`` and other misconfiguration need an operator: error; the rest warn."""
    return logging.ERROR if err.kind is FailureKind.MISCONFIGURED else logging.WARNING


@contextmanager
def store_errors() -> Iterator[None]:
    """The one place where Redis and decryption failures become domain errors."""
    try:
        yield
    except RedisError as exc:
        raise Unavailable(f"token store (Redis) unavailable: {type(exc).__name__}") from exc
    except DecryptError as exc:
        log.error("stored tokens cannot be decrypted", extra={"error": str(exc)})
        raise Unavailable(
            "stored tokens cannot be decrypted with the configured encryption keys"
        ) from exc


class AuthService:
    def __init__(
        self,
        store: RedisStore,
        providers: Mapping[str, ProviderConfig],
        provider_client: ProviderClient,
        timings: Timings = Timings(),
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        self._store = store
        self._providers = providers
        self._client = provider_client
        self._t = timings
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._refreshes: dict[str, asyncio.Task[Token]] = {}
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
        with store_errors():
            await self._store.put_flow(flow, self._t.flow_ttl)
        log.info("flow started", extra={"account_id": account_id, "provider": provider.name})
        return StartedFlow(flow.flow_id, url, flow.expires_at)

    async def _get_flow(self, flow_id: str) -> FlowRecord:
        flow = None
        if FLOW_ID.match(flow_id):
            with store_errors():
                flow = await self._store.get_flow(flow_id)
        if flow is None:
            raise NotFound("flow not found: it expired, was cancelled or was already used")
        return flow

    async def submit_code(self, flow_id: str, pasted: str, state: str = "") -> AccountRecord:
        flow = await self._get_flow(flow_id)
        code = parse_pasted_code(pasted)
        resolve_state(code, state or None, flow.state)
        with store_errors():
            claimed = await self._store.claim_flow(flow_id)
        if claimed is None:
            raise NotFound("flow not found: it expired, was cancelled or was already used")
        provider = self._provider(claimed.provider)
        try:
            with self._token_call(provider.name, "exchange"):
                tokens = await asyncio.wait_for(
                    self._client.exchange_code(
                        provider,
                        code=code.code,
                        verifier=claimed.verifier,
                        redirect_uri=claimed.redirect_uri,
                        now=self._clock(),
                    ),
                    self._t.refresh_deadline,
                )
        except TimeoutError:
            raise Unavailable(
                "the token endpoint did not answer in time; the code may be used up, "
                "so start a new flow"
            ) from None
        except TokenEndpointError as err:
            log.log(
                failure_level(err),
                "code exchange failed",
                extra={"account_id": claimed.account_id, "kind": err.kind.name, "error": err.error},
            )
            if err.kind is FailureKind.TRANSIENT:
                raise Unavailable(f"{err}; the code may be used up, so start a new flow") from None
            raise FailedPrecondition(
                f"the provider refused the code: {err.error or 'error'}"
                f"{': ' + err.description if err.description else ''}; start a new flow"
            ) from None
        now = self._clock()
        with store_errors():
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
            with store_errors():
                deleted = await self._store.delete_flow(flow_id)
        if not deleted:
            raise NotFound("flow not found: it expired, was cancelled or was already used")

    # -- accounts -----------------------------------------------------------

    async def get_account(self, account_id: str) -> AccountRecord:
        validate_account_id(account_id)
        with store_errors():
            record = await self._store.get_account(account_id)
        if record is None:
            raise NotFound(f"account {account_id!r} was never connected")
        return record

    async def list_accounts(self) -> list[AccountRecord]:
        with store_errors():
            ids = await self._store.list_account_ids()
            records = [await self._store.get_account(i) for i in ids]
        return [r for r in records if r is not None]

    async def disconnect(self, account_id: str) -> AccountRecord:
        record = await self.get_account(account_id)
        if record.connected:
            await self._revoke_quietly(record)
            with store_errors():
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
            with store_errors():
                tokens = self._store.decrypt_tokens(record)
            if tokens.refresh_token:
                token, hint = tokens.refresh_token, "refresh_token"
            else:
                token, hint = tokens.access_token, "access_token"
            with self._token_call(provider.name, "revoke"):
                await asyncio.wait_for(
                    self._client.revoke(provider, token=token, token_type_hint=hint),
                    self._t.refresh_deadline,
                )
        except (TokenEndpointError, TimeoutError, Unavailable) as exc:
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
        record = await self._read(account_id)
        if self._decide(record, min_ttl, stale_generation) is Decision.SERVE:
            return self._token(record)
        task = self._refreshes.get(account_id)
        if task is None:
            task = asyncio.create_task(self._refresh_task(account_id, min_ttl, stale_generation))
            self._refreshes[account_id] = task
            task.add_done_callback(lambda t: self._forget_refresh(account_id, t))
        # Shielded: a caller that goes away must not cancel the refresh others wait on.
        return await asyncio.shield(task)

    async def _refresh_task(self, account_id: str, min_ttl: float, stale: int) -> Token:
        # The task copies the first caller's context: its span is this one's parent.
        with self._tracer.span("keyrelay.refresh", {"keyrelay.account": account_id}):
            return await self._refresh_or_wait(account_id, min_ttl, stale)

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

    async def _read(self, account_id: str) -> AccountRecord:
        with store_errors():
            record = await self._store.get_account(account_id)
        if record is None:
            raise NotFound(f"account {account_id!r} was never connected")
        if not record.connected:
            raise FailedPrecondition(disconnected_message(record))
        return record

    def _decide(self, record: AccountRecord, min_ttl: float, stale_generation: int) -> Decision:
        return decide(
            generation=record.generation,
            expires_at=record.expires_at,
            now=self._clock(),
            min_ttl=min_ttl,
            skew=self._t.skew,
            stale_generation=stale_generation or None,
        )

    def _token(self, record: AccountRecord) -> Token:
        with store_errors():
            tokens = self._store.decrypt_tokens(record)
        return Token(tokens.access_token, record.token_type, record.expires_at, record.generation)

    def _serve_or_fail(self, record: AccountRecord, why: str) -> Token:
        """After a failed or skipped refresh: the current token while it still works."""
        if still_usable(record.expires_at, self._clock()):
            return self._token(record)
        raise Unavailable(f"no valid token for account {record.account_id!r}: {why}")

    async def _refresh_or_wait(self, account_id: str, min_ttl: float, stale: int) -> Token:
        give_up_at = time.monotonic() + self._t.wait_for_refresh
        while True:
            record = await self._read(account_id)
            if self._decide(record, min_ttl, stale) is Decision.SERVE:
                return self._token(record)
            if record.retry_at > self._clock():
                return self._serve_or_fail(record, f"token endpoint failing ({record.last_error})")
            with store_errors():
                owner = await self._store.try_lock(account_id, self._t.lock_ttl)
            if owner is not None:
                self._tracer.annotate({"keyrelay.lock": "acquired"})
                return await self._refresh_holding_lock(account_id, owner, min_ttl, stale)
            metrics.LOCK_WAITS.inc()
            self._tracer.annotate({"keyrelay.lock": "waited"})
            with self._tracer.span("keyrelay.refresh.wait_for_holder"):
                token = await self._wait_for_holder(record, give_up_at)
            if token is not None:
                return token

    async def _wait_for_holder(self, seen: AccountRecord, give_up_at: float) -> Token | None:
        """Polls until another replica's refresh moved the generation or its lock went away.

        Returns None when it is time to look again, or a token when waiting any
        longer is pointless and the current token still works.
        """
        started = time.monotonic()
        while True:
            if time.monotonic() >= give_up_at:
                return self._serve_or_fail(seen, "a refresh on another replica is taking too long")
            await asyncio.sleep(
                wait_delay(
                    time.monotonic() - started,
                    base=self._t.wait_poll_base,
                    cap=self._t.wait_poll_cap,
                    rng=self._rng,
                )
            )
            with store_errors():
                current = await self._store.get_account(seen.account_id)
                lock_held = await self._store.lock_held(seen.account_id)
            if current is None or current.generation != seen.generation or not lock_held:
                return None

    async def _refresh_holding_lock(
        self, account_id: str, owner: str, min_ttl: float, stale: int
    ) -> Token:
        lease_must_expire = False
        lock_released = False  # by the fenced write itself
        renewer: asyncio.Task[None] | None = None
        try:
            record = await self._read(account_id)  # another holder may have just refreshed
            if self._decide(record, min_ttl, stale) is Decision.SERVE:
                return self._token(record)
            if record.retry_at > self._clock():
                return self._serve_or_fail(record, f"token endpoint failing ({record.last_error})")
            with store_errors():
                tokens = self._store.decrypt_tokens(record)
            if not tokens.refresh_token:
                return self._serve_or_fail(
                    record, "the provider issued no refresh token; reconnect the account"
                )
            provider = self._providers.get(record.provider)
            if provider is None:
                log.error(
                    "provider of a connected account is not configured",
                    extra={"account_id": account_id, "provider": record.provider},
                )
                return self._serve_or_fail(
                    record, f"provider {record.provider!r} is not configured"
                )
            renewer = asyncio.create_task(self._renew_lease(account_id, owner))
            try:
                with self._token_call(provider.name, "refresh"):
                    fresh = await asyncio.wait_for(
                        self._client.refresh(
                            provider,
                            refresh_token=tokens.refresh_token,
                            scopes=record.scopes,
                            now=self._clock(),
                        ),
                        self._t.refresh_deadline,
                    )
            except TimeoutError:
                # The provider may still process the request: keep others off the
                # (possibly rotated) refresh token until the lease runs out.
                lease_must_expire = True
                return await self._refresh_failed(
                    record, TokenEndpointError.transport("token endpoint timed out")
                )
            except TokenEndpointError as err:
                if err.kind is FailureKind.INVALID_GRANT:
                    return await self._grant_rejected(record, err)
                return await self._refresh_failed(record, err)
            token, lock_released = await self._store_fresh(record, tokens, fresh, owner)
            return token
        finally:
            if renewer is not None:
                renewer.cancel()
            if not lease_must_expire and not lock_released:
                await self._release(account_id, owner)

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

    async def _store_fresh(
        self, record: AccountRecord, old: StoredTokens, fresh: TokenSet, owner: str
    ) -> tuple[Token, bool]:
        """The token to serve, and whether the write released our lock."""
        # Keep the old refresh token when the provider does not rotate it.
        kept = StoredTokens(fresh.access_token, fresh.refresh_token or old.refresh_token)
        with store_errors():
            # A written refresh releases our lock in the same step: dying between
            # two steps would leave the others waiting out the lease.
            generation = await self._store.store_refreshed(
                record.account_id,
                expected_generation=record.generation,
                tokens=kept,
                token_type=fresh.token_type,
                expires_at=fresh.expires_at,
                scopes=fresh.scopes,
                now=self._clock(),
                lock_owner=owner,
            )
        if generation == 0:
            self._refresh_outcome(record.provider, "fenced")
            log.warning(
                "refreshed tokens fenced out by a newer generation",
                extra={"account_id": record.account_id, "generation": record.generation},
            )
            current = await self._read(record.account_id)
            return self._serve_or_fail(current, "fenced out by a newer refresh"), False
        self._refresh_outcome(record.provider, "refreshed")
        metrics.event("REFRESHED")
        log.info(
            "token refreshed", extra={"account_id": record.account_id, "generation": generation}
        )
        return Token(fresh.access_token, fresh.token_type, fresh.expires_at, generation), True

    async def _grant_rejected(self, record: AccountRecord, err: TokenEndpointError) -> Token:
        reason = "invalid_grant: the provider no longer accepts this grant"
        self._refresh_outcome(record.provider, "invalid_grant")
        with store_errors():
            generation = await self._store.disconnect(
                record.account_id,
                reason=reason,
                expected_generation=record.generation,
                now=self._clock(),
            )
        if generation == 0:
            # Someone else moved the account on (refreshed or disconnected it).
            current = await self._read(record.account_id)
            return self._serve_or_fail(current, "grant rejected")
        metrics.event("DISCONNECTED")
        log.warning(
            "account disconnected: grant rejected by the provider",
            extra={"account_id": record.account_id, "error": err.error},
        )
        current = await self.get_account(record.account_id)
        raise FailedPrecondition(disconnected_message(current))

    async def _refresh_failed(self, record: AccountRecord, err: TokenEndpointError) -> Token:
        self._refresh_outcome(record.provider, err.kind.value)
        log.log(
            failure_level(err),
            "token refresh failed; account kept",
            extra={
                "account_id": record.account_id,
                "kind": err.kind.name,
                "error": err.error,
                "status": err.status,
            },
        )
        now = self._clock()
        delay = backoff_delay(
            min(record.failures, 16),
            base=self._t.backoff_base,
            cap=self._t.backoff_cap,
            rng=self._rng,
        )
        with store_errors():
            if await self._store.record_refresh_failure(
                record.account_id,
                expected_generation=record.generation,
                reason=str(err),
                retry_at=now + delay,
                now=now,
            ):
                metrics.event("REFRESH_FAILED")
        return self._serve_or_fail(record, str(err))

    # -- events -------------------------------------------------------------

    async def events_cursor(self, after_event_id: str = "") -> str:
        """Where a watch starts: right after ``after_event_id``, or at the current end."""
        if after_event_id and not EVENT_ID.match(after_event_id):
            raise InvalidArgument("after_event_id must be a stream id like 1700000000000-0")
        if after_event_id:
            return after_event_id
        with store_errors():
            return await self._store.last_event_id()

    async def watch_events(self, after_event_id: str = "") -> AsyncIterator[StoredEvent]:
        cursor = await self.events_cursor(after_event_id)
        while True:
            with store_errors():
                events = await self._store.read_events(cursor)
            for event in events:
                cursor = event.event_id
                yield event

    async def ready(self) -> bool:
        return await self._store.ping()
