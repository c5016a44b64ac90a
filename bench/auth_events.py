"""Benchmark of ``WatchEvents`` fan-out on one auth replica: 0, 10, 100 and 1,000 subscribers.

Everything runs on loopback in one invocation, each part in its own process as in
production: a Redis server, one ``keyrelay auth serve`` replica, a subscriber process
holding the ``WatchEvents`` streams (spread over ``--channels`` gRPC channels, each a
connection of its own, as gateway processes would be), and the ``GetToken`` load
generator of ``bench/auth_gettoken.py``. For each number of subscribers:

* **Redis connections of the replica**, from ``CLIENT LIST`` (the benchmark's own
  connections are named and left out) — it must not grow with subscribers;
* **the replica's RSS** (``/proc``), to size ``events_max_subscribers``;
* **event delivery latency**: while ``GetToken`` runs, events are written to the
  stream at ``--event-rate`` per second (``RedisStore.record_refresh_failure``, the
  script the service runs); each subscriber notes when each event arrives
  (``CLOCK_MONOTONIC`` is one clock for every process), and the latency from the write
  to every subscriber is printed as p50 / p99, with the p99 of the time until the
  *last* subscriber had an event;
* **GetToken p50 / p99 at concurrency 32** (a fresh token: one HGETALL and a decrypt),
  beside the run with no subscribers; target: p99 <= 1.5x. The whole set runs
  ``--repeat`` times (3), interleaved, and the target is judged on the median p99 of
  each number of subscribers: on a shared 2-core machine one run's ratio at 1,000
  subscribers has ranged from 1.37x to 1.85x.

The account is connected straight in Redis (a token valid for an hour), so no OAuth
server is needed: the provider's URLs point at a closed port and are never called.
The replica runs alone on the first CPU and everything else (Redis, the subscriber
and load processes, this one) on the others (``--no-pin``: anywhere): the subscribers
stand for gateway pods on other machines, and the CPU they spend reading events must
not be counted against the replica. Targets are printed with PASS/MISS; nothing is
asserted (timing on a shared machine is noisy). Every process is stopped and every
temporary directory removed on exit, Ctrl-C and SIGTERM included.

Run from the repository root::

    .venv/bin/python bench/auth_events.py            # full run
    .venv/bin/python bench/auth_events.py --quick    # smoke run, short windows
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import redis as sync_redis
import redis.asyncio as redis
from grpc import aio

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.auth_gettoken import LoadResult, run_load  # noqa: E402
from bench.common import (  # noqa: E402
    add_window_args,
    fmt_cpu,
    fmt_ms,
    mark,
    percentile,
    resolve_window_args,
    run_bench,
    set_affinity,
    table,
    temp_dir,
)
from keyrelay.auth.config import parse_encryption_keys  # noqa: E402
from keyrelay.auth.store.crypto import TokenCipher  # noqa: E402
from keyrelay.auth.store.redis_store import RedisStore, StoredTokens  # noqa: E402
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.stack import (  # noqa: E402
    ENCRYPTION_KEYS,
    PROVIDER,
    ReplicaProcess,
    gateway_md,
    write_replica_configs,
)

SUBSCRIBERS = (0, 10, 100, 1000)
CONCURRENCY = 32
P99_RATIO_TARGET = 1.5
PREFIX = "bench-events:"
ACCOUNT = "bench"
NOISE_ACCOUNT = "noise"  # the events are refresh failures of this one
BENCH_CLIENT = "keyrelay-bench"  # CLIENT SETNAME of the benchmark's own connections
CLOSED_PORT_URL = "http://127.0.0.1:9"  # the discard port: the provider is never called


# -- the subscriber process ------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriberSpec:
    address: str
    subscribers: int
    channels: int
    authorization: str


# What the subscriber process sends back (builtins only):
#   ("ready", streams) once every stream has named its starting point
#   ("done", [(event_reason, arrived_monotonic), ...], errors)
#   ("error", description)
SubscriberReply = tuple[Any, ...]


async def _subscribe(
    spec: SubscriberSpec, commands: Queue[str], replies: Queue[SubscriberReply]
) -> None:
    channels = [aio.insecure_channel(spec.address) for _ in range(max(1, spec.channels))]
    arrivals: list[tuple[str, float]] = []
    errors = 0
    try:
        stubs = [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels]
        metadata = (("authorization", spec.authorization),)
        calls = [
            stubs[i % len(stubs)].WatchEvents(auth_pb2.WatchEventsRequest(), metadata=metadata)
            for i in range(spec.subscribers)
        ]
        await asyncio.gather(*(call.initial_metadata() for call in calls))

        async def read(call: Any) -> None:
            nonlocal errors
            try:
                async for event in call:
                    arrivals.append((event.reason, time.monotonic()))
            except aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors += 1

        readers = [asyncio.create_task(read(call)) for call in calls]
        replies.put(("ready", len(calls)))
        await asyncio.to_thread(commands.get)  # "stop"
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        replies.put(("done", arrivals, errors))
    finally:
        for channel in channels:
            await channel.close()


def subscriber_worker(
    spec: SubscriberSpec, commands: Queue[str], replies: Queue[SubscriberReply]
) -> None:
    """Entry point of the subscriber process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        asyncio.run(_subscribe(spec, commands, replies))
    except BaseException as exc:
        replies.put(("error", f"{type(exc).__name__}: {exc}"))


