"""LineLimiter: at most one line per key per interval, counting those left out."""

from __future__ import annotations

import pytest

from keyrelay.log_limit import LineLimiter

A, B = "a", "b"

# (key, now, answer): None = leave the line out; n = write it, n left out before it.
CASES: dict[str, list[tuple[str, float, int | None]]] = {
    "the first line of a key is written": [(A, 100.0, 0)],
    "within the interval lines are left out and counted": [
        (A, 0.0, 0),
        (A, 1.0, None),
        (A, 9.9, None),
        (A, 10.0, 2),  # the window is [last, last + interval)
        (A, 10.5, None),
        (A, 20.0, 1),
    ],
    "a quiet spell: the next line is written with nothing left out": [
        (A, 0.0, 0),
        (A, 500.0, 0),
    ],
    "the window starts at the last written line, not at the last line seen": [
        (A, 0.0, 0),
        (A, 9.0, None),
        (A, 12.0, 1),
        (A, 21.0, None),
        (A, 22.0, 1),
    ],
    "keys are independent": [
        (A, 0.0, 0),
        (B, 1.0, 0),
        (A, 2.0, None),
        (B, 3.0, None),
        (B, 4.0, None),
        (A, 10.0, 1),
        (B, 11.0, 2),
    ],
    "a clock that went back starts a new window": [
        (A, 100.0, 0),
        (A, 101.0, None),
        (A, 50.0, 1),
        (A, 55.0, None),
    ],
}


@pytest.mark.parametrize("steps", list(CASES.values()), ids=list(CASES))
def test_admit(steps: list[tuple[str, float, int | None]]) -> None:
    limiter: LineLimiter[str] = LineLimiter(10.0)
    for index, (key, now, expected) in enumerate(steps):
        assert limiter.admit(key, now) == expected, f"step {index}: {key} at {now}"


def test_a_zero_interval_writes_every_line() -> None:
    limiter: LineLimiter[str] = LineLimiter(0.0)
    assert [limiter.admit(A, 1.0) for _ in range(3)] == [0, 0, 0]


def test_keys_beyond_the_bound_forget_the_one_written_longest_ago() -> None:
    limiter: LineLimiter[str] = LineLimiter(10.0, max_keys=2)
    assert limiter.admit("x", 0.0) == 0
    assert limiter.admit("y", 1.0) == 0
    assert limiter.admit("x", 2.0) is None  # x's last written line is still at 0
    assert limiter.admit("y", 3.0) is None
    assert limiter.admit("z", 4.0) == 0  # x is forgotten, with its count
    assert limiter.admit("y", 5.0) is None  # y is still remembered
    assert limiter.admit("x", 6.0) == 0  # x starts afresh (y is forgotten now)
    assert limiter.admit("y", 7.0) == 0


def test_a_key_written_again_becomes_the_newest() -> None:
    limiter: LineLimiter[str] = LineLimiter(10.0, max_keys=2)
    limiter.admit("x", 0.0)
    limiter.admit("y", 1.0)
    assert limiter.admit("x", 10.0) == 0  # x written again: y is now the oldest
    assert limiter.admit("z", 11.0) == 0  # forgets y
    assert limiter.admit("x", 12.0) is None
    assert limiter.admit("y", 12.0) == 0


@pytest.mark.parametrize(("interval", "max_keys"), [(-1.0, 1), (1.0, 0)])
def test_bad_arguments(interval: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        LineLimiter[str](interval, max_keys=max_keys)
