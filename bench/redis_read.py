"""CPU of the auth service's fast-path read (``RedisStore.get_account``, one HGETALL)
with redis-py's pure-Python reply parser against hiredis, side by side in one run.

It is the reason ``redis[hiredis]`` is a dependency. A Redis server is started on a
free loopback port (``tests/support/redis_server.py``), one account is written, then
each parser reads it ``--reads`` times, alternating ``--rounds`` times; the CPU time
of this process per read is printed (min and median over rounds) with the ratio.

Run: ``.venv/bin/python bench/redis_read.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import statistics
import sys
import time
from pathlib import Path

import redis.asyncio as redis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import run_bench, temp_dir  # noqa: E402
from keyrelay.auth.config import parse_encryption_keys  # noqa: E402
from keyrelay.auth.store.crypto import TokenCipher  # noqa: E402
from keyrelay.auth.store.redis_store import RedisStore, StoredTokens  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

PARSERS: dict[str, type] = {"pure Python": _AsyncRESP2Parser, "hiredis": _AsyncHiredisParser}
KEYS = "k1:" + base64.b64encode(b"\x07" * 32).decode()


async def cpu_per_read(url: str, parser: type, reads: int) -> float:
    client = redis.Redis.from_url(url, protocol=2, parser_class=parser)
    store = RedisStore(client, TokenCipher(parse_encryption_keys(KEYS, "bench")), prefix="b:")
    try:
        for _ in range(200):  # warm-up: connection, script cache
            await store.get_account("acct")
        started = time.process_time()
        for _ in range(reads):
            await store.get_account("acct")
        return (time.process_time() - started) / reads * 1e6
    finally:
        await store.close()


async def measure(url: str, reads: int, rounds: int) -> dict[str, list[float]]:
    writer = RedisStore(
        redis.Redis.from_url(url), TokenCipher(parse_encryption_keys(KEYS, "bench")), prefix="b:"
    )
    now = time.time()
    await writer.connect(
        "acct",
        provider="bench",
        scopes=("openid", "offline_access"),
        tokens=StoredTokens("a" * 40, "r" * 40),
        token_type="Bearer",
        expires_at=now + 3600,
        now=now,
    )
    await writer.close()
    results: dict[str, list[float]] = {name: [] for name in PARSERS}
    for _ in range(rounds):
        for name, parser in PARSERS.items():
            results[name].append(await cpu_per_read(url, parser, reads))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="300 reads, 2 rounds")
    args = parser.parse_args(argv)
    reads, rounds = (300, 2) if args.quick else (args.reads, args.rounds)

    def run(stack: contextlib.ExitStack) -> None:
        server = RedisServer(temp_dir(stack, "keyrelay-bench-redis-"))
        stack.callback(server.stop)
        server.start()
        results = asyncio.run(measure(server.url, reads, rounds))
        print(f"RedisStore.get_account (HGETALL + record), {reads} reads x {rounds} rounds:")
        for name, values in results.items():
            print(
                f"  {name:>12}: min {min(values):6.0f} us CPU/read, "
                f"median {statistics.median(values):6.0f}"
            )
        base, fast = (statistics.median(v) for v in results.values())
        print(f"  hiredis / pure Python: {fast / base:.2f}x")

    return run_bench(run)


if __name__ == "__main__":
    sys.exit(main())
