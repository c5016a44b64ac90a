"""``bench/redis_read.py`` runs end to end and prints both parsers; numbers are never checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_redis_read_smoke_run_prints_both_parsers() -> None:
    run = subprocess.run(
        [sys.executable, "bench/redis_read.py", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "pure Python: min" in run.stdout
    assert "hiredis: min" in run.stdout
    assert "hiredis / pure Python:" in run.stdout
