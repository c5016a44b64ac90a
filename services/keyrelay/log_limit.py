"""Rate-limited log lines: at most one line per key per interval, counting the rest.

Pure logic with an explicit ``now`` (seconds on any clock that does not jump;
the callers pass ``time.monotonic()``): no logging, no clock, no asyncio. The
caller asks ``admit(key, now)`` before writing a line of that key and writes
it only when the answer is not ``None``; the answer is how many lines of the
key were left out since the last one written, so the line can say so::

    limiter = LineLimiter(interval=10.0)
    left_out = limiter.admit(("get_account", "ConnectionError"), time.monotonic())
    if left_out is not None:
        log.error("token store (Redis) error", extra={"suppressed": left_out, ...})

- The first line of a key is written at once; then at most one per
  ``interval`` (a key's window starts at its last written line).
- A ``now`` earlier than the key's last written line (a clock that went back)
  starts a new window: the line is written rather than held back for as long
  as the clock went back.
- At most ``max_keys`` keys are remembered: a new key beyond that forgets the
  key whose last line is the oldest, and the count of lines left out for it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

DEFAULT_MAX_KEYS = 256


class LineLimiter(Generic[K]):
    __slots__ = ("_interval", "_keys", "_max_keys")

    def __init__(self, interval: float, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if interval < 0:
            raise ValueError("interval must not be negative")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._interval = interval
        self._max_keys = max_keys
        # key -> [time of its last written line, lines left out since]; in the
        # order of their last written line, oldest first.
        self._keys: dict[K, list[float]] = {}

    @property
    def interval(self) -> float:
        return self._interval

    def admit(self, key: K, now: float) -> int | None:
        """``None``: leave this line out (it is counted). Otherwise write it: the
        number of lines of ``key`` left out since the last one written."""
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self._max_keys:
                del self._keys[next(iter(self._keys))]
            self._keys[key] = [now, 0]
            return 0
        last, left_out = entry
        if last <= now < last + self._interval:
            entry[1] = left_out + 1
            return None
        del self._keys[key]  # re-inserted last: the newest written line
        self._keys[key] = [now, 0]
        return int(left_out)
