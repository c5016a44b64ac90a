"""``bench/auth_delivery_cost.py`` runs end to end; the cost itself is never checked.

Only what does not depend on timing is: every event reached every subscriber and
a cost per delivery was printed.
"""

from __future__ import annotations

import re

from tests.support.bench import run_bench


def test_bench_auth_delivery_cost_smoke_run_prints_a_cost() -> None:
    out = run_bench(
        "auth_delivery_cost.py",
        *("--subscribers", "20", "--event-rate", "10", "--seconds", "0.5"),
        timeout=300,
    )
    delivered = re.search(r"deliveries: (\d+) of (\d+), errors 0", out)
    assert delivered is not None, out
    assert delivered[1] == delivered[2]
    assert int(delivered[1]) > 0
    assert re.search(r"= [\d.]+ us per delivery", out), out
