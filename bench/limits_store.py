"""Latency of the shared limits counters (``gateway.limits_store``), and the algorithms
considered for requests/min, side by side in one run.

A Redis server is started on a free loopback port (``tests/support/redis_server.py``,
AOF off: a production Redis does not fsync each write either). Printed:

1. per-call latency p50/p99, calls/s and this process's CPU per call at c=1 and
   c=32, on uvloop (the gateway's loop), of ``admit`` (key + account, every limit
   set, always admitted) and ``admit + finish`` (what a limited request costs),
   through the store's own client (``gateway/resp_client.py``) and, in the same
   run, through the store of f556203 on redis-py's asyncio client (a pool of 64
   connections; its source read with ``git show``); then a bare PING (redis-py)
   and ``admit`` of a key with only requests/min under each algorithm: the fixed
   window (what the store does), GCRA and a sliding log (both only here, as Lua
   scripts of the same shape);
2. what each algorithm admits, in virtual time, for a 60/min key: 300 requests
   at once; then 300 at 0.5 s before a minute's end and 300 at 0.5 s after it.

Run: ``.venv/bin/python bench/limits_store.py`` (``--quick`` for a smoke run).
CPU per call is ``time.process_time()`` over the calls: steadier than wall time
on a shared machine (redis-server's own CPU is not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis
import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import fmt_ms, percentile, run_bench, table, temp_dir  # noqa: E402
from keyrelay.gateway import limits_store  # noqa: E402
from keyrelay.gateway.core.ratelimit import Subject  # noqa: E402
from keyrelay.gateway.core.usage import Usage  # noqa: E402
from keyrelay.gateway.limits_store import LimitsStore  # noqa: E402
from keyrelay.limit_rules import Budget, BudgetUnit, Limits, Period  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

# The last store on redis-py's asyncio client, compared in the same run.
REDIS_PY_COMMIT = "f556203"


def redis_py_store_module() -> types.ModuleType:
    """``gateway/limits_store.py`` as of REDIS_PY_COMMIT (redis-py's client), loaded
    from git; it raises this tree's ``LimitsUnavailable`` (the gateway catches that)."""
    path = "services/keyrelay/gateway/limits_store.py"
    source = subprocess.run(
        ["git", "show", f"{REDIS_PY_COMMIT}:{path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("keyrelay_limits_store_redis_py")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{REDIS_PY_COMMIT}:{path}", "exec"), module.__dict__)
    module.LimitsUnavailable = limits_store.LimitsUnavailable  # type: ignore[attr-defined]
    return module


# KEYS: [1] the theoretical arrival time (TAT).  ARGV: [1] now (ms), [2] emission
# interval (ms), [3] burst tolerance (ms). Returns {admitted, ms to wait}.
GCRA = """
local now, interval, tau = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
if now < tat - tau then return {0, tat - tau - now} end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now) + 1000)
return {1, 0}
"""

# KEYS: [1] the log (zset of request ids by time).  ARGV: [1] now (ms), [2] limit,
# [3] request id. Returns {admitted, ms to wait}.
SLIDING_LOG = """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + 60000 - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], 60000)
return {1, 0}
"""

Admit = Callable[[str, int, float], Awaitable[bool]]  # (key id, limit per minute, now)


class Algorithms:
    """One admission per call for a key with only requests/min, per algorithm."""

    def __init__(self, client: redis.Redis, store: LimitsStore) -> None:
        self._gcra = client.register_script(GCRA)
        self._log = client.register_script(SLIDING_LOG)
        self._store = store

    async def fixed_window(self, key: str, limit: int, now: float) -> bool:
        subject = Subject("key", key, Limits(requests_per_minute=limit))
        return (await self._store.admit([subject], now)).decision.admitted

    async def gcra(self, key: str, limit: int, now: float) -> bool:
        interval = 60_000 / limit
        reply = await self._gcra(
            keys=[f"bench:gcra:{key}"], args=[int(now * 1000), interval, interval * (limit - 1)]
        )
        return bool(reply[0])

    async def sliding_log(self, key: str, limit: int, now: float) -> bool:
        reply = await self._log(
            keys=[f"bench:log:{key}"], args=[int(now * 1000), limit, secrets.token_hex(8)]
        )
        return bool(reply[0])

    def all(self) -> dict[str, Admit]:
        return {
            "fixed window (chosen)": self.fixed_window,
            "GCRA": self.gcra,
            "sliding log": self.sliding_log,
        }


async def latencies(
    call: Callable[[], Awaitable[object]], concurrency: int, calls: int
) -> tuple[list[float], float, float]:
    """Per-call seconds over ``calls`` calls made by ``concurrency`` tasks, calls/s,
    and this process's CPU seconds per call."""
    for _ in range(50):  # warm-up: connections, script cache
        await call()
    found: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await call()
            found.append(time.perf_counter() - started)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    return found, len(found) / (time.perf_counter() - started), cpu / len(found)


def store_cases(name: str, store: Any) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """``admit`` and ``admit + finish`` of a key and its account, every limit set."""
    big = 10**9
    key = Subject(
        "key", "bench-key", Limits(big, big, 10**6, Budget(10**15, BudgetUnit.TOKENS, Period.MONTH))
    )
    subjects = (key, Subject("account", "bench-account", Limits(big, big, 10**6)))

    async def admit() -> None:
        await store.admit(subjects, time.time())

    async def admit_finish() -> None:
        admission = await store.admit(subjects, time.time())
        assert admission.lease is not None
        await store.finish(admission.lease, Usage(100, 50, 10, 5), 0.001, time.time())

    return [(f"admit: {name}", admit), (f"admit + finish: {name}", admit_finish)]


async def measure_latency(url: str, calls: int) -> list[list[str]]:
    store = LimitsStore.from_url(url, prefix="bench:", timeout=5.0)
    old = redis_py_store_module().LimitsStore.from_url(url, prefix="bench:", timeout=5.0)
    client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, max_connections=64))
    algorithms = Algorithms(client, store)
    cases = [
        *store_cases("this store", store),
        *store_cases(f"redis-py ({REDIS_PY_COMMIT})", old),
        ("PING (redis-py)", client.ping),
    ]
    for name, algorithm in algorithms.all().items():
        cases.append((f"admit rpm only: {name}", _bind(algorithm)))
    rows: list[list[str]] = []
    try:
        for concurrency in (1, 32):
            for name, call in cases:
                rows.append(_row(name, concurrency, *await latencies(call, concurrency, calls)))
    finally:
        await store.close()
        await old.close()
        await client.aclose()
    return rows


