"""The refresh of an access token (DESIGN §1.2, §1.2.1), free of I/O.

:class:`RefreshAttempt` is the whole attempt as a state machine (read, lock,
wait, token call, fenced write, release or let the lease expire, serve or
fail); the service only carries out its commands. The decisions it takes are
also plain functions, tested exhaustively with an explicit ``now``:

* :func:`decide` — serve the stored token or refresh it. A token is served
  only while it stays valid for ``max(min_ttl, skew)`` more seconds: ``min_ttl``
  is what the caller needs (a long upload), ``skew`` absorbs clock differences
  between us, the caller and the provider. ``stale_generation`` is a caller's
  report that the token *of that generation* was rejected upstream; it forces a
  refresh only if that token is still the current one, so a burst of reports
  about one bad token yields one refresh, not one per report, and at most one
  per ``forced_refresh_cooldown`` (an upstream that rejects every token must
  not turn every request into a provider call).
* :func:`still_usable` — while a refresh fails transiently the old token is
  served for as long as it has not actually expired.
* :func:`backoff_delay` — retrying the token endpoint after a transient
  failure, with "full jitter" (delay drawn from ``[0, min(cap, base·2^n)]``) so
  that replicas that failed together do not retry together.
* :func:`wait_delay` — polling interval of a replica that did not get the lock
  and waits for the holder's new generation (§1.2.5).

No I/O, no clock; randomness comes from the ``rng`` passed in.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from keyrelay.auth.core.errors import AuthError, FailedPrecondition, NotFound, Unavailable
from keyrelay.auth.core.tokens import FailureKind, TokenEndpointError, TokenSet

__all__ = [
    "ANSWER_LOST_REASON",
    "WAIT_PAST_DEADLINE_SECONDS",
    "AccountState",
    "CallTokenEndpoint",
    "CheckHolder",
    "Command",
    "Decision",
    "Fail",
    "HolderState",
    "LetLeaseExpire",
    "LockTaken",
    "ReadAccount",
    "RecordFailure",
    "RefreshAttempt",
    "ReleaseLock",
    "ServeFresh",
    "ServeStored",
    "Sleep",
    "Timings",
    "TryLock",
    "WriteDisconnect",
    "WriteRefreshed",
    "Written",
    "backoff_delay",
    "cooling_down",
    "decide",
    "disconnected_message",
    "remaining_ttl_ok",
    "satisfies",
    "still_usable",
    "wait_delay",
]

# The waiting replica polls every quarter of the time it has waited so far:
# it learns of the new generation at most ~25 % later than it could have, while
# the number of polls grows only logarithmically with a slow holder.
_WAIT_GROWTH = 0.25
# 2.0 ** 1024 overflows; any exponent near that is far past every cap anyway.
_MAX_EXPONENT = 1000


class Decision(enum.Enum):
    SERVE = "serve"
    """The stored token is good enough: return it."""
    REFRESH = "refresh"
    """Refresh first (under the lock, re-reading after acquiring it)."""
    FORCED_REFRESH = "forced_refresh"
    """Refresh although the token has time left: the caller reported it rejected."""
    SERVE_COOLING = "serve_cooling"
    """A report of a rejected token refused by the cool-down: serve the current one."""

    @property
    def serves(self) -> bool:
        return self is Decision.SERVE or self is Decision.SERVE_COOLING


def remaining_ttl_ok(expires_at: float, now: float, min_ttl: float, skew: float) -> bool:
    """True when the token stays valid for at least ``max(min_ttl, skew)`` seconds."""
    return expires_at - now >= max(min_ttl, skew)


def decide(
    *,
    generation: int,
    expires_at: float,
    now: float,
    min_ttl: float,
    skew: float,
    stale_generation: int | None,
    forced_at: float = 0.0,
    forced_cooldown: float = 0.0,
) -> Decision:
    """Serve the current token of ``generation`` or refresh it.

    ``stale_generation`` None or 0 means no report. A report about the current
    generation (or, defensively, a later one) forces a refresh, unless a forced
    refresh of this account was made less than ``forced_cooldown`` seconds ago
    (``forced_at``, 0 for never: the first always goes through): then the
    report is refused (:attr:`Decision.SERVE_COOLING` when the token is
    otherwise fresh enough). A report about an older generation is already
    answered by the current token, which is then judged on freshness alone.
    """
    fresh_enough = remaining_ttl_ok(expires_at, now, min_ttl, skew)
    if stale_generation and stale_generation >= generation:
        if not cooling_down(forced_at, now, forced_cooldown):
            return Decision.FORCED_REFRESH
        return Decision.SERVE_COOLING if fresh_enough else Decision.REFRESH
    return Decision.SERVE if fresh_enough else Decision.REFRESH


def cooling_down(forced_at: float, now: float, cooldown: float) -> bool:
    """True while a forced refresh made at ``forced_at`` (0: never) keeps others off."""
    return forced_at > 0 and 0 <= now - forced_at < cooldown


def still_usable(expires_at: float, now: float) -> bool:
    """True while the token has not expired: it may be served while a refresh keeps failing."""
    return expires_at > now


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    _check_base_cap(base, cap)
    ceiling = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


def wait_delay(elapsed: float, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to sleep before re-reading the account while another replica refreshes.

    The nominal interval is ``base + elapsed / 4`` (``elapsed``: seconds waited
    so far), jittered by ±50 % so waiters spread out, and never more than
    ``cap``. For a fixed random draw it does not decrease as ``elapsed`` grows.
    """
    _check_base_cap(base, cap)
    # A negative elapsed can only come from a clock step; treat it as no wait yet.
    nominal = base + max(0.0, elapsed) * _WAIT_GROWTH
    return min(cap, nominal * rng.uniform(0.5, 1.5))


