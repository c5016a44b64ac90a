"""What limits and pools cost a request: the same route with and without them, side by side.

One ``keyrelay gateway serve`` with three routes to the fast fake upstream
(``bench/fast_upstream.py``): ``plain`` (one API key, no limits); ``limited``
with requests/min, tokens/min and concurrent requests all set (high enough never
to refuse), counted in a real Redis on loopback as the gateway's ACL user
(tickets and batched usage: ``gateway/limits_store.py``); and ``pool of 3``, a
key naming a pool of three API keys (affinity: each request's session is a
checksum of its body, then the members are ranked). The load generator, the
measurement windows and the rounds in which the routes take turns are
``bench/gateway.py``'s. Printed: non-stream req/s and req/s per gateway core at
c=32, p50 at c=1, and the targets of issue 11 (limited >= 0.8x per core, and at
most +0.2 ms p50 at c=1) and issue 12 (choosing a member adds at most 10 us of
gateway CPU per request: the difference of CPU per request, pool vs plain, at
c=32).

Run from the repository root::

    .venv/bin/python bench/gateway_limits.py            # ~30 s
    .venv/bin/python bench/gateway_limits.py --quick    # smoke run
    .venv/bin/python bench/gateway_limits.py --redis-py # + a row for the store of
        # f556203 on redis-py's client, in a second gateway process (same config)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    add_window_args,
    fmt_ms,
    mark,
    resolve_window_args,
    run_bench,
    table,
    temp_dir,
)
from bench.gateway import (  # noqa: E402
    API_KEY_ENV,
    HIGH_CONCURRENCY,
    Bench,
    LoadGenerator,
    Result,
    Route,
    Target,
    _spawn,
    client_headers,
    gateway_config,
    interleaved,
    interleaved_rounds,
    merged,
    start_upstream,
    wait_serving,
)
from bench.limits_store import redis_py_store_module  # noqa: E402
from keyrelay import cli  # noqa: E402
from keyrelay.gateway.http import app  # noqa: E402
from keyrelay.gateway.keys import new_key  # noqa: E402
from tests.support.redis_server import RedisServer, free_port, gateway_user  # noqa: E402

PREFIX = "bench:"
RATIO_TARGET = 0.8  # limited req/s per core at c=32 / the same route without limits
ADDED_P50_TARGET_MS = 0.2  # limited p50 at c=1 minus the route's without limits
POOL_ADDED_US_TARGET = 10.0  # issue 12: choosing a member, gateway CPU per request
# Set, so every check and counter runs, and never reached.
LIMITS = {
    "requests_per_minute": 10**9,
    "tokens_per_minute": 10**12,
    "concurrent_requests": 10**6,
}


def serve_with_redis_py_store(config: str) -> int:
    """``keyrelay gateway serve`` whose limits store is f556203's (redis-py's client)."""
    setattr(app, "LimitsStore", redis_py_store_module().LimitsStore)  # noqa: B010
    return cli.main(["gateway", "serve", "--config", config])


POOL_MEMBERS = 3


def name_pool(key: dict[str, Any]) -> None:
    """Turns a ``[[keys]]`` entry of ``gateway_config`` into a key of pool ``bench``:
    ``POOL_MEMBERS`` API-key members (the same fast upstream), affinity (every
    request computes its session from the body and ranks the members). The pool
    goes in with ``pools_config``; the members' keys are ``member_env``'s."""
    del key["mode"], key["api_key"]
    key["pool"] = "bench"


def pools_config() -> dict[str, Any]:
    members = [
        {"name": f"member-{i}", "api_key": {"env": f"{API_KEY_ENV}_{i}"}}
        for i in range(POOL_MEMBERS)
    ]
    return {"bench": {"members": members}}


def member_env() -> dict[str, str]:
    """The upstream API keys of the plain route and of the pool's members."""
    env = {API_KEY_ENV: "sk-bench-" + "0" * 32}
    env.update({f"{API_KEY_ENV}_{i}": f"sk-bench-{i}-" + "0" * 30 for i in range(POOL_MEMBERS)})
    return env


