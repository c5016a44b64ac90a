"""When to refresh an access token, and how long to wait between tries.

These are the decisions of DESIGN §1.2 taken out of the code that holds the
Redis lock, so they can be tested exhaustively with an explicit ``now``:

* :func:`decide` — serve the stored token or refresh it. A token is served
  only while it stays valid for ``max(min_ttl, skew)`` more seconds: ``min_ttl``
  is what the caller needs (a long upload), ``skew`` absorbs clock differences
  between us, the caller and the provider. ``stale_generation`` is a caller's
  report that the token *of that generation* was rejected upstream; it forces a
  refresh only if that token is still the current one, so a burst of reports
  about one bad token yields one refresh, not one per report.
* :func:`still_usable` — while a refresh fails transiently the old token is
  served for as long as it has not actually expired.
* :func:`backoff_delay` — retrying the token endpoint after a transient
  failure, with "full jitter" (delay drawn from ``[0, min(cap, base·2^n)]``) so
  that replicas that failed together do not retry together.
* :func:`wait_delay` — polling interval of a replica that did not get the lock
  and waits for the holder's new generation (§1.2.5).

Pure functions: no I/O, no clock; randomness comes from the ``rng`` passed in.
"""

from __future__ import annotations

import enum
import random

__all__ = [
    "Decision",
    "backoff_delay",
    "decide",
    "remaining_ttl_ok",
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
) -> Decision:
    """Serve the current token of ``generation`` or refresh it.

    ``stale_generation`` None or 0 means no report. A report about the current
    generation (or, defensively, a later one) forces a refresh; a report about
    an older generation is already answered by the current token, which is then
    judged on freshness alone.
    """
    if stale_generation and stale_generation >= generation:
        return Decision.REFRESH
    if remaining_ttl_ok(expires_at, now, min_ttl, skew):
        return Decision.SERVE
    return Decision.REFRESH


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
