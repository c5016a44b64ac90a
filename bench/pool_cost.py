"""What choosing a credential-pool member costs the gateway per request: CPU time and
instructions, the same requests with and without a pool, side by side in one run.

One gateway config, two keys: ``plain`` (one API key) and ``pooled`` (a pool of
three API-key members, affinity: each request's session is a checksum of its
system prompt and first message; every request here has the same body, so it is
one session whose order of members the app ranks once and then finds in its
cache, as for a session that asks again and again), both to the fast fake upstream
(``bench/fast_upstream.py``), with a real ``redis-server`` on loopback as the
limits store that pools need (cool-downs; the gateway's ACL user). The app is
built as ``keyrelay gateway serve`` builds it: ``load_gateway_config``,
``configure_logging``, ``build_app`` with an ``access_writer`` (a ``LineWriter``
flushed every 0.1 s, here to a file rather than stderr), so the access line of
every request is made and written as in production, the pooled route's two
extra fields (``member``, ``pool_retries``) included. There is no HTTP server:
requests go straight to the app's ASGI callable with a fake receive and send,
so what is measured is the gateway's own work (routing, transforms, the
upstream client, usage, metrics, the access line), not uvicorn's.

1. CPU time: in this process, ``--rounds`` rounds in which each key sends
   ``--requests`` requests in turn (plain then pooled, then pooled then plain,
   ...), after ``--warmup`` requests of each; ``time.process_time()`` per request
   of each round, its min and median per route, and pooled - plain. Noisy on a
   shared machine: the rounds show how much.
2. Instructions (``valgrind --tool=callgrind``): the same harness in three child
   processes at once, each with the same ``--warmup`` requests of both keys
   first, then ``--callgrind-requests`` N plain requests, N pooled, or N/2 plain.
   The whole process is counted (start-up and warm-up included): those are the
   same in every run and cancel out in the differences, so a plain request costs
   (plain N - plain N/2) / (N/2) instructions and choosing a member adds
   (pooled N - plain N) / N, also as a fraction of a plain request. This is the
   number to compare two versions of the code with: the machine's speed and
   load do not change it, only I/O timing does a little (whether a read finds
   the upstream's answer already there or waits for it): runs of the same code
   agree within ~0.7 million instructions, ~150 a request at N = 5000. So that
   they do, what runs by the clock rather than per request is left out of these
   runs (see ``child_run``): the cool-down poll is stopped and the access lines
   are flushed by size only, not every 0.1 s. The three children import the
   code when they start: it must not change while they do.

The target is issue 12's: choosing a member adds at most 10 us of gateway CPU per
request. It is printed with PASS/MISS for the CPU times (the median of the
differences of rounds run back to back) and for the
instructions converted at this machine's CPU time per plain request; nothing is
asserted.

Run from the repository root::

    .venv/bin/python bench/pool_cost.py                  # ~1.5 min on 2 CPUs (callgrind)
    .venv/bin/python bench/pool_cost.py --no-callgrind   # CPU times only, ~10 s
    .venv/bin/python bench/pool_cost.py --quick          # smoke run (--no-callgrind: ~2 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import mark, run_bench, table, temp_dir  # noqa: E402
from bench.gateway import (  # noqa: E402
    Route,
    Service,
    _spawn,
    gateway_config,
    request_body,
    start_upstream,
)
from bench.gateway_limits import (  # noqa: E402
    POOL_ADDED_US_TARGET,
    PREFIX,
    limits_store,
    member_env,
    name_pool,
)
from keyrelay.gateway.config import load_gateway_config  # noqa: E402
from keyrelay.gateway.http.app import GatewayApp, Message  # noqa: E402
from keyrelay.gateway.keys import new_key  # noqa: E402
from keyrelay.gateway.server import build_app  # noqa: E402
from keyrelay.logs import LineWriter, configure_logging  # noqa: E402
from tests.support.redis_server import RedisServer, gateway_user  # noqa: E402

PLAIN, POOLED = "plain", "pooled"  # the routes, also the names of their keys
ROUTES = (PLAIN, POOLED)
PATH = "/v1/messages"
KEY_ENV = {PLAIN: "KR_BENCH_PLAIN_KEY", POOLED: "KR_BENCH_POOLED_KEY"}  # the gateway keys
ACCESS_FLUSH_SECONDS = 0.1  # the LineWriter interval of `keyrelay gateway serve`
CHILD_FLUSH_SECONDS = 1e6  # under callgrind: flushed by size only (see child_run)

# (requests a round, rounds, warm-up requests per key, callgrind requests): full, --quick
REQUESTS = (3000, 300)
ROUNDS = (6, 2)
WARMUP = (300, 100)
CALLGRIND_REQUESTS = (5000, 200)


# -- the set-up: one config, files and environment a child process can load too ---------


@dataclass(frozen=True)
class Setup:
    config: Path  # the gateway's TOML
    env: dict[str, str]  # the upstream API keys the config names, and the two gateway keys


def write_setup(tmp: Path, upstream_url: str, redis_url: str) -> Setup:
    """The gateway config of both keys: ``plain`` with one API key, ``pooled`` naming a
    pool of ``POOL_MEMBERS`` API-key members (affinity, the default strategy)."""
    keys = {route: new_key() for route in ROUTES}
    data = gateway_config(upstream_url, 0, [Route(route, keys[route]) for route in ROUTES])
    name_pool(data["keys"][1])
    limits_store(data, tmp, redis_url)
    config = tmp / "gateway.toml"
    config.write_bytes(tomli_w.dumps(data).encode())
    env = member_env()
    env.update({KEY_ENV[route]: keys[route] for route in ROUTES})
    return Setup(config, env)


# -- the harness: a GatewayApp as the server builds it, requests straight to its ASGI -----


class FakeClient:
    """One request's ASGI ``receive`` and ``send``: the whole body at once, then, as a
    client that stays connected, nothing (the gateway's disconnect watcher waits on
    ``idle`` until it is cancelled at the end of the request)."""

    __slots__ = ("_body", "_idle", "status")

    def __init__(self, body: bytes, idle: asyncio.Event) -> None:
        self._body: bytes | None = body
        self._idle = idle
        self.status = 0

    async def receive(self) -> Message:
        body, self._body = self._body, None
        if body is not None:
            return {"type": "http.request", "body": body, "more_body": False}
        await self._idle.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


class Harness:
    """``keyrelay gateway serve``'s app (``load_gateway_config``, ``configure_logging``,
    ``build_app`` with an access writer) without its HTTP server. ``access``: the file
    its access lines go to, as the server's go to stderr, flushed at the latest
    ``flush_seconds`` after the first unwritten line (the server's 0.1 s by default)."""

    def __init__(
        self, setup: Setup, access: Path, flush_seconds: float = ACCESS_FLUSH_SECONDS
    ) -> None:
        config = load_gateway_config(str(setup.config), setup.env)
        configure_logging(config.log_level)
        self._access = open(access, "wb")  # noqa: SIM115 -- closed by stop()
        self._writer = LineWriter(self._access, interval=flush_seconds)
        self.app: GatewayApp = build_app(config, access_writer=self._writer)
        self._body = request_body(stream=False)
        self._idle = asyncio.Event()  # never set: clients stay until the request ends
        self._scopes = {route: self._scope(setup.env[KEY_ENV[route]]) for route in ROUTES}

    def _scope(self, key: str) -> dict[str, Any]:
        headers = [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"anthropic-version", b"2023-06-01"),
            (b"x-api-key", key.encode()),
            (b"content-length", str(len(self._body)).encode()),
        ]
        return {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": PATH,
            "raw_path": PATH.encode(),
            "query_string": b"",
            "headers": headers,
        }

    async def start(self) -> None:
        await self.app.startup()

    async def stop(self) -> None:
        try:
            await self.app.shutdown()  # (flushes the access writer)
        finally:
            self._access.close()

    async def run(self, route: str, requests: int) -> None:
        """``requests`` requests of ``route``'s key, one after the other; each must be
        answered 200."""
        scope, app, body, idle = self._scopes[route], self.app, self._body, self._idle
        for _ in range(requests):
            client = FakeClient(body, idle)
            await app(scope, client.receive, client.send)
            if client.status != 200:
                raise RuntimeError(f"{route}: the gateway answered {client.status}, not 200")

    async def warm_up(self, requests: int) -> None:
        for route in ROUTES:
            await self.run(route, requests)


