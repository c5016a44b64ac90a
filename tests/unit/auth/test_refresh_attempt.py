"""The refresh attempt's state machine (``RefreshAttempt``): every branch, as the exact
sequence of commands it gives for a scripted sequence of outcomes, with an explicit clock.

Each row of ``BRANCHES`` is one path through the map in ``core/refresh.py``. A
hypothesis test then drives the machine with arbitrary outcomes and checks the rules
that keep a grant alive whatever happens: a lock is only released when no answer can
still be on its way, a lost answer never releases it, one token call per attempt, and
every attempt ends.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.auth.core.errors import AuthError, FailedPrecondition, NotFound, Unavailable
from keyrelay.auth.core.refresh import (
    ANSWER_LOST_REASON,
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
from keyrelay.auth.core.tokens import FailureKind, TokenEndpointError, TokenSet

NOW = 1_000_000.0
T = Timings()  # the defaults: skew 30, deadline 30, wait 35, backoff 1..60, cool-down 30
HALF = 0.5  # every random draw: uniform(a, b) == a + (b - a) / 2


class FixedRandom(random.Random):
    def __init__(self, value: float = HALF) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


FRESH = AccountState(
    "acct", found=True, connected=True, provider="idp", generation=5, expires_at=NOW + 3600
)
DUE = replace(FRESH, expires_at=NOW + 10)  # inside the 30 s skew, still valid
EXPIRED = replace(FRESH, expires_at=NOW - 1)
REFRESHED = replace(FRESH, generation=6)  # what another replica's refresh left behind
GONE = AccountState("acct", found=False)
DISCONNECTED = replace(FRESH, connected=False, disconnect_reason="user", generation=6)
ANSWER = TokenSet(
    access_token="new-access",
    token_type="Bearer",
    expires_at=NOW + 3600,
    refresh_token="new-refresh",
    scopes=("openid",),
)
INVALID_GRANT = TokenEndpointError(FailureKind.INVALID_GRANT, status=400, error="invalid_grant")
INVALID_CLIENT = TokenEndpointError(FailureKind.MISCONFIGURED, status=401, error="invalid_client")
STATUS_503 = TokenEndpointError(FailureKind.TRANSIENT, status=503)
STATUS_503_RETRY_AFTER = TokenEndpointError(FailureKind.TRANSIENT, status=503, retry_after=120.0)
NOT_SENT = TokenEndpointError.not_sent("cannot reach https://idp/token: ConnectError")
LOST = TokenEndpointError.answer_lost("https://idp/token: no complete answer in time")
# Backoff after the first failure: uniform(0, min(60, 1 * 2**0)) with the fixed draw.
FIRST_BACKOFF = 0.5
DEADLINE = NOW + T.refresh_deadline


@dataclass(frozen=True)
class At:
    """An outcome that arrives at a time other than NOW."""

    outcome: Outcome
    now: float


@dataclass(frozen=True)
class Stopping:
    """An outcome handed over while the replica is shutting down."""

    outcome: Outcome


def drive(
    script: Sequence[Outcome | At | Stopping],
    *,
    min_ttl: float = 0.0,
    stale: int = 0,
    timings: Timings = T,
) -> list[Command]:
    attempt = RefreshAttempt(
        "acct", min_ttl=min_ttl, stale_generation=stale, timings=timings, rng=FixedRandom()
    )
    commands: list[Command] = [attempt.start(NOW)]
    for item in script:
        assert not attempt.done, f"the attempt ended before {item!r}: {commands}"
        stopping = isinstance(item, Stopping)
        timed = item.outcome if isinstance(item, Stopping) else item
        now = timed.now if isinstance(timed, At) else NOW
        outcome = timed.outcome if isinstance(timed, At) else timed
        commands.append(attempt.step(outcome, now, stopping=stopping))
    assert attempt.done, f"the attempt is not over after the script: {commands}"
    with pytest.raises(RuntimeError):
        attempt.step(None, NOW)
    return commands


def failed(error: type[AuthError]) -> Fail:
    """A Fail that compares by the error's class (see ``same``)."""
    return Fail(error("…"))