def _check_base_cap(base: float, cap: float) -> None:
    if not base >= 0 or not cap >= 0:  # "not >=" also refuses NaN
        raise ValueError(f"base and cap must be 0 or more seconds, not base={base}, cap={cap}")


# -- the refresh attempt as a state machine -----------------------------------------------
#
# One GetToken that may have to refresh, from the first read of the account to the
# token it serves or the error it raises. The machine does no I/O: it returns a
# command, the service's driver carries it out and hands back its outcome with the
# time, and the machine returns the next command, until a terminal one (ServeStored,
# ServeFresh, Fail). Every decision about a refresh is below, top to bottom:
#
#   read ─ not found / disconnected ──────────────────────────────► Fail
#     ├─ fresh enough (or a forced refresh refused by the cool-down) ► ServeStored
#     ├─ backing off after a failure (retry_at) ──────────────────── ► serve or fail
#     └─ TryLock ─ busy ─ Sleep, CheckHolder … (generation moved or lock gone) ─► read
#          │               └─ waited wait_for_refresh ───────────── ► serve or fail
#          └─ taken ─ re-read ─ now fresh / backing off ─ ReleaseLock ► serve (or fail)
#                       ├─ no refresh token, unknown provider, stopping ─ ReleaseLock ► serve/fail
#                       └─ CallTokenEndpoint(deadline)
#                            ├─ tokens ──── WriteRefreshed ─ written ──────────► ServeFresh
#                            │                └─ fenced ─ ReleaseLock, read ─► serve or fail
#                            ├─ invalid_grant ─ WriteDisconnect ─ ReleaseLock ─► Fail
#                            │                    └─ fenced ─ ReleaseLock, read ► serve or fail
#                            ├─ answered, other error ─ RecordFailure, ReleaseLock ► serve or fail
#                            ├─ not sent ─ RecordFailure, ReleaseLock ──────────► serve or fail
#                            └─ answer lost ─ LetLeaseExpire, RecordFailure ────► serve or fail
#
# "serve or fail": the current token while it has not expired, else UNAVAILABLE.
# The lock is released only when no request is in flight, or when the provider's
# answer settled what happened to the refresh token; a lost answer leaves the lease
# to expire (DESIGN §1.2.1).

