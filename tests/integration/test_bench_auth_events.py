"""``bench/auth_events.py`` runs end to end and prints every row; numbers are never checked.

Only what does not depend on timing is: the table has a row per number of
subscribers, every event reached every subscriber, and the replica's Redis
connections did not grow with them.
"""

from __future__ import annotations

from tests.support.bench import run_bench


def test_bench_auth_events_smoke_run_prints_every_row() -> None:
    out = run_bench("auth_events.py", "--quick", "--subscribers", "10", "100", timeout=300)
    results = out.split("== Results ==", 1)[1].split("Targets:", 1)[0]
    rows = [line.split() for line in results.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "10", "100"]
    assert "[PASS] every event reached every subscriber, no stream failed" in out
    assert "[PASS] Redis connections do not grow with subscribers" in out
    assert "GetToken p99 with 100 subscribers" in out