def same(got: list[Command], expected: list[Command]) -> bool:
    """Equal, with a Fail compared by the class of its error (messages checked apart)."""

    def key(command: Command) -> object:
        return ("Fail", type(command.error)) if isinstance(command, Fail) else command

    return [key(c) for c in got] == [key(c) for c in expected]


def failure(
    kind: FailureKind, reason: str, retry_at: float, *, lost: bool = False
) -> RecordFailure:
    return RecordFailure(5, kind, reason, retry_at, answer_lost=lost, forced=False)


LOST_REASON = f"{ANSWER_LOST_REASON} ({LOST})"
TAKE_LOCK = [TryLock(), ReadAccount()]
CALL = CallTokenEndpoint(DEADLINE)

# (id, script of outcomes, expected commands, caller's min_ttl, caller's stale generation)
# Any: mypy cannot infer the rows' mixed lists against the unions row by row.
BRANCHES: list[tuple[str, list[Any], list[Any], float, int]] = [
    ("fresh token served", [FRESH], [ReadAccount(), ServeStored()], 0, 0),
    ("never connected", [GONE], [ReadAccount(), failed(NotFound)], 0, 0),
    ("disconnected", [DISCONNECTED], [ReadAccount(), failed(FailedPrecondition)], 0, 0),
    (
        "due, lock taken, refreshed",
        [DUE, LockTaken(True), DUE, ANSWER, Written(6)],
        [ReadAccount(), *TAKE_LOCK, CALL, WriteRefreshed(5, forced=False), ServeFresh(6)],
        0,
        0,
    ),
    (
        "the caller needs more than is left (min_ttl)",
        [replace(FRESH, expires_at=NOW + 100), LockTaken(True), DUE, ANSWER, Written(6)],
        [ReadAccount(), *TAKE_LOCK, CALL, WriteRefreshed(5, forced=False), ServeFresh(6)],
        600,
        0,
    ),
    (
        "answered late, inside the deadline (past token_timeout)",
        [DUE, LockTaken(True), DUE, At(ANSWER, NOW + 14), At(Written(6), NOW + 14)],
        [ReadAccount(), *TAKE_LOCK, CALL, WriteRefreshed(5, forced=False), ServeFresh(6)],
        0,
        0,
    ),
    (
        "lock busy, then the generation moved",
        [DUE, LockTaken(False), None, HolderState(6, lock_held=True), REFRESHED],
        [ReadAccount(), TryLock(), Sleep(0.02), CheckHolder(), ReadAccount(), ServeStored()],
        0,
        0,
    ),
    (
        "lock busy, holder still at it, then its lock went away without a new generation",
        [
            DUE,
            LockTaken(False),
            None,
            At(HolderState(5, lock_held=True), NOW + 1),
            At(None, NOW + 1),
            At(HolderState(5, lock_held=False), NOW + 1),
            At(DUE, NOW + 1),
            At(LockTaken(True), NOW + 1),
            At(DUE, NOW + 1),
            At(ANSWER, NOW + 1),
            At(Written(6), NOW + 1),
        ],
        [
            ReadAccount(),
            TryLock(),
            Sleep(0.02),
            CheckHolder(),
            # (0.02 + 1 s waited / 4) with the fixed draw: the poll slows as the wait grows
            Sleep(0.25),
            CheckHolder(),
            ReadAccount(),
            *TAKE_LOCK,
            CallTokenEndpoint(NOW + 1 + T.refresh_deadline),
            WriteRefreshed(5, forced=False),
            ServeFresh(6),
        ],
        0,
        0,
    ),
    (
        "lock busy past wait_for_refresh, token still valid",
        [
            replace(FRESH, expires_at=NOW + 100),
            LockTaken(False),
            None,
            At(HolderState(5, True), NOW + T.wait_for_refresh),
        ],
        [ReadAccount(), TryLock(), Sleep(0.02), CheckHolder(), ServeStored()],
        600,
        0,
    ),
    (
        "lock busy past wait_for_refresh, token expired",
        [EXPIRED, LockTaken(False), None, At(HolderState(5, True), NOW + T.wait_for_refresh)],
        [ReadAccount(), TryLock(), Sleep(0.02), CheckHolder(), failed(Unavailable)],
        0,
        0,
    ),
    (
        "re-read after the lock finds a newer generation",
        [DUE, LockTaken(True), REFRESHED, None],
        [ReadAccount(), *TAKE_LOCK, ReleaseLock(), ServeStored()],
        0,
        0,
    ),
    (
        "re-read after the lock finds the account disconnected",
        [DUE, LockTaken(True), DISCONNECTED, None],
        [ReadAccount(), *TAKE_LOCK, ReleaseLock(), failed(FailedPrecondition)],
        0,
        0,
    ),
    (
        "not sent: release, back off, serve the valid token",
        [DUE, LockTaken(True), DUE, NOT_SENT, Written(1), None],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            failure(FailureKind.NOT_SENT, str(NOT_SENT), NOW + FIRST_BACKOFF),
            ReleaseLock(),
            ServeStored(),
        ],
        0,
        0,
    ),
    (
        "not sent, token expired",
        [EXPIRED, LockTaken(True), EXPIRED, NOT_SENT, Written(1), None],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            failure(FailureKind.NOT_SENT, str(NOT_SENT), NOW + FIRST_BACKOFF),
            ReleaseLock(),
            failed(Unavailable),
        ],
        0,
        0,
    ),
    (
        "no answer by the deadline: the lease is left to expire, never released",
        [
            DUE,
            LockTaken(True),
            DUE,
            At(LOST, DEADLINE),
            At(None, DEADLINE),
            At(Written(1), DEADLINE),
        ],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            LetLeaseExpire(),
            failure(FailureKind.ANSWER_LOST, LOST_REASON, DEADLINE + FIRST_BACKOFF, lost=True),
            failed(Unavailable),  # DUE expired 10 s after NOW, long before the deadline
        ],
        0,
        0,
    ),
    (
        "connection cut after sending: the lease is left to expire, the valid token served",
        [FRESH, LockTaken(True), FRESH, LOST, None, Written(1)],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CallTokenEndpoint(DEADLINE),
            LetLeaseExpire(),
            RecordFailure(5, FailureKind.ANSWER_LOST, LOST_REASON, NOW + FIRST_BACKOFF, True, True),
            ServeStored(),
        ],
        0,
        5,
    ),
    (
        "invalid_grant: disconnect, release, fail",
        [DUE, LockTaken(True), DUE, INVALID_GRANT, Written(6), None],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            WriteDisconnect(5, "invalid_grant: the provider no longer accepts this grant"),
            ReleaseLock(),
            failed(FailedPrecondition),
        ],
        0,
        0,
    ),
    (
        "invalid_grant after an ambiguous attempt: the reason says an answer was lost",
        [
            replace(DUE, answer_lost=True),
            LockTaken(True),
            replace(DUE, answer_lost=True),
            INVALID_GRANT,
            Written(6),
            None,
        ],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            WriteDisconnect(
                5,
                "invalid_grant after a lost refresh answer: the provider most likely rotated "
                "the refresh token in an answer that never arrived (a network cut or a "
                "provider slower than refresh_deadline_seconds)",
            ),
            ReleaseLock(),
            failed(FailedPrecondition),
        ],
        0,
        0,
    ),
    (
        "invalid_grant fenced out: another replica refreshed meanwhile",
        [DUE, LockTaken(True), DUE, INVALID_GRANT, Written(0), None, REFRESHED],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            WriteDisconnect(5, "invalid_grant: the provider no longer accepts this grant"),
            ReleaseLock(),
            ReadAccount(),
            ServeStored(),
        ],
        0,
        0,
    ),
    (
        "invalid_client: kept, backed off, released",
        [DUE, LockTaken(True), DUE, INVALID_CLIENT, Written(1), None],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            failure(FailureKind.MISCONFIGURED, str(INVALID_CLIENT), NOW + FIRST_BACKOFF),
            ReleaseLock(),
            ServeStored(),
        ],
        0,
        0,
    ),
    (
        "5xx without retry-after: backoff grows with the failures so far",
        [
            replace(DUE, failures=3),
            LockTaken(True),
            replace(DUE, failures=3),
            STATUS_503,
            Written(4),
            None,
        ],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            # uniform(0, min(60, 1 * 2**3)) with the fixed draw
            failure(FailureKind.TRANSIENT, str(STATUS_503), NOW + 4.0),
            ReleaseLock(),
            ServeStored(),
        ],
        0,
        0,
    ),
    (
        "5xx with retry-after: no new attempt before it",
        [DUE, LockTaken(True), DUE, STATUS_503_RETRY_AFTER, Written(1), None],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            failure(FailureKind.TRANSIENT, str(STATUS_503_RETRY_AFTER), NOW + 120.0),
            ReleaseLock(),
            ServeStored(),
        ],
        0,
        0,
    ),
    (
        "backing off after a failure: no lock, the valid token served",
        [replace(DUE, retry_at=NOW + 5)],
        [ReadAccount(), ServeStored()],
        0,
        0,
    ),
    (
        "backing off, token expired",
        [replace(EXPIRED, retry_at=NOW + 5, last_error="token endpoint answered 503")],
        [ReadAccount(), failed(Unavailable)],
        0,
        0,
    ),
    (
        "backing off found only after taking the lock",
        [DUE, LockTaken(True), replace(DUE, retry_at=NOW + 5), None],
        [ReadAccount(), *TAKE_LOCK, ReleaseLock(), ServeStored()],
        0,
        0,
    ),
    (
        "forced refresh (stale report), never forced before",
        [FRESH, LockTaken(True), FRESH, ANSWER, Written(6)],
        [ReadAccount(), *TAKE_LOCK, CALL, WriteRefreshed(5, forced=True), ServeFresh(6)],
        0,
        5,
    ),
    (
        "forced refresh refused inside the cool-down: the current token served",
        [replace(FRESH, forced_at=NOW - T.forced_refresh_cooldown + 1)],
        [ReadAccount(), ServeStored(cooling=True)],
        0,
        5,
    ),
    (
        "forced refresh after the cool-down",
        [
            replace(FRESH, forced_at=NOW - T.forced_refresh_cooldown),
            LockTaken(True),
            replace(FRESH, forced_at=NOW - T.forced_refresh_cooldown),
            ANSWER,
            Written(6),
        ],
        [ReadAccount(), *TAKE_LOCK, CALL, WriteRefreshed(5, forced=True), ServeFresh(6)],
        0,
        5,
    ),
    (
        "a report about an older generation: already answered",
        [FRESH],
        [ReadAccount(), ServeStored()],
        0,
        4,
    ),
    (
        "fenced write: release, read, serve the newer token",
        [DUE, LockTaken(True), DUE, ANSWER, Written(0), None, REFRESHED],
        [
            ReadAccount(),
            *TAKE_LOCK,
            CALL,
            WriteRefreshed(5, forced=False),
            ReleaseLock(),
            ReadAccount(),
            ServeStored(),
        ],
        0,
        0,
    ),
    (
        "no refresh token stored",
        [DUE, LockTaken(True), replace(DUE, has_refresh_token=False), None],
        [ReadAccount(), *TAKE_LOCK, ReleaseLock(), ServeStored()],
        0,
        0,
    ),
    (
        "the account's provider is not configured",
        [EXPIRED, LockTaken(True), replace(EXPIRED, provider_configured=False), None],
        [ReadAccount(), *TAKE_LOCK, ReleaseLock(), failed(Unavailable)],
        0,
        0,
    ),
    (
        "shutdown before taking the lock: no new attempt",
        [Stopping(DUE)],
        [ReadAccount(), ServeStored()],
        0,
        0,
    ),
    (
        "shutdown with the lock held, before the call: release, no token call",
        [DUE, LockTaken(True), Stopping(DUE), None],
        [ReadAccount(), *TAKE_LOCK, ReleaseLock(), ServeStored()],
        0,
        0,
    ),
    (
        "shutdown while waiting for another replica: stop waiting",
        [EXPIRED, Stopping(LockTaken(False))],
        [ReadAccount(), TryLock(), failed(Unavailable)],
        0,
        0,
    ),
    (
        "shutdown with the call in flight: its answer is still stored",
        [DUE, LockTaken(True), DUE, Stopping(ANSWER), Stopping(Written(6))],
        [ReadAccount(), *TAKE_LOCK, CALL, WriteRefreshed(5, forced=False), ServeFresh(6)],
        0,
        0,
    ),
]