def _bind(algorithm: Admit) -> Callable[[], Awaitable[bool]]:
    key = f"lat-{secrets.token_hex(4)}"
    return lambda: algorithm(key, 10**9, time.time())


def _row(name: str, concurrency: int, seconds: list[float], rate: float, cpu: float) -> list[str]:
    return [
        name,
        str(concurrency),
        fmt_ms(percentile(seconds, 50) * 1000),
        fmt_ms(percentile(seconds, 99) * 1000),
        f"{rate:,.0f}",
        f"{cpu * 1e6:.0f}",
    ]


async def measure_admitted(url: str) -> list[list[str]]:
    store = LimitsStore.from_url(url, prefix="bench:", timeout=5.0)
    client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, max_connections=64))
    algorithms = Algorithms(client, store)
    minute = (int(time.time()) // 60 + 1) * 60.0
    rows: list[list[str]] = []
    try:
        for name, admit in algorithms.all().items():
            key = f"sem-{secrets.token_hex(4)}"
            burst = await asyncio.gather(*(admit(key, 60, minute + 10) for _ in range(300)))
            edge_key = f"edge-{secrets.token_hex(4)}"
            before = await asyncio.gather(*(admit(edge_key, 60, minute + 59.5) for _ in range(300)))
            after = await asyncio.gather(*(admit(edge_key, 60, minute + 60.5) for _ in range(300)))
            retry_key = f"retry-{secrets.token_hex(4)}"
            # a client refused, retrying every second for the rest of the minute
            retried = 0
            for second in range(60):
                results = await asyncio.gather(
                    *(
                        admit(retry_key, 60, minute + second)
                        for _ in range(300 if second == 0 else 5)
                    )
                )
                retried += sum(results)
            rows.append(
                [
                    name,
                    str(sum(burst)),
                    str(sum(before) + sum(after)),
                    str(retried),
                ]
            )
    finally:
        await store.close()
        await client.aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per case (4000)")
    parser.add_argument("--quick", action="store_true", help="320 calls per case")
    args = parser.parse_args(argv)
    calls = 320 if args.quick else args.calls

    def run(stack: contextlib.ExitStack) -> None:
        server = RedisServer(
            temp_dir(stack, "bench-limits-"), extra_args=("--appendonly", "no")
        ).start()
        stack.callback(server.stop)
        rows = uvloop.run(measure_latency(server.url, calls))
        print(f"per-call latency, {calls} calls per case, redis-server on loopback, uvloop")
        print(table(["call", "c", "p50 ms", "p99 ms", "calls/s", "cpu us/call"], rows))
        print()
        print("admitted for a 60/min key (virtual time)")
        print(
            table(
                [
                    "algorithm",
                    "300 at once",
                    "300+300 across a minute's end",
                    "300, then 5/s for the minute",
                ],
                uvloop.run(measure_admitted(server.url)),
            )
        )

    return run_bench(run)


if __name__ == "__main__":
    sys.exit(main())
