"""The gateway benchmark runs end to end: upstream, gateway and load processes, every row printed.

Only that it completes and prints its rows; its numbers are never checked (timing
on a shared machine says nothing about correctness).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.bench import run_bench


@pytest.mark.slow
def test_bench_gateway_smoke_run_prints_every_row(tmp_path: Path) -> None:
    out = run_bench(
        "gateway.py",
        *("--quick", "--seconds", "0.2", "--warmup", "0.05", "--stream-client", "chunks"),
        timeout=90,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert "preflight: every path answers" in out
    for label in ("direct", "floor", "floor kr", "gw plain", "gw tools"):
        # one non-stream row per concurrency and one stream row per path
        rows = [line for line in out.splitlines() if re.search(rf"\s{label}\s", line)]
        assert len(rows) >= 3, (label, out)
    for target in (
        "p50 added at concurrency 1",
        "non-stream req/s per gateway core",
        "streaming >= 0.85x direct",
        "gateway CPU per untouched SSE event",
    ):
        assert re.search(rf"\[(PASS|MISS)\] gw plain: .*{re.escape(target)}", out), target
    # The pinned raw-chunk stream row at concurrency 8, the floor's value beside.
    for target in ("pinned stream at c=8 >= 0.85x direct", "pinned stream at c=8: <= 4 us"):
        assert re.search(rf"\[(PASS|MISS)\] gw plain: {re.escape(target)}.*\[[0-9.]+x?\]", out), (
            target
        )
    # The two bare proxies side by side: the measurement behind the upstream client.
    assert re.search(r"non-stream, c=32: [0-9.]+ vs [0-9.]+ us per request", out), out
    assert re.search(r"stream, client reading chunks, c=4: [0-9.]+ vs [0-9.]+ us per event", out)
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone
