"""Refresh decisions and retry/wait delays."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrelay.auth.core.refresh import (
    Decision,
    backoff_delay,
    cooling_down,
    decide,
    remaining_ttl_ok,
    still_usable,
    wait_delay,
)


class FixedRandom(random.Random):
    """A Random whose every draw is ``value``: uniform(a, b) == a + (b - a) * value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# --- remaining_ttl_ok / still_usable ---------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_at", "now", "min_ttl", "skew", "ok"),
    [
        (130.0, 100.0, 0.0, 30.0, True),  # exactly max(min_ttl, skew) left
        (129.9, 100.0, 0.0, 30.0, False),
        (200.0, 100.0, 60.0, 30.0, True),
        (159.0, 100.0, 60.0, 30.0, False),  # min_ttl dominates
        (160.0, 100.0, 60.0, 30.0, True),
        (129.0, 100.0, 10.0, 30.0, False),  # skew dominates
        (100.0, 100.0, 0.0, 0.0, True),
        (99.0, 100.0, 0.0, 0.0, False),
        (50.0, 100.0, 0.0, 30.0, False),
    ],
)
def test_remaining_ttl_ok(
    expires_at: float, now: float, min_ttl: float, skew: float, ok: bool
) -> None:
    assert remaining_ttl_ok(expires_at, now, min_ttl, skew) is ok


@pytest.mark.parametrize(
    ("expires_at", "now", "usable"),
    [(101.0, 100.0, True), (100.001, 100.0, True), (100.0, 100.0, False), (99.0, 100.0, False)],
)
def test_still_usable(expires_at: float, now: float, usable: bool) -> None:
    assert still_usable(expires_at, now) is usable


# --- decide ----------------------------------------------------------------------------------

FRESH = 1000.0  # expires_at far past now + skew
NOW = 100.0


@pytest.mark.parametrize(
    ("generation", "expires_at", "min_ttl", "stale", "decision"),
    [
        (5, FRESH, 0.0, None, Decision.SERVE),
        (5, FRESH, 0.0, 0, Decision.SERVE),  # 0 means no report
        (5, FRESH, 0.0, 5, Decision.FORCED_REFRESH),  # the current token was rejected
        (5, FRESH, 0.0, 6, Decision.FORCED_REFRESH),  # a report from the future: refresh anyway
        (5, FRESH, 0.0, 4, Decision.SERVE),  # already replaced by generation 5
        (5, FRESH, 0.0, -1, Decision.SERVE),
        (5, NOW + 10, 0.0, 4, Decision.REFRESH),  # replaced, but the new one is too old too
        (5, NOW + 10, 0.0, None, Decision.REFRESH),  # inside the skew
        (5, NOW + 30, 0.0, None, Decision.SERVE),  # exactly the skew left
        (5, NOW + 60, 120.0, None, Decision.REFRESH),  # the caller needs more than is left
        (5, NOW + 120, 120.0, None, Decision.SERVE),
        (5, NOW - 1, 0.0, None, Decision.REFRESH),  # expired
        (1, FRESH, 0.0, 1, Decision.FORCED_REFRESH),
        (5, NOW + 10, 0.0, 5, Decision.FORCED_REFRESH),  # rejected and due anyway
        (0, FRESH, 0.0, 0, Decision.SERVE),  # 0 is "unset" even when generation is 0
    ],
)
def test_decide(
    generation: int, expires_at: float, min_ttl: float, stale: int | None, decision: Decision
) -> None:
    assert (
        decide(
            generation=generation,
            expires_at=expires_at,
            now=NOW,
            min_ttl=min_ttl,
            skew=30.0,
            stale_generation=stale,
        )
        is decision
    )


times = st.floats(min_value=-1e9, max_value=1e10, allow_nan=False)
durations = st.floats(min_value=0, max_value=1e6, allow_nan=False)
generations = st.integers(min_value=0, max_value=2**40)