ANSWER_LOST_REASON = (
    "a refresh answer was lost: the request reached the token endpoint but no answer came "
    "back, so the provider may have rotated the refresh token in it"
)
_GRANT_REJECTED = "invalid_grant: the provider no longer accepts this grant"
_GRANT_REJECTED_AFTER_LOSS = (
    "invalid_grant after a lost refresh answer: the provider most likely rotated the refresh "
    "token in an answer that never arrived (a network cut or a provider slower than "
    "refresh_deadline_seconds)"
)
# Consecutive failures past this no longer lengthen the backoff (2^16 · base ≫ any cap).
_MAX_BACKOFF_ATTEMPT = 16


# A waiting replica gives the holder its whole deadline and this much more.
WAIT_PAST_DEADLINE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Timings:
    """The refresh's timing settings, in seconds. These defaults are the config's
    (``[auth]`` keys of the same names with ``_seconds``): written here only."""

    flow_ttl: float = 600.0
    skew: float = 30.0
    lock_ttl: float = 10.0
    token_timeout: float = 10.0
    refresh_deadline: float = 30.0
    wait_for_refresh: float = 30.0 + WAIT_PAST_DEADLINE_SECONDS
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    forced_refresh_cooldown: float = 30.0
    wait_poll_base: float = 0.02
    wait_poll_cap: float = 0.25


@dataclass(frozen=True, slots=True)
class AccountState:
    """What the machine knows of the stored account: no token, only facts about them."""

    account_id: str
    found: bool
    connected: bool = False
    provider: str = ""
    provider_configured: bool = True
    generation: int = 0
    expires_at: float = 0.0
    retry_at: float = 0.0
    failures: int = 0
    last_error: str = ""
    disconnect_reason: str = ""
    has_refresh_token: bool = True
    forced_at: float = 0.0
    """When the last forced (``stale_generation``) refresh was attempted; 0: never."""
    answer_lost: bool = False
    """The last attempt sent a refresh whose answer never arrived."""


# Commands ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadAccount:
    """Read the account (→ AccountState)."""


@dataclass(frozen=True, slots=True)
class TryLock:
    """``SET NX PX lock_ttl`` on the account's refresh lock (→ LockTaken)."""


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class CheckHolder:
    """Read the generation and whether the lock is still held (→ HolderState)."""


@dataclass(frozen=True, slots=True)
class CallTokenEndpoint:
    """Present the refresh token; wait for the answer until ``deadline`` (→ TokenSet or
    TokenEndpointError). The lease is renewed while it runs."""

    deadline: float


@dataclass(frozen=True, slots=True)
class WriteRefreshed:
    """The fenced write of the answer's tokens, releasing the lock (→ Written: 0 fenced)."""

    expected_generation: int
    forced: bool


@dataclass(frozen=True, slots=True)
class WriteDisconnect:
    """The fenced disconnect with one DISCONNECTED event (→ Written: 0 fenced)."""

    expected_generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """The fenced REFRESH_FAILED: no new attempt before ``retry_at`` (→ Written)."""

    expected_generation: int
    kind: FailureKind
    reason: str
    retry_at: float
    answer_lost: bool
    forced: bool


@dataclass(frozen=True, slots=True)
class ReleaseLock:
    """Compare-and-delete the lock (→ None)."""


@dataclass(frozen=True, slots=True)
class LetLeaseExpire:
    """Stop renewing the lease and leave the lock to expire by itself (→ None)."""


@dataclass(frozen=True, slots=True)
class ServeStored:
    """Terminal: serve the token of the last AccountState read."""

    cooling: bool = False
    """A report of a rejected token was refused by the forced-refresh cool-down."""


@dataclass(frozen=True, slots=True)
class ServeFresh:
    """Terminal: serve the tokens of the answer, written as ``generation``."""

    generation: int