def limits_store(data: dict[str, Any], tmp: Path, redis_url: str) -> None:
    """``[gateway.limits]`` on ``redis_url`` (in a secret file), and the pools, which
    need it."""
    url_file = tmp / "limits-url"
    url_file.write_text(redis_url + "\n")
    url_file.chmod(0o600)
    data["gateway"]["limits"] = {"redis_url": {"file": str(url_file)}, "key_prefix": PREFIX}
    if any("pool" in key for key in data["keys"]):
        data["pools"] = pools_config()


def start_limited_gateway(
    stack: contextlib.ExitStack,
    tmp: Path,
    upstream_url: str,
    redis_url: str,
    *,
    redis_py: bool = False,
) -> tuple[Target, ...]:
    plain, limited = Route("plain", new_key()), Route("limited", new_key())
    pooled = Route("pooled", new_key())
    port = free_port()
    routes = [plain, limited] if redis_py else [plain, limited, pooled]
    data = gateway_config(upstream_url, port, routes)
    data["keys"][1]["limits"] = LIMITS
    if not redis_py:
        name_pool(data["keys"][2])
    limits_store(data, tmp, redis_url)
    name = "gateway-redis-py" if redis_py else "gateway"
    config = tmp / f"{name}.toml"
    config.write_bytes(tomli_w.dumps(data).encode())
    env = {**os.environ, **member_env()}
    argv = [sys.executable, "-m", "keyrelay", "gateway", "serve", "--config", str(config)]
    if redis_py:
        argv = [sys.executable, __file__, "--serve-redis-py", str(config)]
    gateway = _spawn(stack, name, argv, tmp / f"{name}.log", stdout=subprocess.DEVNULL, env=env)
    url = wait_serving(gateway, port)
    suffix = " (redis-py)" if redis_py else ""
    targets = [
        Target(f"no limits{suffix}", url, client_headers(plain.key), gateway),
        Target(f"limited{suffix}", url, client_headers(limited.key), gateway),
    ]
    if not redis_py:
        targets.append(Target("pool of 3", url, client_headers(pooled.key), gateway))
    return tuple(targets)


def print_rows(low: Sequence[Result], high: Sequence[Result]) -> None:
    rows = []
    for at_1, at_32 in zip(low, high, strict=True):
        per_core = at_32.per_core
        rows.append(
            [
                at_1.path.label,
                fmt_ms(at_1.p(50)),
                fmt_ms(at_1.p(99)),
                f"{at_32.rate:.0f}",
                "-" if per_core is None else f"{per_core:.0f}",
                fmt_ms(at_32.p(50)),
                str(at_1.errors + at_32.errors),
            ]
        )
    print(
        table(
            ["route", "p50 c=1", "p99 c=1", "req/s c=32", "req/s/core c=32", "p50 c=32", "errors"],
            rows,
        )
    )
    (plain_1, limited_1, *_), (plain_32, limited_32, *_) = low, high
    added = limited_1.p(50) - plain_1.p(50)
    print(
        f"\n{mark(added <= ADDED_P50_TARGET_MS)} limited: p50 added at c=1 "
        f"<= {ADDED_P50_TARGET_MS} ms: {added:+.3f} ms "
        f"({fmt_ms(limited_1.p(50))} vs {fmt_ms(plain_1.p(50))} ms)"
    )
    limited_core, plain_core = limited_32.per_core, plain_32.per_core
    if limited_core and plain_core:
        share = limited_core / plain_core
        print(
            f"{mark(share >= RATIO_TARGET)} limited: non-stream req/s per gateway core at "
            f"c={HIGH_CONCURRENCY} >= {RATIO_TARGET}x without limits: {share:.2f}x "
            f"({limited_core:.0f} vs {plain_core:.0f}; req/s {limited_32.rate:.0f} vs "
            f"{plain_32.rate:.0f})"
        )
    pool_core = high[2].per_core
    if pool_core and plain_core:
        added_us = (1 / pool_core - 1 / plain_core) * 1e6
        print(
            f"{mark(added_us <= POOL_ADDED_US_TARGET)} pool of 3 (affinity): gateway CPU added "
            f"per request at c={HIGH_CONCURRENCY} <= {POOL_ADDED_US_TARGET:g} us: "
            f"{added_us:+.1f} us ({1e6 / pool_core:.1f} vs {1e6 / plain_core:.1f} us a request)"
        )


