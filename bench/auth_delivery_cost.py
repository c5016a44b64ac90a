"""What one WatchEvents delivery costs an auth replica, in CPU time.

One ``keyrelay auth serve`` replica, alone on the first CPU (the rest of this
benchmark on the others), ``--subscribers`` WatchEvents streams held by a process
of their own (``bench/auth_events.py``'s), and events written at ``--event-rate``
for ``--seconds``, with no other load. The replica's CPU time over the window
(``/proc``, every thread, gRPC's poller included), divided by the deliveries the
subscribers counted, is the cost of one delivery: the number behind the pacing of
``EventHub`` (docs/decisions.md, "GetToken comes first"). Nothing is asserted.

Run from the repository root::

    .venv/bin/python bench/auth_delivery_cost.py                   # 1,000 subscribers, 5 events/s
    .venv/bin/python bench/auth_delivery_cost.py --subscribers 100 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.auth_events import (  # noqa: E402
    EventWriter,
    Subscribers,
    SubscriberSpec,
    connect_accounts,
    replica_config,
)
from bench.common import cpu_seconds, run_bench, set_affinity, temp_dir  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.stack import gateway_md, write_replica_configs  # noqa: E402

SETTLE_SECONDS = 1.5  # after the last write: the last events reach every subscriber


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--subscribers", type=int, default=1000, help="streams (1000)")
    parser.add_argument("--event-rate", type=float, default=5.0, help="events per second (5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="writing window (5)")
    parser.add_argument("--channels", type=int, default=50, help="gRPC channels they use (50)")
    args = parser.parse_args(argv)
    if args.subscribers < 1 or args.event_rate <= 0 or args.seconds <= 0 or args.channels < 1:
        parser.error("--subscribers, --event-rate, --seconds and --channels must be > 0")
    return args


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:  # children inherit this; the replica is moved to the first CPU
        stack.callback(os.sched_setaffinity, 0, cpus)
        os.sched_setaffinity(0, cpus[1:])
    tmp = temp_dir(stack, "keyrelay-bench-delivery-")
    redis_server = RedisServer(tmp / "redis")
    stack.callback(redis_server.stop)
    redis_server.start()
    asyncio.run(connect_accounts(redis_server.url))
    (replica,) = write_replica_configs(tmp, 1, replica_config(redis_server.url))
    stack.callback(replica.stop)
    replica.start()
    assert replica.process is not None
    pid = replica.process.pid
    if len(cpus) >= 2:
        set_affinity(pid, cpus[:1])
    spec = SubscriberSpec(
        replica.address,
        args.subscribers,
        min(args.channels, args.subscribers),
        str(dict(gateway_md())["authorization"]),
    )
    subscribers = Subscribers(spec)
    stack.callback(subscribers.stop)
    time.sleep(1.0)  # the streams are idle: what they cost at rest is not counted
    before, started = cpu_seconds(pid), time.monotonic()
    writer = EventWriter(redis_server.url, args.event_rate)
    writer.start()
    time.sleep(args.seconds)
    writer.stop()
    time.sleep(SETTLE_SECONDS)
    after, ended = cpu_seconds(pid), time.monotonic()
    arrivals, errors = subscribers.collect()
    delivered = len(arrivals)
    pinned = f" (replica pinned to cpu {cpus[0]})" if len(cpus) >= 2 else ""
    print(
        f"auth replica, {args.subscribers} subscribers, {args.event_rate:g} events/s for "
        f"{args.seconds:g} s{pinned}"
    )
    print(f"  deliveries: {delivered} of {args.subscribers * len(writer.written)}, errors {errors}")
    if before is None or after is None or not delivered:
        print("  replica CPU: n/a (no /proc, or nothing delivered)")
        return
    used = after - before
    print(
        f"  replica CPU: {used:.2f} s over {ended - started:.1f} s = "
        f"{1e6 * used / delivered:.1f} us per delivery"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(lambda stack: run(args, stack))


if __name__ == "__main__":
    sys.exit(main())