@given(
    generation=generations,
    expires_at=times,
    now1=times,
    now2=times,
    min_ttl=durations,
    skew=durations,
)
def test_decide_is_monotone_in_now(
    generation: int, expires_at: float, now1: float, now2: float, min_ttl: float, skew: float
) -> None:
    early, late = sorted((now1, now2))

    def at(now: float) -> Decision:
        return decide(
            generation=generation,
            expires_at=expires_at,
            now=now,
            min_ttl=min_ttl,
            skew=skew,
            stale_generation=None,
        )

    if at(early) is Decision.REFRESH:
        assert at(late) is Decision.REFRESH
    if at(late) is Decision.SERVE:
        assert at(early) is Decision.SERVE


@given(
    generation=st.integers(min_value=1, max_value=2**40),
    ahead=st.integers(min_value=0, max_value=10),
    expires_at=times,
    now=times,
    min_ttl=durations,
    skew=durations,
)
def test_a_report_about_the_current_generation_always_refreshes(
    generation: int, ahead: int, expires_at: float, now: float, min_ttl: float, skew: float
) -> None:
    """Outside a cool-down (none configured, or never forced)."""
    decision = decide(
        generation=generation,
        expires_at=expires_at,
        now=now,
        min_ttl=min_ttl,
        skew=skew,
        stale_generation=generation + ahead,
    )
    assert decision is Decision.FORCED_REFRESH


@given(
    generation=st.integers(min_value=2, max_value=2**40),
    data=st.data(),
    expires_at=times,
    now=times,
    min_ttl=durations,
    skew=durations,
)
def test_a_report_about_an_older_generation_is_judged_on_freshness(
    generation: int,
    data: st.DataObject,
    expires_at: float,
    now: float,
    min_ttl: float,
    skew: float,
) -> None:
    stale = data.draw(st.none() | st.integers(min_value=0, max_value=generation - 1))
    decision = decide(
        generation=generation,
        expires_at=expires_at,
        now=now,
        min_ttl=min_ttl,
        skew=skew,
        stale_generation=stale,
    )
    fresh = expires_at - now >= max(min_ttl, skew)
    assert decision is (Decision.SERVE if fresh else Decision.REFRESH)


# --- backoff_delay ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (7, 30.0), (5000, 30.0)],
)
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, ceiling: float) -> None:
    top = backoff_delay(attempt, base=0.5, cap=30.0, rng=FixedRandom(1.0))
    assert top == pytest.approx(ceiling)
    assert backoff_delay(attempt, base=0.5, cap=30.0, rng=FixedRandom(0.0)) == 0.0
    assert backoff_delay(attempt, base=0.5, cap=30.0, rng=FixedRandom(0.5)) == pytest.approx(
        ceiling / 2
    )


def test_backoff_is_full_jitter() -> None:
    # Full jitter spreads over the whole [0, ceiling]: an "equal jitter" or
    # fixed delay would never come close to 0 and would have a higher mean.
    rng = random.Random(1234)
    delays = [backoff_delay(4, base=1.0, cap=100.0, rng=rng) for _ in range(2000)]
    assert min(delays) < 0.5
    assert max(delays) > 15.5
    assert max(delays) <= 16.0
    assert statistics.mean(delays) == pytest.approx(8.0, rel=0.1)


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [(-1, 1.0, 10.0), (0, -1.0, 10.0), (0, 1.0, -1.0), (0, math.nan, 10.0), (0, 1.0, math.nan)],
)
def test_backoff_rejects_nonsense(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="must be 0 or more"):
        backoff_delay(attempt, base=base, cap=cap, rng=random.Random(0))


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0, max_value=1e3),
    cap=st.floats(min_value=0, max_value=1e4),
    seed=st.integers(),
)
def test_backoff_stays_within_bounds(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, rng=random.Random(seed))
    ceiling = min(cap, base * 2.0 ** min(attempt, 1000))
    assert 0.0 <= delay <= ceiling