def print_pool_rounds(plain: Sequence[Result], pool: Sequence[Result], concurrency: int) -> None:
    """The pool's added CPU per request round by round: each round's pool window
    against the plain window just before it. Gateway CPU per request at c=32 moves
    by several us between windows of one route (how many requests each event-loop
    turn batches depends on the load generator and the upstream sharing the
    machine), so the median of the paired differences is the steadier figure."""
    added = []
    for plain_round, pool_round in zip(plain, pool, strict=True):
        plain_us, pool_us = (
            plain_round.cpu_us(plain_round.completed),
            pool_round.cpu_us(pool_round.completed),
        )
        if plain_us is not None and pool_us is not None:
            added.append(pool_us - plain_us)
    if not added:
        return
    middle = statistics.median(added)
    print(
        f"{mark(middle <= POOL_ADDED_US_TARGET)} pool of 3 (affinity), paired rounds at "
        f"c={concurrency}: median {middle:+.1f} us a request over {len(added)} rounds "
        f"({', '.join(f'{a:+.1f}' for a in added)})"
    )


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    tmp = temp_dir(stack, "keyrelay-bench-limits-")
    password = new_key()
    redis = RedisServer(
        tmp / "redis",
        extra_args=("--appendonly", "no"),
        acl_user=gateway_user(PREFIX, password),
    ).start()
    stack.callback(redis.stop)
    load = LoadGenerator(args.load_procs)
    stack.callback(load.stop)
    upstream, upstream_url = start_upstream(stack, tmp, 4096)
    paths = list(start_limited_gateway(stack, tmp, upstream_url, redis.acl_url))
    if args.redis_py:
        paths += start_limited_gateway(stack, tmp, upstream_url, redis.acl_url, redis_py=True)[1:2]
    gateway = paths[0].proxy
    assert gateway is not None
    bench = Bench(load, gateway, upstream, args)
    print(
        f"gateway limits benchmark: {os.cpu_count()} cpu(s); window {args.seconds:g} s after "
        f"{args.warmup:g} s warm-up in {args.rounds} round(s), the routes taking turns; "
        f"redis-server on loopback (the gateway's ACL user)",
        flush=True,
    )
    low = interleaved(paths, args.rounds, lambda p: bench.measure(p, stream=False, concurrency=1))
    high_rounds = interleaved_rounds(
        paths,
        args.rounds,
        lambda p: bench.measure(p, stream=False, concurrency=HIGH_CONCURRENCY),
    )
    print_rows(low, [merged(rounds) for rounds in high_rounds])
    if len(high_rounds) > 2:
        print_pool_rounds(high_rounds[0], high_rounds[2], HIGH_CONCURRENCY)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_window_args(parser, quick_help="smoke run: short windows")
    parser.add_argument("--load-procs", type=int, default=1, help="load-generator processes (1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (3; --quick 1)")
    parser.add_argument(
        "--redis-py",
        action="store_true",
        help="also the limited route through f556203's store (redis-py's client)",
    )
    parser.add_argument("--serve-redis-py", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_redis_py:
        return serve_with_redis_py_store(args.serve_redis_py)
    resolve_window_args(parser, args)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return run_bench(lambda stack: run(args, stack))


if __name__ == "__main__":
    sys.exit(main())