@pytest.mark.parametrize(
    ("script", "expected", "min_ttl", "stale"),
    [pytest.param(s, e, m, g, id=name) for name, s, e, m, g in BRANCHES],
)
def test_branch(
    script: list[Outcome | At | Stopping], expected: list[Command], min_ttl: float, stale: int
) -> None:
    got = drive(script, min_ttl=min_ttl, stale=stale)
    assert same(got, expected), "\n".join(map(repr, got))


# -- what the caller reads ------------------------------------------------------------------


def last_error(commands: list[Command]) -> Exception:
    last = commands[-1]
    assert isinstance(last, Fail)
    return last.error


def test_disconnected_message_says_why_and_how_to_reconnect() -> None:
    message = str(last_error(drive([DISCONNECTED])))
    assert "'acct' is disconnected (user)" in message
    assert "keyrelay connect acct --provider idp" in message


def test_disconnect_after_a_lost_answer_says_so() -> None:
    lost = replace(DUE, answer_lost=True)
    message = str(last_error(drive([lost, LockTaken(True), lost, INVALID_GRANT, Written(6), None])))
    assert "invalid_grant after a lost refresh answer" in message
    assert "keyrelay connect acct --provider idp" in message


def test_unavailable_names_the_failure() -> None:
    commands = drive([replace(EXPIRED, retry_at=NOW + 5, last_error="answered 503")])
    assert "token endpoint failing (answered 503)" in str(last_error(commands))
    waited = drive([EXPIRED, LockTaken(False), None, At(HolderState(5, True), NOW + 40)])
    assert "a refresh on another replica is taking too long" in str(last_error(waited))