# --- wait_delay ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "draw", "expected"),
    [
        (0.0, 0.5, 0.1),  # the middle of the jitter band is the nominal interval
        (4.0, 0.5, 1.1),  # base + elapsed / 4
        (0.0, 0.0, 0.05),  # -50 %
        (0.0, 1.0, 0.15),  # +50 %
        (100.0, 0.5, 2.0),  # capped
        (100.0, 0.0, 2.0),  # still capped: 0.5 * 25.1
        (-5.0, 0.5, 0.1),  # a clock step backwards counts as no wait
    ],
)
def test_wait_delay(elapsed: float, draw: float, expected: float) -> None:
    delay = wait_delay(elapsed, base=0.1, cap=2.0, rng=FixedRandom(draw))
    assert delay == pytest.approx(expected)


def test_wait_delay_is_jittered() -> None:
    rng = random.Random(99)
    delays = {wait_delay(1.0, base=0.1, cap=5.0, rng=rng) for _ in range(100)}
    assert len(delays) == 100
    assert all(0.175 <= d <= 0.525 for d in delays)  # 0.35 ± 50 %


@pytest.mark.parametrize(("base", "cap"), [(-0.1, 1.0), (0.1, -1.0), (math.nan, 1.0)])
def test_wait_delay_rejects_nonsense(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="must be 0 or more"):
        wait_delay(0.0, base=base, cap=cap, rng=random.Random(0))


@given(
    elapsed1=st.floats(min_value=-10, max_value=1e6),
    elapsed2=st.floats(min_value=-10, max_value=1e6),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0, max_value=100),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_wait_delay_grows_with_elapsed_and_respects_the_cap(
    elapsed1: float, elapsed2: float, base: float, cap: float, draw: float
) -> None:
    early, late = sorted((elapsed1, elapsed2))
    first = wait_delay(early, base=base, cap=cap, rng=FixedRandom(draw))
    second = wait_delay(late, base=base, cap=cap, rng=FixedRandom(draw))
    assert first <= second <= cap
    assert second >= min(cap, 0.5 * base)  # never a busy loop


# --- the forced-refresh cool-down ----------------------------------------------------------

COOLDOWN = 30.0


@pytest.mark.parametrize(
    ("expires_at", "stale", "forced_at", "decision"),
    [
        (FRESH, 5, 0.0, Decision.FORCED_REFRESH),  # never forced: the first always goes
        (FRESH, 5, NOW - 29.9, Decision.SERVE_COOLING),  # inside the cool-down
        (FRESH, 5, NOW, Decision.SERVE_COOLING),
        (FRESH, 5, NOW - COOLDOWN, Decision.FORCED_REFRESH),  # the cool-down is over
        (FRESH, 5, NOW - 500, Decision.FORCED_REFRESH),
        (FRESH, 5, NOW + 50, Decision.FORCED_REFRESH),  # forced "in the future": a clock step
        (NOW + 10, 5, NOW - 1, Decision.REFRESH),  # cooling, but due anyway: a plain refresh
        (FRESH, 4, NOW - 1, Decision.SERVE),  # about an older generation: no report at all
        (FRESH, 0, NOW - 1, Decision.SERVE),
        (NOW + 10, 0, NOW - 1, Decision.REFRESH),  # the cool-down never holds a due refresh
    ],
)
def test_decide_with_the_forced_refresh_cooldown(
    expires_at: float, stale: int, forced_at: float, decision: Decision
) -> None:
    got = decide(
        generation=5,
        expires_at=expires_at,
        now=NOW,
        min_ttl=0.0,
        skew=30.0,
        stale_generation=stale,
        forced_at=forced_at,
        forced_cooldown=COOLDOWN,
    )
    assert got is decision
    assert got.serves is (decision in (Decision.SERVE, Decision.SERVE_COOLING))


@given(forced_at=times, now=times, cooldown=durations)
def test_cooling_down_never_outlasts_the_cooldown(
    forced_at: float, now: float, cooldown: float
) -> None:
    if cooling_down(forced_at, now, cooldown):
        assert forced_at > 0
        assert 0 <= now - forced_at < cooldown
    if cooldown == 0:
        assert not cooling_down(forced_at, now, cooldown)