async def cpu_per_request(
    setup: Setup, access: Path, requests: int, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Per route, the CPU time of this process per request (us) of each round."""
    harness = Harness(setup, access)
    await harness.start()
    try:
        await harness.warm_up(warmup)
        times: dict[str, list[float]] = {route: [] for route in ROUTES}
        for i in range(rounds):
            for route in ROUTES if i % 2 == 0 else ROUTES[::-1]:
                started = time.process_time()
                await harness.run(route, requests)
                times[route].append((time.process_time() - started) / requests * 1e6)
        return times
    finally:
        await harness.stop()


async def child_run(setup: Setup, access: Path, route: str, requests: int, warmup: int) -> None:
    """What callgrind counts: the warm-up of both keys, then ``requests`` of ``route``.

    Without the work that runs by the clock, whose amount would depend on how long
    the run takes under valgrind (so on the machine's load), not on the requests:
    the access lines are written by size only (64 KiB, as under load: at thousands
    of requests a second the server's 0.1 s comes later), and the cool-down poll
    (4 a second, ~100k instructions each; no request waits for it) is stopped before
    its first. Nothing a request does depends on either: no member ever cools here."""
    harness = Harness(setup, access, flush_seconds=CHILD_FLUSH_SECONDS)
    await harness.start()
    try:
        cooldowns = harness.app.cooldowns
        if cooldowns is not None:
            await cooldowns.close()  # (shutdown closes it again: a no-op)
        await harness.warm_up(warmup)
        await harness.run(route, requests)
    finally:
        await harness.stop()


def check_access_log(access: Path, expected: Mapping[str, int]) -> str:
    """Every request made one access line, 200, naming its route; a pooled one its
    member (and pool_retries 0), a plain one none. Returns what served the pool."""
    lines: Counter[str] = Counter()
    members: Counter[str] = Counter()
    with open(access, "rb") as f:
        for raw in f:
            entry = json.loads(raw)
            route = entry.get("route")
            lines[route] += 1
            if entry.get("status") != 200:
                raise RuntimeError(f"access line not 200: {raw!r}")
            if (route == POOLED) != ("member" in entry):
                raise RuntimeError(f"{route} request with member {entry.get('member')!r}")
            if route == POOLED:
                members[entry["member"]] += 1
                if entry.get("pool_retries") != 0:
                    raise RuntimeError(f"a pooled request was retried: {raw!r}")
    if dict(lines) != dict(expected):
        raise RuntimeError(f"access lines per route {dict(lines)}, expected {dict(expected)}")
    return ", ".join(f"{member} {count}" for member, count in sorted(members.items()))


# -- callgrind: the harness in child processes, instructions counted -----------------------


@dataclass(frozen=True)
class CallgrindRun:
    route: str
    requests: int  # measured, after the warm-up of both keys
    instructions: int  # of the whole process
    seconds: float  # wall time, under valgrind


def start_callgrind(
    stack: contextlib.ExitStack,
    valgrind: str,
    tmp: Path,
    setup: Setup,
    route: str,
    requests: int,
    warmup: int,
) -> tuple[Service, Path]:
    """This script as a ``--child`` under callgrind; returns it and its output file."""
    label = f"callgrind {route} {requests}"
    name = label.replace(" ", "-")
    out = tmp / f"{name}.out"
    argv = [
        valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        route,
        "--config",
        str(setup.config),
        "--access",
        str(tmp / f"access-{name}.jsonl"),
        "--requests",
        str(requests),
        "--warmup",
        str(warmup),
    ]
    # The same hash seed in every run: dict and set layouts, so instruction counts, repeat.
    env = {**os.environ, **setup.env, "PYTHONHASHSEED": "0"}
    child = _spawn(stack, label, argv, tmp / f"{name}.log", stdout=subprocess.DEVNULL, env=env)
    return child, out


def callgrind_runs(
    stack: contextlib.ExitStack,
    valgrind: str,
    tmp: Path,
    setup: Setup,
    runs: Sequence[tuple[str, int]],
    warmup: int,
) -> list[CallgrindRun]:
    """The ``runs`` ((route, requests) each) at once, each in a process of its own:
    instruction counts do not depend on how many share the CPUs."""
    started = time.monotonic()
    children = [
        start_callgrind(stack, valgrind, tmp, setup, route, requests, warmup)
        for route, requests in runs
    ]
    done: dict[int, CallgrindRun] = {}
    while len(done) < len(children):
        time.sleep(0.2)
        for i, (child, out) in enumerate(children):
            if i in done or child.process.poll() is None:
                continue
            if child.process.returncode != 0:
                raise RuntimeError(
                    f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}"
                )
            route, requests = runs[i]
            seconds = time.monotonic() - started
            done[i] = CallgrindRun(route, requests, callgrind_total(out), seconds)
            print(f"  {child.name}: done after {seconds:.0f} s", flush=True)
    return [done[i] for i in range(len(children))]


def callgrind_total(out: Path) -> int:
    """The instructions (Ir) of a callgrind output file: its ``summary:`` line."""
    with open(out, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no summary line in {out}")


# -- output ---------------------------------------------------------------------------------


def print_cpu(times: Mapping[str, Sequence[float]], requests: int) -> tuple[float, float]:
    """The CPU rows; returns the plain route's min and pooled - plain (the median of
    the rounds' differences)."""
    rows = [
        [
            route,
            " ".join(f"{t:.1f}" for t in times[route]),
            f"{min(times[route]):.1f}",
            f"{statistics.median(times[route]):.1f}",
        ]
        for route in ROUTES
    ]
    print(f"\nCPU time of this process per request, us ({requests} requests a round):")
    print(table(["route", "rounds", "min", "median"], rows))
    plain, pooled = times[PLAIN], times[POOLED]
    added_min = min(pooled) - min(plain)
    added_median = statistics.median(pooled) - statistics.median(plain)
    # Round i of each key ran back to back: their difference shares the machine's
    # state of the moment, so the median of those is the steadiest figure.
    paired = statistics.median(p - q for p, q in zip(pooled, plain, strict=True))
    print(
        f"pooled - plain: {paired:+.1f} us (median of the rounds' differences), "
        f"{added_min:+.1f} us (min - min), {added_median:+.1f} us (medians)"
    )
    return min(plain), paired


def print_callgrind(runs: Sequence[CallgrindRun]) -> tuple[float, float]:
    """The callgrind rows; returns instructions per plain request and added per pooled."""
    rows = [[r.route, str(r.requests), f"{r.instructions:,}", f"{r.seconds:.0f}"] for r in runs]
    print("\nInstructions (callgrind, whole process: start-up, warm-up of both keys, requests):")
    print(table(["route", "requests", "instructions", "wall s"], rows))
    plain, pooled, fewer = runs
    per_plain = (plain.instructions - fewer.instructions) / (plain.requests - fewer.requests)
    added = (pooled.instructions - plain.instructions) / plain.requests
    print(
        f"plain request: {per_plain:,.0f} instructions (slope, {plain.requests} vs "
        f"{fewer.requests} requests)"
    )
    print(
        f"pooled - plain: {added:+,.0f} instructions a request "
        f"({added / per_plain:+.1%} of a plain request)"
    )
    return per_plain, added


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    tmp = temp_dir(stack, "keyrelay-bench-pool-")
    password = new_key()
    redis = RedisServer(
        tmp / "redis",
        extra_args=("--appendonly", "no"),
        acl_user=gateway_user(PREFIX, password),
    )
    stack.callback(redis.stop)
    redis.start()
    _, upstream_url = start_upstream(stack, tmp, 4096)
    setup = write_setup(tmp, upstream_url, redis.acl_url)
    print(
        f"pool cost benchmark: {os.cpu_count()} cpu(s); GatewayApp in this process (ASGI, "
        f"no HTTP server), fast upstream and redis-server on loopback; {args.warmup} "
        f"warm-up requests per key, then {args.rounds} rounds of {args.requests} requests "
        "per key, the keys taking turns",
        flush=True,
    )
    access = tmp / "access.jsonl"
    times = uvloop.run(cpu_per_request(setup, access, args.requests, args.rounds, args.warmup))
    sent = args.warmup + args.rounds * args.requests
    served = check_access_log(access, dict.fromkeys(ROUTES, sent))
    plain_us, added_us = print_cpu(times, args.requests)
    print(f"(every request 200 and one access line; the pool served by: {served})")

    instructions: tuple[float, float] | None = None
    valgrind = shutil.which("valgrind")
    if args.no_callgrind or valgrind is None:
        why = "--no-callgrind" if args.no_callgrind else "no valgrind on PATH"
        print(f"\ninstructions: skipped ({why})")
    else:
        n = args.callgrind_requests
        print(
            f"\ncallgrind: the same harness in 3 child processes at once, each {args.warmup} "
            f"warm-up requests per key, then {n} plain, {n} pooled or {n // 2} plain...",
            flush=True,
        )
        runs = callgrind_runs(
            stack, valgrind, tmp, setup, [(PLAIN, n), (POOLED, n), (PLAIN, n // 2)], args.warmup
        )
        instructions = print_callgrind(runs)

    print(
        f"\nTarget (issue 12): choosing a member adds <= {POOL_ADDED_US_TARGET:g} us of "
        "gateway CPU per request"
    )
    print(
        f"{mark(added_us <= POOL_ADDED_US_TARGET)} CPU time: {added_us:+.1f} us per request "
        f"(median of the rounds' differences; plain {plain_us:.1f} us at its min)"
    )
    if instructions is not None:
        per_plain, added = instructions
        estimate = added / per_plain * plain_us
        print(
            f"{mark(estimate <= POOL_ADDED_US_TARGET)} instructions: {added:+,.0f} per request, "
            f"{added / per_plain:+.1%} of a plain request = {estimate:+.1f} us at this run's "
            f"{plain_us:.1f} us per plain request"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few requests")
    parser.add_argument(
        "--requests", type=int, default=None, help=f"requests per key a round ({REQUESTS[0]})"
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds ({ROUNDS[0]})")
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"warm-up requests per key ({WARMUP[0]})"
    )
    parser.add_argument(
        "--callgrind-requests",
        type=int,
        default=None,
        help=f"N of the callgrind runs ({CALLGRIND_REQUESTS[0]})",
    )
    parser.add_argument(
        "--no-callgrind", action="store_true", help="CPU times only (callgrind takes minutes)"
    )
    # A callgrind run: this harness alone, on the parent's config and environment.
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--access", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = int(args.quick)
    for name, defaults in (
        ("requests", REQUESTS),
        ("rounds", ROUNDS),
        ("warmup", WARMUP),
        ("callgrind_requests", CALLGRIND_REQUESTS),
    ):
        if getattr(args, name) is None:
            setattr(args, name, defaults[quick])
    if args.requests < 1 or args.rounds < 1 or args.warmup < 0 or args.callgrind_requests < 2:
        parser.error(
            "--requests and --rounds must be >= 1, --warmup >= 0, --callgrind-requests >= 2"
        )
    if args.child and (args.config is None or args.access is None):
        parser.error("--child needs --config and --access")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        setup = Setup(args.config, dict(os.environ))
        uvloop.run(child_run(setup, args.access, args.child, args.requests, args.warmup))
        return 0
    return run_bench(lambda stack: run(args, stack))


if __name__ == "__main__":
    sys.exit(main())
