"""What the benchmarks share: CPU accounting from /proc, percentiles, tables, interrupts.

Nothing here asserts or times anything by itself; the benchmarks print numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

SATURATED = 90.0  # % of one core above which a process counts as saturated


# -- CPU accounting from /proc ------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), or None off Linux."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state) of proc(5); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_busy_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine, all cores, or None off Linux."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    hz = os.sysconf("SC_CLK_TCK")
    return (total - ticks[3] - ticks[4]) / hz, total / hz


class HostMeter:
    """% of the whole machine (all cores) busy between `start()` and `stop()`."""

    def __init__(self) -> None:
        self._begin: tuple[float, float] | None = None

    def start(self) -> None:
        self._begin = host_busy_seconds()

    def stop(self) -> float | None:
        end = host_busy_seconds()
        if self._begin is None or end is None or end[1] <= self._begin[1]:
            return None
        return 100.0 * (end[0] - self._begin[0]) / (end[1] - self._begin[1])


class CpuMeter:
    """CPU % of one core used by a set of processes between `start()` and `stop()`."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = list(pids)
        self._begin: list[float | None] = []
        self._wall = 0.0
        self.seconds: float | None = None  # CPU seconds of the last start..stop

    def start(self) -> None:
        self._begin = [cpu_seconds(p) for p in self._pids]
        self._wall = time.monotonic()

    def stop(self) -> float | None:
        wall = time.monotonic() - self._wall
        end = [cpu_seconds(p) for p in self._pids]
        used = 0.0
        self.seconds = None
        for before, after in zip(self._begin, end, strict=True):
            if before is None or after is None:
                return None
            used += after - before
        self.seconds = used
        return 100.0 * used / wall if wall > 0 else None


def set_affinity(pid: int, cpus: Sequence[int]) -> None:
    """Every thread of process ``pid`` on ``cpus``: ``os.sched_setaffinity(pid)`` alone
    moves only its main thread, not those it already started (gRPC's pollers)."""
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for tid in threads:
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(tid, cpus)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


# -- arguments -----------------------------------------------------------------------------

WINDOW_SECONDS = (3.0, 0.5)  # measurement window: full run, --quick
WARMUP_SECONDS = (1.0, 0.2)


def add_window_args(parser: argparse.ArgumentParser, *, quick_help: str) -> None:
    """``--seconds``, ``--warmup`` and ``--quick``; ``resolve_window_args`` fills them in."""
    parser.add_argument(
        "--seconds", type=float, default=None, help=f"measurement window ({WINDOW_SECONDS[0]:g})"
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help=f"warm-up per window ({WARMUP_SECONDS[0]:g})"
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)


def resolve_window_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.seconds is None:
        args.seconds = WINDOW_SECONDS[args.quick]
    if args.warmup is None:
        args.warmup = WARMUP_SECONDS[args.quick]
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")


# -- output --------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fmt_ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def fmt_cpu(value: float | None, procs: int = 1) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.0f}%"
    return text + (" SAT" if value >= SATURATED * procs else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(lines)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt right where the script is.

    Also inside ``asyncio.run``, which otherwise turns Ctrl-C into a cancellation
    that a failing call (the children got the Ctrl-C too) can overtake.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_bench(run: Callable[[contextlib.ExitStack], None]) -> int:
    """Runs a benchmark with every process it starts stopped on exit, Ctrl-C and SIGTERM."""
    with interrupts_raise(), contextlib.ExitStack() as stack:
        try:
            run(stack)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every process started", file=sys.stderr)
            return 130
    return 0


def temp_dir(stack: contextlib.ExitStack, prefix: str) -> Path:
    """A temporary directory removed when ``stack`` closes (Ctrl-C and SIGTERM too)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path