@dataclass(frozen=True, slots=True)
class Fail:
    """Terminal: raise ``error``."""

    error: AuthError


Command = (
    ReadAccount
    | TryLock
    | Sleep
    | CheckHolder
    | CallTokenEndpoint
    | WriteRefreshed
    | WriteDisconnect
    | RecordFailure
    | ReleaseLock
    | LetLeaseExpire
    | ServeStored
    | ServeFresh
    | Fail
)
TERMINAL = (ServeStored, ServeFresh, Fail)


# Outcomes (besides AccountState, TokenSet, TokenEndpointError and None) ------------------


@dataclass(frozen=True, slots=True)
class LockTaken:
    acquired: bool


@dataclass(frozen=True, slots=True)
class HolderState:
    generation: int | None
    """None: the account is gone."""
    lock_held: bool


@dataclass(frozen=True, slots=True)
class Written:
    """What a fenced script returned: the new generation (or failure count), 0 if fenced."""

    value: int


Outcome = AccountState | LockTaken | HolderState | TokenSet | TokenEndpointError | Written | None


# The commands without fields are values: one instance each serves every attempt.
_READ = ReadAccount()
_SERVE = ServeStored()
_SERVE_COOLING = ServeStored(cooling=True)
_NOTHING_READ = AccountState("", found=False)


class _Phase(enum.Enum):
    LOOK = "look"  # reading before holding the lock
    LOCKING = "locking"
    WAITING = "waiting"  # another replica holds the lock
    HOLDING = "holding"  # re-reading with the lock held
    CALLING = "calling"
    WRITING = "writing"  # the answer's tokens
    DISCONNECTING = "disconnecting"
    SETTLING = "settling"  # a last read after being fenced out: serve or fail, no new attempt
    QUEUED = "queued"  # commands decided earlier are handed out
    DONE = "done"


