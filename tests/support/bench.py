"""Running a ``bench/`` script the way its smoke tests do: from the repository root,
with this interpreter, its output captured; a failed run fails the test with its
stderr. The numbers a script prints are never checked (the machine is shared)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(
    script: str, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> str:
    """``bench/<script>`` with ``args`` (and ``env``, else this process's): its
    stdout, once it exited 0."""
    run = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
