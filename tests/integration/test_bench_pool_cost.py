"""``bench/pool_cost.py`` runs end to end and prints both routes; numbers are never checked.

Only what does not depend on timing is: a row per route with a time per round,
every request answered 200 with its access line (the script checks and says so),
the pooled requests served by a member, and a result line for the target.
"""

from __future__ import annotations

import re

from tests.support.bench import run_bench


def test_bench_pool_cost_smoke_run_prints_both_routes_and_a_result() -> None:
    out = run_bench("pool_cost.py", "--quick", "--no-callgrind")
    # The table's rows: route, a time per round (2 with --quick), min, median.
    rows = re.findall(r"^ *(plain|pooled)((?: +[\d.]+)+)$", out, re.M)
    assert [route for route, _ in rows] == ["plain", "pooled"], out
    for _, values in rows:
        times = [float(value) for value in values.split()]
        assert len(times) == 4, out
        assert all(t > 0 for t in times)
    assert re.search(r"pooled - plain: [+-][\d.]+ us \(median of the rounds. differences\)", out), (
        out
    )
    assert re.search(r"every request 200 and one access line; .*member-\d", out)
    assert "instructions: skipped (--no-callgrind)" in out
    assert re.search(r"^(PASS|MISS) CPU time: [+-][\d.]+ us per request", out, re.M)