def test_never_connected_message() -> None:
    assert str(last_error(drive([GONE]))) == "account 'acct' was never connected"


def test_the_lost_answer_reason_is_recorded() -> None:
    commands = drive([DUE, LockTaken(True), DUE, LOST, None, Written(1)])
    (record,) = [c for c in commands if isinstance(c, RecordFailure)]
    assert record.reason.startswith("a refresh answer was lost")
    assert record.answer_lost


def test_the_deadline_is_the_attempts_not_the_token_timeout() -> None:
    timings = Timings(token_timeout=10, refresh_deadline=30)
    commands = drive([DUE, LockTaken(True), DUE, ANSWER, Written(6)], timings=timings)
    assert CallTokenEndpoint(NOW + 30) in commands


# -- joining another caller's attempt -------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "expires_at", "min_ttl", "stale", "ok"),
    [
        (6, NOW + 3600, 0, 0, True),
        (6, NOW + 3600, 0, 5, True),  # the shared attempt replaced the rejected token
        (6, NOW + 3600, 0, 6, False),  # it is the very token this caller saw rejected
        (6, NOW + 100, 600, 0, False),  # this caller needs longer than it lasts
        (6, NOW + 700, 600, 0, True),
        (6, NOW + 20, 0, 0, False),  # inside the skew
    ],
)
def test_a_joined_attempt_satisfies_the_caller_only_with_what_it_asked_for(
    generation: int, expires_at: float, min_ttl: float, stale: int, ok: bool
) -> None:
    assert (
        satisfies(
            generation=generation,
            expires_at=expires_at,
            now=NOW,
            min_ttl=min_ttl,
            skew=T.skew,
            stale_generation=stale,
        )
        is ok
    )