class RefreshAttempt:
    """One caller's way to a token (see the map above). Sans I/O: no clock, no Redis, no
    network; ``now`` (wall-clock seconds) comes with every step.

    ``min_ttl`` and ``stale_generation`` (0: none) are what the caller asked for.
    ``stopping``, given with a step, says the replica is shutting down: no new token
    call starts, and nobody waits for another replica any longer.
    """

    # Slots: GetToken's fast path builds one per call.
    __slots__ = (
        "_deadline",
        "_forced",
        "_give_up_at",
        "_min_ttl",
        "_phase",
        "_queue",
        "_rng",
        "_settle_why",
        "_stale",
        "_state",
        "_t",
        "_wait_started",
        "account_id",
    )

    def __init__(
        self,
        account_id: str,
        *,
        min_ttl: float,
        stale_generation: int,
        timings: Timings,
        rng: random.Random,
    ) -> None:
        self.account_id = account_id
        self._min_ttl = min_ttl
        self._stale = stale_generation
        self._t = timings
        self._rng = rng
        self._phase = _Phase.LOOK
        self._queue: list[Command] = []
        self._state = _NOTHING_READ
        self._forced = False
        self._give_up_at = 0.0
        self._wait_started = 0.0
        self._deadline = 0.0
        self._settle_why = ""

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    def start(self, now: float) -> Command:
        self._give_up_at = now + self._t.wait_for_refresh
        return _READ

    def step(self, outcome: Outcome, now: float, *, stopping: bool = False) -> Command:
        """The next command, given the outcome of the last one."""
        phase = self._phase
        if phase is _Phase.DONE:
            raise RuntimeError("the refresh attempt is over")
        if phase is _Phase.QUEUED:
            return self._next_queued()
        if phase in (_Phase.LOOK, _Phase.HOLDING, _Phase.SETTLING):
            assert isinstance(outcome, AccountState), outcome
            return self._on_read(outcome, now, stopping)
        if phase is _Phase.LOCKING:
            assert isinstance(outcome, LockTaken), outcome
            return self._on_lock(outcome, now, stopping)
        if phase is _Phase.WAITING:
            return self._on_wait(outcome, now, stopping)
        if phase is _Phase.CALLING:
            assert isinstance(outcome, TokenSet | TokenEndpointError), outcome
            return self._on_answer(outcome, now)
        assert isinstance(outcome, Written), outcome
        if phase is _Phase.WRITING:
            if outcome.value:  # the write released the lock in the same step
                return self._finish(ServeFresh(outcome.value))
            return self._settle("fenced out by a newer refresh")
        # DISCONNECTING
        if outcome.value:
            return self._then(ReleaseLock(), Fail(FailedPrecondition(self._disconnected())))
        return self._settle("the grant was rejected, but the account has moved on meanwhile")

    # -- reads ------------------------------------------------------------------------------

    def _on_read(self, state: AccountState, now: float, stopping: bool) -> Command:
        holding = self._phase is _Phase.HOLDING
        self._state = state
        if not state.found:
            return self._end(
                holding, Fail(NotFound(f"account {self.account_id!r} was never connected"))
            )
        if not state.connected:
            reason = state.disconnect_reason or "unknown reason"
            return self._end(
                holding,
                Fail(
                    FailedPrecondition(
                        disconnected_message(state.account_id, reason, state.provider)
                    )
                ),
            )
        if self._phase is _Phase.SETTLING:
            return self._finish(self._serve_or_fail(now, self._settle_why))
        decision = decide(
            generation=state.generation,
            expires_at=state.expires_at,
            now=now,
            min_ttl=self._min_ttl,
            skew=self._t.skew,
            stale_generation=self._stale or None,
            forced_at=state.forced_at,
            forced_cooldown=self._t.forced_refresh_cooldown,
        )
        if decision.serves:
            return self._end(
                holding, _SERVE_COOLING if decision is Decision.SERVE_COOLING else _SERVE
            )
        if state.retry_at > now:
            why = f"token endpoint failing ({state.last_error or 'backing off'})"
            return self._end(holding, self._serve_or_fail(now, why))
        if not holding:
            if stopping:
                return self._end(False, self._serve_or_fail(now, "the auth replica is stopping"))
            self._phase = _Phase.LOCKING
            return TryLock()
        if not state.has_refresh_token:
            why = "the provider issued no refresh token; reconnect the account"
            return self._end(True, self._serve_or_fail(now, why))
        if not state.provider_configured:
            return self._end(
                True, self._serve_or_fail(now, f"provider {state.provider!r} is not configured")
            )
        if stopping:
            return self._end(True, self._serve_or_fail(now, "the auth replica is stopping"))
        self._forced = decision is Decision.FORCED_REFRESH
        self._deadline = now + self._t.refresh_deadline
        self._phase = _Phase.CALLING
        return CallTokenEndpoint(self._deadline)

    # -- the lock ---------------------------------------------------------------------------

    def _on_lock(self, taken: LockTaken, now: float, stopping: bool) -> Command:
        if taken.acquired:
            self._phase = _Phase.HOLDING  # re-read: another holder may have just refreshed
            return _READ
        self._phase = _Phase.WAITING
        self._wait_started = now
        return self._sleep_or_give_up(now, stopping)

    def _on_wait(self, outcome: Outcome, now: float, stopping: bool) -> Command:
        if outcome is None:  # slept
            return CheckHolder()
        assert isinstance(outcome, HolderState), outcome
        if (
            outcome.generation is None
            or outcome.generation != self._state.generation
            or not outcome.lock_held
        ):
            self._phase = _Phase.LOOK
            return _READ
        return self._sleep_or_give_up(now, stopping)

    def _sleep_or_give_up(self, now: float, stopping: bool) -> Command:
        if stopping:
            return self._end(False, self._serve_or_fail(now, "the auth replica is stopping"))
        if now >= self._give_up_at:
            why = "a refresh on another replica is taking too long"
            return self._end(False, self._serve_or_fail(now, why))
        return Sleep(
            wait_delay(
                now - self._wait_started,
                base=self._t.wait_poll_base,
                cap=self._t.wait_poll_cap,
                rng=self._rng,
            )
        )

    # -- the answer -------------------------------------------------------------------------

    def _on_answer(self, answer: TokenSet | TokenEndpointError, now: float) -> Command:
        state = self._state
        if isinstance(answer, TokenSet):
            self._phase = _Phase.WRITING
            return WriteRefreshed(state.generation, self._forced)
        if answer.kind is FailureKind.INVALID_GRANT:
            self._phase = _Phase.DISCONNECTING
            reason = _GRANT_REJECTED_AFTER_LOSS if state.answer_lost else _GRANT_REJECTED
            return WriteDisconnect(state.generation, reason)
        lost = answer.kind is FailureKind.ANSWER_LOST
        delay = backoff_delay(
            min(state.failures, _MAX_BACKOFF_ATTEMPT),
            base=self._t.backoff_base,
            cap=self._t.backoff_cap,
            rng=self._rng,
        )
        record = RecordFailure(
            state.generation,
            kind=answer.kind,
            reason=f"{ANSWER_LOST_REASON} ({answer})" if lost else str(answer),
            retry_at=now + max(delay, answer.retry_after or 0.0),
            answer_lost=lost,
            forced=self._forced,
        )
        last = self._serve_or_fail(now, str(answer))
        if lost:
            # The provider may have rotated the refresh token in the lost answer, and may
            # still be working on the request: the lock is never released early, so no
            # replica presents the old token before the lease runs out.
            return self._then(LetLeaseExpire(), record, last)
        return self._then(record, ReleaseLock(), last)

    # -- endings ----------------------------------------------------------------------------

    def _serve_or_fail(self, now: float, why: str) -> ServeStored | Fail:
        if (
            self._state.found
            and self._state.connected
            and still_usable(self._state.expires_at, now)
        ):
            return _SERVE
        return Fail(Unavailable(f"no valid token for account {self.account_id!r}: {why}"))

    def _end(self, holding: bool, last: Command) -> Command:
        """``last``, after releasing the lock first when this attempt holds it."""
        if holding:
            return self._then(ReleaseLock(), last)
        return self._finish(last)

    def _then(self, *commands: Command) -> Command:
        self._queue = list(commands)
        self._phase = _Phase.QUEUED
        return self._next_queued()

    def _settle(self, why: str) -> Command:
        """Fenced out: release the lock, read once more, serve what is there or fail."""
        self._settle_why = why
        return self._then(ReleaseLock(), ReadAccount())

    def _next_queued(self) -> Command:
        command = self._queue.pop(0)
        if isinstance(command, ReadAccount):
            self._phase = _Phase.SETTLING
        elif isinstance(command, TERMINAL):
            self._phase = _Phase.DONE
        return command

    def _finish(self, last: Command) -> Command:
        self._phase = _Phase.DONE
        return last

    def _disconnected(self) -> str:
        reason = _GRANT_REJECTED_AFTER_LOSS if self._state.answer_lost else _GRANT_REJECTED
        return disconnected_message(self.account_id, reason, self._state.provider)


def disconnected_message(account_id: str, reason: str, provider: str) -> str:
    """What a caller of a disconnected account reads: why, and how to reconnect."""
    return (
        f"account {account_id!r} is disconnected ({reason}); reconnect it with: "
        f"keyrelay connect {account_id} --provider {provider}"
    )


def satisfies(
    *,
    generation: int,
    expires_at: float,
    now: float,
    min_ttl: float,
    skew: float,
    stale_generation: int,
) -> bool:
    """Whether a token another caller's attempt produced is what this caller asked for
    (callers that join a refresh in flight check it after the shared attempt)."""
    if stale_generation and stale_generation >= generation:
        return False
    return remaining_ttl_ok(expires_at, now, min_ttl, skew)
