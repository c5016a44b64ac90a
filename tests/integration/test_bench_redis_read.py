"""``bench/redis_read.py`` runs end to end and prints both parsers; numbers are never checked."""

from __future__ import annotations

from tests.support.bench import run_bench


def test_bench_redis_read_smoke_run_prints_both_parsers() -> None:
    out = run_bench("redis_read.py", "--quick")
    assert "pure Python: min" in out
    assert "hiredis: min" in out
    assert "hiredis / pure Python:" in out