# -- the rules, under arbitrary outcomes ----------------------------------------------------

states = st.builds(
    AccountState,
    st.just("acct"),
    found=st.booleans(),
    connected=st.booleans(),
    provider=st.just("idp"),
    provider_configured=st.booleans(),
    generation=st.integers(1, 8),
    expires_at=st.floats(NOW - 100, NOW + 7200),
    retry_at=st.sampled_from([0.0, NOW + 5]),
    failures=st.integers(0, 30),
    has_refresh_token=st.booleans(),
    forced_at=st.sampled_from([0.0, NOW - 5, NOW - 100]),
    answer_lost=st.booleans(),
)
answers: st.SearchStrategy[TokenSet | TokenEndpointError] = st.sampled_from(
    [ANSWER, INVALID_GRANT, INVALID_CLIENT, STATUS_503, STATUS_503_RETRY_AFTER, NOT_SENT, LOST]
)


def outcome_for(command: Command, data: st.DataObject) -> Outcome:
    match command:
        case ReadAccount():
            return data.draw(states)
        case TryLock():
            return LockTaken(data.draw(st.booleans()))
        case CheckHolder():
            return HolderState(
                data.draw(st.none() | st.integers(1, 8)), lock_held=data.draw(st.booleans())
            )
        case CallTokenEndpoint():
            return data.draw(answers)
        case WriteRefreshed() | WriteDisconnect() | RecordFailure():
            return Written(data.draw(st.sampled_from([0, 7])))
    return None  # Sleep, ReleaseLock, LetLeaseExpire