class Subscribers:
    """The subscriber process of one scenario (none for 0 subscribers)."""

    def __init__(self, spec: SubscriberSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._commands: Queue[str] = ctx.Queue()
        self._replies: Queue[SubscriberReply] = ctx.Queue()
        self._process = ctx.Process(
            target=subscriber_worker, args=(spec, self._commands, self._replies)
        )
        self._process.start()
        reply = self._replies.get(timeout=120)
        if reply[0] != "ready":
            self.stop()
            raise RuntimeError(f"subscribers did not start: {reply[-1]}")

    def collect(self) -> tuple[list[tuple[str, float]], int]:
        self._commands.put("stop")
        reply = self._replies.get(timeout=120)
        if reply[0] != "done":
            raise RuntimeError(f"subscribers failed: {reply[-1]}")
        return list(reply[1]), int(reply[2])

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(timeout=10)


# -- the event writer (a thread of this process) ---------------------------------------------


def bench_store(url: str) -> RedisStore:
    cipher = TokenCipher(parse_encryption_keys(ENCRYPTION_KEYS, "bench"))
    client = redis.Redis.from_url(url, client_name=BENCH_CLIENT)
    return RedisStore(client, cipher, prefix=PREFIX, events_stream=f"{PREFIX}events")


class EventWriter(threading.Thread):
    """Writes one event every 1/rate s until stopped; remembers when each was written."""

    def __init__(self, url: str, rate: float) -> None:
        super().__init__(daemon=True)
        self._url, self._interval = url, 1.0 / rate
        self._stop_event = threading.Event()
        self.written: dict[str, float] = {}  # event reason -> monotonic time of the write

    def run(self) -> None:
        asyncio.run(self._write())

    async def _write(self) -> None:
        store = bench_store(self._url)
        try:
            number = 0
            next_at = time.monotonic()
            while not self._stop_event.is_set():
                reason = f"bench-{number}"
                self.written[reason] = time.monotonic()
                await store.record_refresh_failure(
                    NOISE_ACCOUNT,
                    expected_generation=1,
                    reason=reason,
                    retry_at=0.0,
                    now=time.time(),
                )
                number += 1
                next_at += self._interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            await store.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


# -- one scenario ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    subscribers: int
    redis_connections: int
    rss_mb: float | None
    delivered: int
    expected: int
    errors: int
    delivery_ms: list[float]  # every (event, subscriber)
    last_ms: list[float]  # per event: until the last subscriber had it
    load: LoadResult


def redis_connections(url: str) -> int:
    """Connections to Redis other than the benchmark's own (named BENCH_CLIENT)."""
    with sync_redis.Redis.from_url(url, client_name=BENCH_CLIENT) as client:
        return sum(1 for c in client.client_list() if c.get("name") != BENCH_CLIENT)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_scenario(
    args: argparse.Namespace, replica: ReplicaProcess, redis_url: str, count: int
) -> Scenario:
    spec = SubscriberSpec(
        replica.address,
        count,
        min(args.channels, count),
        str(dict(gateway_md())["authorization"]),
    )
    subscribers = Subscribers(spec) if count else None
    try:
        connections = redis_connections(redis_url)
        rss = rss_mb(replica.process.pid if replica.process else None)
        writer = EventWriter(redis_url, args.event_rate)
        writer.start()
        try:
            load = run_load(
                f"{count} subscribers",
                [replica],
                concurrency=CONCURRENCY,
                procs=args.load_procs,
                warmup=args.warmup,
                window=args.seconds,
                account=ACCOUNT,
                redis_pid=None,
            )
        finally:
            writer.stop()
        time.sleep(args.settle)  # the last events reach every subscriber
        arrivals, errors = subscribers.collect() if subscribers else ([], 0)
    finally:
        if subscribers is not None:
            subscribers.stop()
    latest: dict[str, float] = {}
    delivery: list[float] = []
    for reason, arrived in arrivals:
        written_at = writer.written.get(reason)
        if written_at is None:
            continue
        delivery.append(1000.0 * (arrived - written_at))
        latest[reason] = max(latest.get(reason, 0.0), arrived)
    return Scenario(
        subscribers=count,
        redis_connections=connections,
        rss_mb=rss,
        delivered=len(delivery),
        expected=count * len(writer.written),
        errors=errors,
        delivery_ms=delivery,
        last_ms=[1000.0 * (t - writer.written[r]) for r, t in latest.items()],
        load=load,
    )


# -- the stack -------------------------------------------------------------------------------


def replica_config(redis_url: str) -> dict[str, Any]:
    return {
        "auth": {
            "redis_url": redis_url,
            "key_prefix": PREFIX,
            "events_stream": f"{PREFIX}events",
            "log_level": "warning",
            "callers": [
                {"role": "admin", "token": {"env": "KR_ADMIN_TOKEN"}},
                {"role": "gateway", "token": {"env": "KR_GATEWAY_TOKEN"}},
            ],
        },
        "providers": {
            PROVIDER: {
                "authorize_url": f"{CLOSED_PORT_URL}/authorize",
                "token_url": f"{CLOSED_PORT_URL}/token",
                "client_id": "bench",
                "scopes": ["openid"],
                "redirect_uris": ["http://127.0.0.1:8765/callback"],
            }
        },
    }


async def connect_accounts(url: str) -> None:
    store = bench_store(url)
    try:
        for account in (ACCOUNT, NOISE_ACCOUNT):
            await store.connect(
                account,
                provider=PROVIDER,
                scopes=["openid"],
                tokens=StoredTokens("access-" + account, "refresh-" + account),
                token_type="Bearer",
                expires_at=time.time() + 3600,
                now=time.time(),
            )
    finally:
        await store.close()


# -- output ----------------------------------------------------------------------------------


def median_p99(results: Sequence[Scenario], subscribers: int) -> float:
    """The median over the runs of GetToken's p99 with ``subscribers``, in ms."""
    return statistics.median(
        r.load.percentile_ms(99) for r in results if r.subscribers == subscribers
    )


def print_results(results: Sequence[Scenario]) -> None:
    base = median_p99(results, 0)
    headers = (
        "subscribers",
        "redis conns",
        "auth RSS MB",
        "delivered",
        "stream errors",
        "delivery p50 ms",
        "p99 ms",
        "last p99 ms",
        "GetToken/s",
        "p50 ms",
        "p99 ms",
        "p99 vs median 0",
        "auth cpu",
    )
    rows = []
    for r in results:
        p99 = r.load.percentile_ms(99)
        ratio = p99 / base if base else float("nan")
        rows.append(
            (
                str(r.subscribers),
                str(r.redis_connections),
                "n/a" if r.rss_mb is None else f"{r.rss_mb:.0f}",
                f"{r.delivered}/{r.expected}" if r.subscribers else "-",
                str(r.errors),
                fmt_ms(percentile(r.delivery_ms, 50)),
                fmt_ms(percentile(r.delivery_ms, 99)),
                fmt_ms(percentile(r.last_ms, 99)),
                f"{r.load.rate:.0f}",
                fmt_ms(r.load.percentile_ms(50)),
                fmt_ms(p99),
                f"{ratio:.2f}x",
                fmt_cpu(r.load.server_cpu),
            )
        )
    print(table(headers, rows))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark WatchEvents fan-out of one `keyrelay auth serve` replica."
    )
    add_window_args(parser, quick_help="smoke run: 0.5 s windows")
    parser.add_argument(
        "--subscribers",
        type=int,
        nargs="+",
        default=list(SUBSCRIBERS),
        help="numbers of subscribers, one scenario each (0 is always run: the baseline)",
    )
    parser.add_argument("--channels", type=int, default=50, help="gRPC channels they use (50)")
    # An event is a refresh, connect, disconnect or failed refresh of any account: 2/s is
    # 7,200 an hour, a fleet of thousands of accounts with hourly tokens.
    parser.add_argument("--event-rate", type=float, default=2.0, help="events per second (2)")
    parser.add_argument("--settle", type=float, default=1.0, help="s for the last events (1)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of the whole set, interleaved (3)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the replica to a CPU of its own and the rest to the others",
    )
    parser.add_argument(
        "--load-procs", type=int, default=1, help="GetToken load-generator processes (1)"
    )
    args = parser.parse_args(argv)
    resolve_window_args(parser, args)
    if args.quick:
        args.settle = min(args.settle, 0.5)
    if args.quick:
        args.repeat = 1
    if (
        args.channels < 1
        or args.event_rate <= 0
        or args.repeat < 1
        or any(n < 0 for n in args.subscribers)
    ):
        parser.error("--channels, --event-rate and --repeat must be > 0, --subscribers >= 0")
    args.subscribers = sorted({0, *args.subscribers})
    return args


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    tmp = temp_dir(stack, "keyrelay-bench-events-")
    print(
        f"keyrelay WatchEvents fan-out benchmark: {os.cpu_count()} cpu(s), Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}; GetToken at concurrency "
        f"{CONCURRENCY}, window {args.seconds:g} s after {args.warmup:g} s warm-up; "
        f"{args.event_rate:g} events/s; subscribers over up to {args.channels} channels",
        flush=True,
    )
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cpus) >= 2
    if pin:  # every process started from here on inherits this; the replica is moved
        stack.callback(os.sched_setaffinity, 0, cpus)
        os.sched_setaffinity(0, cpus[1:])
        print(f"replica pinned to cpu {cpus[0]}, everything else to cpu {cpus[1:]}")
    redis_server = RedisServer(tmp / "redis")
    stack.callback(redis_server.stop)
    redis_server.start()
    asyncio.run(connect_accounts(redis_server.url))

    results: list[Scenario] = []
    runs = [(run, count) for run in range(args.repeat) for count in args.subscribers]
    for run_number, count in runs:
        # A fresh replica per scenario: its Redis connections are counted before any
        # GetToken (whose pool keeps what a burst opened), with the subscribers connected.
        directory = tmp / f"run-{run_number}-subscribers-{count}"
        directory.mkdir()
        (replica,) = write_replica_configs(directory, 1, replica_config(redis_server.url))
        stack.callback(replica.stop)
        replica.start()
        if pin and replica.process is not None:
            set_affinity(replica.process.pid, cpus[:1])
        results.append(run_scenario(args, replica, redis_server.url, count))
        replica.stop()
        r = results[-1]
        print(
            f"  {count} subscribers: {r.redis_connections} Redis connection(s), delivery p99 "
            f"{fmt_ms(percentile(r.delivery_ms, 99))} ms, GetToken p99 "
            f"{fmt_ms(r.load.percentile_ms(99))} ms",
            flush=True,
        )

    print("\n== Results ==\n")
    print(
        "delivery: ms from the write to a subscriber, every (event, subscriber); last: "
        "until the last subscriber had the event; redis conns: the replica's (a fresh one per "
        "row), with the subscribers connected, before GetToken; auth cpu: % of one core "
        "during the GetToken window\n"
    )
    print_results(results)
    connections = {  # the most any run of each scenario saw
        count: max(r.redis_connections for r in results if r.subscribers == count)
        for count in args.subscribers
    }
    print("\nTargets:")
    grows = connections[max(connections)] - connections[min(connections)]
    print(
        f"  [{mark(grows <= 0)}] Redis connections do not grow with subscribers: "
        + ", ".join(f"{count}: {n}" for count, n in connections.items())
    )
    complete = all(r.delivered == r.expected and r.errors == 0 for r in results)
    print(f"  [{mark(complete)}] every event reached every subscriber, no stream failed")
    base = median_p99(results, 0)
    for count in args.subscribers:
        if count:
            ratio = median_p99(results, count) / base if base else float("nan")
            print(
                f"  [{mark(ratio <= P99_RATIO_TARGET)}] GetToken p99 with {count} subscribers "
                f"<= {P99_RATIO_TARGET:g}x of none (medians of {args.repeat} run(s)): "
                f"{ratio:.2f}x"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(lambda stack: run(args, stack))


if __name__ == "__main__":
    sys.exit(main())
