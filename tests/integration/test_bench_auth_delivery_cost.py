"""``bench/auth_delivery_cost.py`` runs end to end; the cost itself is never checked.

Only what does not depend on timing is: every event reached every subscriber and
a cost per delivery was printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_auth_delivery_cost_smoke_run_prints_a_cost() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "bench/auth_delivery_cost.py",
            "--subscribers",
            "20",
            "--event-rate",
            "10",
            "--seconds",
            "0.5",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    delivered = re.search(r"deliveries: (\d+) of (\d+), errors 0", run.stdout)
    assert delivered is not None, run.stdout
    assert delivered[1] == delivered[2]
    assert int(delivered[1]) > 0
    assert re.search(r"= [\d.]+ us per delivery", run.stdout), run.stdout