@settings(max_examples=400, deadline=None)
@given(data=st.data(), stale=st.sampled_from([0, 4, 5, 8]), min_ttl=st.sampled_from([0, 600]))
def test_the_rules_hold_whatever_the_outcomes(
    data: st.DataObject, stale: int, min_ttl: int
) -> None:
    attempt = RefreshAttempt(
        "acct", min_ttl=min_ttl, stale_generation=stale, timings=T, rng=random.Random(0)
    )
    now = NOW
    command = attempt.start(now)
    commands = [command]
    holding = False
    read_since_lock = False
    answer: Outcome = None
    for _ in range(1000):
        if attempt.done:
            break
        outcome = outcome_for(command, data)
        if isinstance(command, TryLock):
            assert isinstance(outcome, LockTaken)
            holding = outcome.acquired
            read_since_lock = False
        if isinstance(command, ReadAccount) and holding:
            read_since_lock = True
        if isinstance(command, CallTokenEndpoint):
            answer = outcome
        now += data.draw(st.sampled_from([0.0, 0.5, 5.0]))
        stopping = data.draw(st.booleans()) if data.draw(st.integers(0, 9)) == 0 else False
        command = attempt.step(outcome, now, stopping=stopping)
        commands.append(command)
        if isinstance(command, CallTokenEndpoint):
            # Only with the lock, after re-reading under it, and once per attempt.
            assert holding, commands
            assert read_since_lock, commands
            assert sum(isinstance(c, CallTokenEndpoint) for c in commands) == 1, commands
        if isinstance(command, ReleaseLock | LetLeaseExpire):
            assert holding, commands  # only a lock this attempt took
            holding = False
        if isinstance(command, ReleaseLock):
            # Never while an answer may still come: a lost answer leaves the lease.
            assert not (
                isinstance(answer, TokenEndpointError) and answer.kind is FailureKind.ANSWER_LOST
            ), commands
        if isinstance(command, WriteRefreshed):
            assert answer is ANSWER
        if isinstance(command, WriteDisconnect):
            assert answer is INVALID_GRANT
    assert attempt.done, f"no end after 1000 steps: {commands[-5:]}"
    last = commands[-1]
    assert isinstance(last, ServeStored | ServeFresh | Fail)
    if isinstance(last, ServeFresh):
        # The lock went with the write; the token is the answer's.
        assert answer is ANSWER
    else:
        # Every other end left no lock held (released, or left to expire on purpose).
        assert not holding, commands
