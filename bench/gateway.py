"""Benchmark of the gateway worker: added latency, requests/s per core, streaming throughput.

Everything runs on 127.0.0.1 in one invocation, each part in its own process:

- a fast fake Messages API upstream (``bench/fast_upstream.py``: a raw asyncio
  protocol on uvloop answering from responses built once, so it is never the
  bottleneck);
- ``keyrelay gateway serve`` with two ``api_key``-mode routes (the upstream key
  named explicitly in the route, so no auth service is needed): ``plain`` with
  the default, empty profile, and ``tools`` with ``tool_prefix = "mcp_"``, so
  the request and response transforms run (tools renamed on the way up,
  ``tool_use`` names mapped back on the way down);
- the floor: ``bench/floor_proxy.py``, a bare forwarding proxy on the gateway's
  own stack (uvicorn + aiohttp, no keys, transforms, usage, metrics or logs),
  measured like a route, so that what the gateway adds above its frameworks
  can be told apart from the frameworks and the machine (its values are
  printed in brackets beside each target); and ``floor kr``, the same bare
  proxy on keyrelay's own upstream client instead of aiohttp's: the two side
  by side are the measurement behind the gateway's choice of client;
- a load generator in separate process(es) (``--load-procs``; aiohttp client on
  uvloop, closed loop of in-flight requests), each scenario a warm-up and then
  a measurement window (``--seconds``), split into ``--rounds`` rounds in which
  the paths take turns (direct, floor, gw plain, gw tools, direct, ...): on a
  shared machine whose speed drifts over a minute, every path then sees the
  same mix of fast and slow moments; a path's rounds are summed into its row.

It measures, direct to the upstream and through each gateway route:

1. non-stream ``POST /v1/messages``: latency p50/p99 at concurrency 1 and 32
   (added ms and ratio against direct), requests/s at 32, and requests/s per
   gateway core (requests/s divided by the gateway's CPU use over the window);
2. streaming: a 2000-event realistic stream (``bench/sse_core.build_stream``:
   message_start, text deltas, ping, tool_use with input_json_delta,
   message_delta with usage, message_stop) at ``--stream-concurrency``:
   events/s and MB/s, and the ratio against direct;
3. the gateway's CPU per request and per streamed event: utime + stime from
   ``/proc/<pid>/stat`` over the window divided by the requests / events the
   clients received in it;
4. the pinned streaming row (``--pinned-concurrency``, 8): the same stream read
   as raw chunks by ``--pinned-concurrency`` clients, every proxy pinned to one
   core and the upstream and load generator to the other(s), so that the proxy
   is the bottleneck: events/s against direct and the proxy's CPU per event,
   the gateway's beside the bare aiohttp proxy's (the floor) of the same run.

The CPU used by the load generator, the upstream and the whole machine during
each window is printed too, in % of one core: on a small machine the client can
be the bottleneck, and then the numbers say more about the client than about
the gateway. Targets are printed with PASS/MISS; nothing is asserted, timing on
a shared machine is noisy. The gateway runs as deployed, access log (one JSON
line per request, to a file here) and metrics included. Every process started
here is stopped and the temporary directory removed on exit, Ctrl-C and SIGTERM
included.

Run from the repository root::

    .venv/bin/python bench/gateway.py            # full run (~1 min)
    .venv/bin/python bench/gateway.py --quick    # smoke run, short windows
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import http.client
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import tomli_w
import uvicorn
import uvloop

# `python bench/gateway.py` puts bench/ on sys.path, not the repository root.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    SATURATED,
    CpuMeter,
    HostMeter,
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
from bench.sse_core import build_stream  # noqa: E402
from keyrelay.gateway.keys import key_hash, new_key  # noqa: E402
from tests.support.redis_server import free_port  # noqa: E402

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

EVENTS = 2000
API_KEY_ENV = "KR_BENCH_UPSTREAM_KEY"
TOOL_PREFIX = "mcp_"
HIGH_CONCURRENCY = 32
FLOOR = "floor"  # the label of bench/floor_proxy.py's path (uvicorn + aiohttp's client)
FLOOR_KEYRELAY = "floor kr"  # the same proxy on keyrelay's own upstream client

ADDED_P50_TARGET_MS = 0.5  # at concurrency 1
PER_CORE_TARGET = 3000.0  # non-stream requests/s per gateway core at concurrency 32
STREAM_RATIO_TARGET = 0.85  # events/s through the gateway / direct
EVENT_CPU_TARGET_US = 4.0  # gateway CPU per untouched SSE event (the plain route)
PINNED_CONCURRENCY = 8  # streams of the pinned raw-chunk row (--pinned-concurrency)

REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 1024,
    "messages": [
        {"role": "user", "content": "What is the weather like in Paris right now, in celsius?"}
    ],
    "tools": [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given city",
            "input_schema": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        }
    ],
}


def request_body(stream: bool) -> bytes:
    body = {**REQUEST, "stream": True} if stream else REQUEST
    return json.dumps(body, separators=(",", ":")).encode()


# -- the load generator (runs in spawned processes, one job per scenario) -----------------


@dataclass(frozen=True)
class LoadSpec:
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stream: bool
    stream_client: str  # "lines" or "chunks", see read_stream
    concurrency: int  # in-flight requests of this process (0: sit this scenario out)
    warmup: float
    window: float


# What a worker sends back: only builtins, so the parent can unpickle it whatever
# the name of the module the worker ran as.
#   ("ok", latencies_in_window_s, completed, errors, bytes, events)  -- all in the window
#   ("error", description)
WorkerReply = tuple[Any, ...]


async def read_stream(
    response: aiohttp.ClientResponse, client: str, measure_from: float, measure_to: float
) -> tuple[int, int]:
    """Reads an SSE response to its end: (bytes, events) that arrived in the window.

    ``lines``: line by line, an event per blank line, the way a minimal SSE client
    reads a stream; ``chunks``: whatever each read returns, blank lines counted
    with ``bytes.count`` (near-free: the upper bound of what a client could take).
    """
    received = events = 0
    if client == "lines":
        pending = 0
        async for line in response.content:
            pending += len(line)
            if line == b"\n" or line == b"\r\n":
                if measure_from <= time.perf_counter() <= measure_to:
                    received += pending
                    events += 1
                pending = 0
        return received, events
    last_lf = False
    async for chunk in response.content.iter_any():
        now = time.perf_counter()
        count = chunk.count(b"\n\n")
        if last_lf and chunk[:1] == b"\n":
            count += 1
        last_lf = chunk[-1:] == b"\n"
        if measure_from <= now <= measure_to:
            received += len(chunk)
            events += count
    return received, events


async def _drive(spec: LoadSpec, barrier: Barrier) -> WorkerReply:
    connector = aiohttp.TCPConnector(limit=max(1, spec.concurrency))
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = dict(spec.headers)

        async def request() -> tuple[int, int, int]:
            """One request: (status, bytes, events) of the response, read to its end."""
            async with session.post(spec.url, data=spec.body, headers=headers) as response:
                data = await response.read()
                return response.status, len(data), data.count(b"\n\n")

        # One request per connection outside any measurement (and a correctness check).
        for status, _, _ in await asyncio.gather(*(request() for _ in range(spec.concurrency))):
            if status != 200:
                raise RuntimeError(f"{spec.url} answered {status} before the measurement")
        await asyncio.to_thread(barrier.wait, 60)

        begin = time.perf_counter()
        measure_from = begin + spec.warmup
        measure_to = measure_from + spec.window
        latencies: list[float] = []
        completed = errors = received = events = 0

        async def slot() -> None:
            nonlocal completed, errors, received, events
            while True:
                started = time.perf_counter()
                if started >= measure_to:
                    return
                ok = False
                try:
                    async with session.post(spec.url, data=spec.body, headers=headers) as response:
                        if spec.stream:
                            got, count = await read_stream(
                                response, spec.stream_client, measure_from, measure_to
                            )
                            received += got
                            events += count
                        else:
                            received_now = len(await response.read())
                            if measure_from <= time.perf_counter() <= measure_to:
                                received += received_now
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                ended = time.perf_counter()
                if measure_from <= ended <= measure_to:
                    if not ok:
                        errors += 1
                    else:
                        completed += 1
                        if started >= measure_from:
                            latencies.append(ended - started)

        await asyncio.gather(*(slot() for _ in range(spec.concurrency)))
        return ("ok", latencies, completed, errors, received, events)


def load_worker(
    jobs: Queue[LoadSpec | None], replies: Queue[WorkerReply], barrier: Barrier
) -> None:
    """Entry point of a load-generator process: one reply per job, until ``None``."""
    # Ctrl-C reaches the whole process group: the parent handles it and ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (spec := jobs.get()) is not None:
        try:
            replies.put(uvloop.run(_drive(spec, barrier)))
        except BaseException as exc:
            barrier.abort()
            replies.put(("error", f"{type(exc).__name__}: {exc}"))


class LoadGenerator:
    """``procs`` long-lived load processes (spawned once: imports are not free)."""

    def __init__(self, procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs = procs
        self.barrier = ctx.Barrier(procs + 1)
        self.replies: Queue[WorkerReply] = ctx.Queue()
        self.jobs: list[Queue[LoadSpec | None]] = [ctx.Queue() for _ in range(procs)]
        self.workers = [
            ctx.Process(target=load_worker, args=(jobs, self.replies, self.barrier), daemon=True)
            for jobs in self.jobs
        ]
        for worker in self.workers:
            worker.start()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    def run(self, spec: LoadSpec, start_meters: Any, stop_meters: Any) -> list[WorkerReply]:
        """One scenario: ``spec.concurrency`` in-flight requests spread over the processes."""
        total = spec.concurrency
        for index, jobs in enumerate(self.jobs):
            share = total // self.procs + (1 if index < total % self.procs else 0)
            jobs.put(dataclasses.replace(spec, concurrency=share))
        try:
            self.barrier.wait(120)
        except threading.BrokenBarrierError:
            reasons = []
            with contextlib.suppress(Exception):
                reasons = [str(self.replies.get(timeout=5)[-1]) for _ in self.workers]
            raise RuntimeError(
                f"load generator did not start: {'; '.join(reasons) or 'no reason given'}"
            ) from None
        time.sleep(spec.warmup)
        start_meters()
        time.sleep(spec.window)
        stop_meters()
        replies = [self.replies.get(timeout=spec.window + 60) for _ in self.workers]
        failures = [str(r[1]) for r in replies if r[0] != "ok"]
        if failures:
            raise RuntimeError(f"load generator failed: {'; '.join(failures)}")
        return replies

    def stop(self) -> None:
        for jobs in self.jobs:
            with contextlib.suppress(Exception):
                jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
                worker.join()


# -- the processes under test ---------------------------------------------------------------


@dataclass
class Service:
    """A process of ours, stopped with SIGTERM (then SIGKILL) and its log kept for errors."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}"
            )


def _spawn(
    stack: contextlib.ExitStack, name: str, argv: list[str], log_path: Path, **popen: Any
) -> Service:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stderr=log, cwd=REPO_ROOT, **popen)
    service = Service(name, process, log_path)
    stack.callback(service.stop)
    return service


def start_upstream(stack: contextlib.ExitStack, tmp: Path, chunk: int) -> tuple[Service, str]:
    argv = [sys.executable, "-m", "bench.fast_upstream", "--events", str(EVENTS)]
    upstream = _spawn(
        stack,
        "upstream",
        [*argv, "--chunk", str(chunk)],
        tmp / "upstream.log",
        stdout=subprocess.PIPE,
    )
    assert upstream.process.stdout is not None
    line = upstream.process.stdout.readline().decode()
    if not line.startswith("listening "):
        upstream.check_alive()
        raise RuntimeError(f"upstream did not start: {line!r}\n{upstream.log_tail()}")
    return upstream, f"http://127.0.0.1:{int(line.split()[1])}"


@dataclass(frozen=True)
class Route:
    label: str
    key: str


def gateway_config(upstream_url: str, port: int, routes: Sequence[Route]) -> dict[str, Any]:
    return {
        "gateway": {"listen": f"127.0.0.1:{port}", "log_level": "info"},
        "upstreams": {"default": {"url": upstream_url, "read_timeout_seconds": 30}},
        "profiles": {"tools": {"tool_prefix": TOOL_PREFIX}},
        "prices": {"claude-sonnet-4*": {"input": 3.0, "output": 15.0}},
        "keys": [
            {
                "name": route.label,
                "hash": key_hash(route.key),
                "mode": "api_key",
                "api_key": {"env": API_KEY_ENV},
                "profile": "tools" if route.label == "tools" else "default",
            }
            for route in routes
        ],
    }


# `keyrelay gateway serve` with another uvicorn HTTP protocol than the front door
# (argv: config path, protocol name): the same app, config and logging.
SERVE_WITH_HTTP = (
    "import os, sys\n"
    "from keyrelay.gateway.config import load_gateway_config\n"
    "from keyrelay.gateway.server import serve\n"
    "from keyrelay.logs import configure_logging\n"
    "config = load_gateway_config(sys.argv[1], os.environ)\n"
    "configure_logging(config.log_level)\n"
    "serve(config, http=sys.argv[2])\n"
)


def start_gateway(
    stack: contextlib.ExitStack,
    tmp: Path,
    upstream_url: str,
    routes: Sequence[Route],
    protocol: str | None = None,
) -> tuple[Service, str]:
    """``protocol``: a uvicorn HTTP protocol name (e.g. ``httptools``, uvicorn's own)
    instead of the gateway's front door, to compare the two (--compare-http)."""
    port = free_port()
    name = f"gateway-{protocol}" if protocol else "gateway"
    config = tmp / f"{name}.toml"
    config.write_bytes(tomli_w.dumps(gateway_config(upstream_url, port, routes)).encode())
    env = {**os.environ, API_KEY_ENV: "sk-bench-" + "0" * 32}
    argv = [sys.executable, "-m", "keyrelay", "gateway", "serve", "--config", str(config)]
    if protocol:
        argv = [sys.executable, "-c", SERVE_WITH_HTTP, str(config), protocol]
    gateway = _spawn(stack, name, argv, tmp / f"{name}.log", stdout=subprocess.DEVNULL, env=env)
    return gateway, wait_serving(gateway, port)


def start_floor(
    stack: contextlib.ExitStack, tmp: Path, upstream_url: str, client: str
) -> tuple[Service, str]:
    """``bench/floor_proxy.py``: uvicorn and an upstream client (``aiohttp`` or
    ``keyrelay``) doing nothing else."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor_proxy", "--upstream", upstream_url]
    floor = _spawn(
        stack,
        f"floor proxy ({client})",
        [*argv, "--port", str(port), "--client", client],
        tmp / f"floor-{client}.log",
        stdout=subprocess.DEVNULL,
    )
    return floor, wait_serving(floor, port)


def wait_serving(service: Service, port: int) -> str:
    """The service's URL once it answers HTTP on ``port`` (any status: it is up)."""
    deadline = time.monotonic() + 30
    while True:
        service.check_alive()
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                connection.request("GET", "/healthz")
                connection.getresponse()
                return f"http://127.0.0.1:{port}"
            finally:
                connection.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} not serving after 30 s:\n{service.log_tail()}")
        time.sleep(0.05)


# -- targets of one run ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the load goes: straight to the upstream, or through a proxy process."""

    label: str  # "direct", "floor", "floor kr", "gw plain", "gw tools"
    url: str
    headers: tuple[tuple[str, str], ...]
    proxy: Service | None = None  # the process in between, whose CPU is measured

    @property
    def through_gateway(self) -> bool:
        """Through a proxy: the gateway, or the floor proxy beside it."""
        return self.proxy is not None


def client_headers(key: str | None) -> tuple[tuple[str, str], ...]:
    headers = [("content-type", "application/json"), ("anthropic-version", "2023-06-01")]
    headers.append(("x-api-key", key or "sk-bench-direct"))
    return tuple(headers)


async def preflight(paths: Sequence[Target]) -> None:
    """One request of each kind per path, checked, before anything is measured."""
    streams: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        for path in paths:
            for stream in (False, True):
                async with session.post(
                    path.url + "/v1/messages", data=request_body(stream), headers=dict(path.headers)
                ) as response:
                    data = await response.read()
                    if response.status != 200:
                        raise RuntimeError(
                            f"{path.label}: status {response.status}: {data[:500]!r}"
                        )
                expected = (
                    "get_weather" if path.label == "gw tools" else TOOL_PREFIX + "get_weather"
                )
                if stream:
                    streams[path.label] = data
                    events = data.count(b"\n\n")
                    if events != EVENTS:
                        raise RuntimeError(f"{path.label}: {events} events, not {EVENTS}")
                    if f'"name":"{expected}"'.encode() not in data:
                        raise RuntimeError(f"{path.label}: stream without tool {expected}")
                else:
                    names = [b["name"] for b in json.loads(data)["content"] if "name" in b]
                    if names != [expected]:
                        raise RuntimeError(f"{path.label}: tool names {names}, not [{expected}]")
    for label in ("gw plain", FLOOR, FLOOR_KEYRELAY):
        if streams.get(label) != streams.get("direct"):
            raise RuntimeError(f"{label} did not forward the stream byte-for-byte")


@dataclass
class Result:
    path: Target
    stream: bool
    client: str  # how the load generator read streams
    concurrency: int
    window: float
    completed: int
    errors: int
    latencies: list[float]
    received: int
    events: int
    gateway_cpu_s: float | None
    meters: dict[str, float | None] = field(default_factory=dict)  # % of one core
    pinned: bool = False  # the pinned row: proxy on one core, upstream and load on the other(s)

    @property
    def rate(self) -> float:
        return self.completed / self.window

    def p(self, q: float) -> float:
        return 1000.0 * percentile(self.latencies, q)

    @property
    def gateway_cores(self) -> float | None:
        if self.gateway_cpu_s is None:
            return None
        return self.gateway_cpu_s / self.window

    @property
    def per_core(self) -> float | None:
        cores = self.gateway_cores
        return self.rate / cores if cores else None

    def cpu_us(self, count: int) -> float | None:
        if self.gateway_cpu_s is None or not count:
            return None
        return 1e6 * self.gateway_cpu_s / count


class Bench:
    def __init__(
        self, load: LoadGenerator, gateway: Service, upstream: Service, args: argparse.Namespace
    ) -> None:
        self.load = load
        self.gateway = gateway
        self.upstream = upstream
        self.args = args

    def measure(
        self,
        path: Target,
        *,
        stream: bool,
        concurrency: int,
        client: str = "lines",
        pinned: bool = False,
    ) -> Result:
        rounds = self.args.rounds
        spec = LoadSpec(
            url=path.url + "/v1/messages",
            headers=path.headers,
            body=request_body(stream),
            stream=stream,
            stream_client=client,
            concurrency=concurrency,
            warmup=self.args.warmup / rounds,
            window=self.args.seconds / rounds,
        )
        meters = {
            "gateway": CpuMeter([(path.proxy or self.gateway).pid]),
            "upstream": CpuMeter([self.upstream.pid]),
            "client": CpuMeter(self.load.pids),
        }
        host = HostMeter()
        readings: dict[str, float | None] = {}

        def start() -> None:
            host.start()
            for meter in meters.values():
                meter.start()

        def stop() -> None:
            for name, meter in meters.items():
                readings[name] = meter.stop()
            readings["host"] = host.stop()

        replies = self.load.run(spec, start, stop)
        self.gateway.check_alive()
        self.upstream.check_alive()
        latencies: list[float] = []
        for reply in replies:
            latencies.extend(reply[1])
        return Result(
            path=path,
            stream=stream,
            client=client,
            concurrency=concurrency,
            window=spec.window,
            completed=sum(int(r[2]) for r in replies),
            errors=sum(int(r[3]) for r in replies),
            latencies=latencies,
            received=sum(int(r[4]) for r in replies),
            events=sum(int(r[5]) for r in replies),
            gateway_cpu_s=meters["gateway"].seconds,
            meters=readings,
            pinned=pinned,
        )


def merged(rounds: Sequence[Result]) -> Result:
    """One path's rounds of one scenario as one result: counts and CPU summed,
    latencies pooled, meters averaged over the windows."""
    first = rounds[0]
    window = sum(r.window for r in rounds)
    cpu = [r.gateway_cpu_s for r in rounds]
    meters: dict[str, float | None] = {}
    for name in first.meters:
        readings = [r.meters.get(name) for r in rounds]
        meters[name] = (
            None
            if any(v is None for v in readings)
            else sum(v * r.window for v, r in zip(readings, rounds, strict=True) if v is not None)
            / window
        )
    return dataclasses.replace(
        first,
        window=window,
        completed=sum(r.completed for r in rounds),
        errors=sum(r.errors for r in rounds),
        latencies=[latency for r in rounds for latency in r.latencies],
        received=sum(r.received for r in rounds),
        events=sum(r.events for r in rounds),
        gateway_cpu_s=None if any(c is None for c in cpu) else sum(c or 0.0 for c in cpu),
        meters=meters,
    )


def interleaved(
    paths: Sequence[Target], rounds: int, measure: Callable[[Target], Result]
) -> list[Result]:
    """Each path measured ``rounds`` times, the paths taking turns: a machine that
    gets slower or faster during the run (a shared host) shifts every path alike."""
    return [merged(results) for results in interleaved_rounds(paths, rounds, measure)]


def interleaved_rounds(
    paths: Sequence[Target], rounds: int, measure: Callable[[Target], Result]
) -> list[list[Result]]:
    """``interleaved``'s measurements, each round's kept: per path, its rounds."""
    per_path: list[list[Result]] = [[] for _ in paths]
    for _ in range(rounds):
        for index, path in enumerate(paths):
            per_path[index].append(measure(path))
    return per_path


@contextlib.contextmanager
def pinned_cpus(proxies: Sequence[Service], others: Sequence[int]) -> Iterator[str | None]:
    """Every proxy process on the first CPU this process may use, ``others`` (pids:
    upstream, load generator) on the rest, until the block ends; yields how, or
    None on a machine with a single CPU (nothing pinned)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield None
        return
    pids = [p.pid for p in proxies] + list(others)
    before = {pid: os.sched_getaffinity(pid) for pid in pids}
    try:
        for proxy in proxies:
            set_affinity(proxy.pid, cpus[:1])
        for pid in others:
            set_affinity(pid, cpus[1:])
        yield f"proxy on cpu {cpus[0]}, upstream and load generator on cpu {cpus[1:]}"
    finally:
        for pid, mask in before.items():
            with contextlib.suppress(OSError):  # a process that already exited
                set_affinity(pid, sorted(mask))


# -- output ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def ratio(value: float, base: float) -> float | None:
    return value / base if base else None


def cpu_columns(r: Result, procs: int) -> list[str]:
    return [
        fmt_cpu(r.meters.get("client"), procs),
        fmt_cpu(r.meters.get("upstream")),
        fmt_cpu(r.meters.get("gateway")) if r.path.through_gateway else "-",
        fmt_cpu(r.meters.get("host")),
    ]


CPU_HEADERS = ("client cpu", "upstream cpu", "proxy cpu", "host busy")


def print_requests(results: Sequence[Result], procs: int) -> None:
    headers = (
        "conc",
        "path",
        "reqs",
        "req/s",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "x p50",
        "+p99 ms",
        "proxy us/req",
        "req/s/proxy core",
        "err",
        *CPU_HEADERS,
    )
    rows = []
    for r in results:
        direct = direct_of(r, results)
        gw = r.path.through_gateway
        rows.append(
            [
                str(r.concurrency),
                r.path.label,
                str(r.completed),
                f"{r.rate:.0f}",
                fmt_ms(r.p(50)),
                fmt_ms(r.p(99)),
                f"{r.p(50) - direct.p(50):+.2f}" if gw else "-",
                fmt(ratio(r.p(50), direct.p(50)), 2, "x") if gw else "-",
                f"{r.p(99) - direct.p(99):+.2f}" if gw else "-",
                fmt(r.cpu_us(r.completed)) if gw else "-",
                fmt(r.per_core) if gw else "-",
                str(r.errors),
                *cpu_columns(r, procs),
            ]
        )
    print(table(headers, rows), flush=True)


def print_streams(results: Sequence[Result], procs: int) -> None:
    headers = (
        "client reads",
        "conc",
        "path",
        "streams/s",
        "events/s",
        "MB/s",
        "x direct",
        "proxy us/event",
        "proxy us/stream",
        "err",
        *CPU_HEADERS,
    )
    rows = []
    for r in results:
        direct = direct_of(r, results)
        gw = r.path.through_gateway
        rows.append(
            [
                r.client,
                str(r.concurrency),
                r.path.label,
                f"{r.rate:.1f}",
                f"{r.events / r.window:.0f}",
                f"{r.received / r.window / 1e6:.1f}",
                fmt(ratio(r.events, direct.events), 2, "x") if gw else "-",
                fmt(r.cpu_us(r.events), 2) if gw else "-",
                fmt(r.cpu_us(r.completed)) if gw else "-",
                str(r.errors),
                *cpu_columns(r, procs),
            ]
        )
    print(table(headers, rows), flush=True)


def direct_of(result: Result, results: Sequence[Result]) -> Result:
    """The direct run that ``result`` compares with (same kind, client, concurrency)."""
    return next(
        r
        for r in results
        if not r.path.through_gateway
        and (r.stream, r.client, r.concurrency, r.pinned)
        == (result.stream, result.client, result.concurrency, result.pinned)
    )


def floor_of(result: Result, results: Sequence[Result], label: str = FLOOR) -> Result | None:
    """The run of path ``label`` (a floor proxy) beside ``result`` (same kind, client,
    concurrency)."""
    return next(
        (
            r
            for r in results
            if r.path.label == label
            and (r.stream, r.client, r.concurrency, r.pinned)
            == (result.stream, result.client, result.concurrency, result.pinned)
        ),
        None,
    )


def floor_event_us(result: Result, results: Sequence[Result]) -> float | None:
    floor = floor_of(result, results)
    return floor.cpu_us(floor.events) if floor else None


def print_client_choice(requests: Sequence[Result], streams: Sequence[Result]) -> None:
    """The two floors side by side: the measurement behind the gateway's upstream client."""
    print(
        f"\nUpstream client (the bare proxy's CPU, same run): {FLOOR_KEYRELAY} = keyrelay's "
        f"client, {FLOOR} = aiohttp's"
    )
    results = [*requests, *streams]
    for r in results:
        ours = floor_of(r, results, FLOOR_KEYRELAY) if r.path.label == FLOOR else None
        if ours is None:
            continue
        if r.stream:
            unit, theirs_us, ours_us = "event", r.cpu_us(r.events), ours.cpu_us(ours.events)
        else:
            unit, theirs_us, ours_us = "request", r.cpu_us(r.completed), ours.cpu_us(ours.completed)
        what = f"stream, client reading {r.client}" if r.stream else "non-stream"
        x = ratio(ours_us, theirs_us) if ours_us and theirs_us else None
        print(
            f"  {what}, c={r.concurrency}: {fmt(ours_us, 2)} vs {fmt(theirs_us, 2)} us "
            f"per {unit} ({fmt(x, 2, 'x')})"
        )


def print_protocol_choice(requests: Sequence[Result], compared: Sequence[str]) -> None:
    """The gateway's HTTP protocol (the front door: uvicorn's httptools protocol with
    limits) beside uvicorn's own, same run: the measurement behind the front door."""
    if not compared:
        return
    print("\nHTTP protocol (plain route, non-stream, same run): gw plain = the front door")
    for concurrency in (1, HIGH_CONCURRENCY):
        rows = [r for r in requests if r.concurrency == concurrency]
        ours = next(r for r in rows if r.path.label == "gw plain")
        for label in compared:
            theirs = next(r for r in rows if r.path.label == label)
            us_ours, us_theirs = ours.cpu_us(ours.completed), theirs.cpu_us(theirs.completed)
            x = ratio(us_ours, us_theirs) if us_ours and us_theirs else None
            print(
                f"  c={concurrency}: {ours.rate:.0f} vs {theirs.rate:.0f} req/s, p50 "
                f"{fmt_ms(ours.p(50))} vs {fmt_ms(theirs.p(50))} ms, gateway CPU "
                f"{fmt(us_ours)} vs {fmt(us_theirs)} us/req ({fmt(x, 2, 'x')}) "
                f"[gw plain vs {label}]"
            )


def print_targets(
    requests: Sequence[Result], streams: Sequence[Result], gateway_labels: Sequence[str]
) -> None:
    print(f"\nTargets (per gateway route; in brackets the {FLOOR} proxy's value in the same run):")
    for label in gateway_labels:
        c1 = [r for r in requests if r.concurrency == 1]
        direct1 = next(r for r in c1 if not r.path.through_gateway)
        gw1 = next(r for r in c1 if r.path.label == label)
        added = gw1.p(50) - direct1.p(50)
        floor1 = floor_of(gw1, requests)
        floor_added = f"{floor1.p(50) - direct1.p(50):+.2f} ms" if floor1 else "n/a"
        print(
            f"  [{mark(added <= ADDED_P50_TARGET_MS)}] {label}: p50 added at concurrency 1 "
            f"<= +{ADDED_P50_TARGET_MS:g} ms: {added:+.2f} ms "
            f"({fmt_ms(gw1.p(50))} vs {fmt_ms(direct1.p(50))} direct) [{floor_added}]"
        )
        high = next(
            r for r in requests if r.concurrency == HIGH_CONCURRENCY and r.path.label == label
        )
        per_core = high.per_core
        floor_high = floor_of(high, requests)
        floor_per_core = fmt(floor_high.per_core if floor_high else None)
        print(
            f"  [{mark(per_core is not None and per_core >= PER_CORE_TARGET)}] {label}: "
            f">= {PER_CORE_TARGET:.0f} non-stream req/s per gateway core at concurrency "
            f"{HIGH_CONCURRENCY}: {fmt(per_core)} ({high.rate:.0f} req/s on "
            f"{fmt(high.gateway_cores, 2)} core) [{floor_per_core}]"
        )
        mine = [r for r in streams if r.path.label == label]
        for stream in mine:
            direct_stream = direct_of(stream, streams)
            x = ratio(stream.events, direct_stream.events)
            floor_stream = floor_of(stream, streams)
            floor_x = ratio(floor_stream.events, direct_stream.events) if floor_stream else None
            print(
                f"  [{mark(x is not None and x >= STREAM_RATIO_TARGET)}] {label}: streaming "
                f">= {STREAM_RATIO_TARGET:g}x direct, client reading {stream.client}: "
                f"{fmt(x, 2, 'x')} ({stream.events / stream.window:.0f} vs "
                f"{direct_stream.events / direct_stream.window:.0f} events/s) "
                f"[{fmt(floor_x, 2, 'x')}]"
            )
        costs = [(r.cpu_us(r.events), r) for r in mine]
        worst = max((us for us, _ in costs if us is not None), default=None)
        what = "untouched SSE event" if label == "gw plain" else "SSE event (tool table on)"
        each = ", ".join(
            f"{fmt(us, 2)} us ({r.client}) [{fmt(floor_event_us(r, streams), 2)}]"
            for us, r in costs
        )
        print(
            f"  [{mark(worst is not None and worst <= EVENT_CPU_TARGET_US)}] {label}: <= "
            f"{EVENT_CPU_TARGET_US:g} us gateway CPU per {what} (worst run): {each}"
        )


def print_pinned_targets(pinned: Sequence[Result], gateway_labels: Sequence[str]) -> None:
    """The pinned row's targets: events/s against direct and the proxy's CPU per event,
    beside the floor proxy's in the same run (in brackets)."""
    if not pinned:
        return
    direct = next(r for r in pinned if not r.path.through_gateway)
    floor = floor_of(direct, pinned)
    floor_x = ratio(floor.events, direct.events) if floor else None
    floor_us = floor.cpu_us(floor.events) if floor else None
    print(
        f"\nTargets of the pinned raw-chunk stream row (concurrency {direct.concurrency}; in "
        f"brackets the {FLOOR} proxy's value in the same run):"
    )
    for label in gateway_labels:
        r = next(x for x in pinned if x.path.label == label)
        x = ratio(r.events, direct.events)
        us = r.cpu_us(r.events)
        print(
            f"  [{mark(x is not None and x >= STREAM_RATIO_TARGET)}] {label}: pinned stream at "
            f"c={r.concurrency} >= {STREAM_RATIO_TARGET:g}x direct: {fmt(x, 2, 'x')} "
            f"({r.events / r.window:.0f} vs {direct.events / direct.window:.0f} events/s) "
            f"[{fmt(floor_x, 2, 'x')}]"
        )
        print(
            f"  [{mark(us is not None and us <= EVENT_CPU_TARGET_US)}] {label}: pinned stream at "
            f"c={r.concurrency}: <= {EVENT_CPU_TARGET_US:g} us gateway CPU per event: "
            f"{fmt(us, 2)} us [{fmt(floor_us, 2)}]"
        )


def client_us_per_event(r: Result) -> float | None:
    client = r.meters.get("client")
    if client is None or not r.events:
        return None
    return client / 100.0 * r.window / r.events * 1e6


def print_notes(results: Sequence[Result], procs: int) -> None:
    notes = []
    for r in results:
        client = r.meters.get("client")
        if client is not None and client >= SATURATED * procs:
            kind = "stream" if r.stream else "non-stream"
            notes.append(f"{r.path.label} {kind} c={r.concurrency} ({client:.0f}%)")
    if notes:
        print(
            "  note: the load generator was CPU-saturated in: " + ", ".join(notes) + "; there "
            "the client, not the gateway, set the pace (try --load-procs 2)"
        )
    for r in results:
        if not (r.stream and r.path.through_gateway and r.events):
            continue
        direct = direct_of(r, results)
        if direct.events and r.events > direct.events:
            mine, theirs = client_us_per_event(r), client_us_per_event(direct)
            print(
                f"  note: {r.path.label} streamed faster than direct with the client reading "
                f"{r.client}: the client spent {fmt(mine, 1)} us of CPU per event on the "
                f"proxy's framing (an HTTP chunk per proxy read) against {fmt(theirs, 1)} "
                "us on the upstream's: a client effect, not a proxy faster than none"
            )
    busy = [r.meters.get("host") for r in results]
    saturated = sum(1 for b in busy if b is not None and b >= SATURATED)
    if saturated:
        print(
            f"  note: the whole machine was CPU-saturated in {saturated} of {len(results)} "
            "windows (other load included): there the processes waited for a CPU, and latency "
            "and CPU-per-request numbers are inflated"
        )
    if os.cpu_count() and (os.cpu_count() or 0) <= 2:
        print(
            "  note: gateway, upstream and load generator share "
            f"{os.cpu_count()} cores; through the gateway the same work has one more process "
            "to schedule, so ratios are pessimistic against a gateway on its own machine"
        )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark `keyrelay gateway serve` against a fake upstream on loopback."
    )
    add_window_args(parser, quick_help="smoke run: 0.5 s windows")
    parser.add_argument("--load-procs", type=int, default=1, help="load-generator processes (1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="each scenario's window (and warm-up) split into this many rounds, the paths "
        "taking turns, so that drift of a shared machine hits every path alike (3; --quick 1)",
    )
    parser.add_argument("--stream-concurrency", type=int, default=4, help="in-flight streams (4)")
    parser.add_argument(
        "--stream-chunk",
        type=int,
        default=4096,
        help="bytes per HTTP chunk of the upstream's streams, 0: one chunk per event (4096)",
    )
    parser.add_argument(
        "--stream-client",
        choices=("lines", "chunks", "both"),
        default="both",
        help="how the load generator reads a stream: line by line like a minimal SSE client, "
        "raw chunks (the most the client can take: the gateway's ceiling), or both (both)",
    )
    parser.add_argument(
        "--pinned-concurrency",
        type=int,
        default=PINNED_CONCURRENCY,
        help="streams of the pinned row: raw-chunk clients, every proxy pinned to one core, "
        f"upstream and load generator to the other(s); 0: no pinned row ({PINNED_CONCURRENCY})",
    )
    parser.add_argument(
        "--compare-http",
        default="httptools",
        type=lambda value: [v for v in value.split(",") if v],
        help="comma-separated uvicorn HTTP protocols (httptools, h11) each run by one more "
        "gateway, measured on the plain route in the non-stream rows beside the gateway's "
        "front door (uvicorn's httptools protocol with the limits); '' for none (httptools)",
    )
    args = parser.parse_args(argv)
    resolve_window_args(parser, args)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.load_procs < 1 or args.stream_concurrency < 1 or args.stream_chunk < 0:
        parser.error("--load-procs and --stream-concurrency must be >= 1, --stream-chunk >= 0")
    if args.pinned_concurrency < 0:
        parser.error("--pinned-concurrency must be >= 0")
    return args


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    tmp = temp_dir(stack, "keyrelay-bench-gw-")
    print(
        f"keyrelay gateway benchmark: {os.cpu_count()} cpu(s), Python "
        f"{platform.python_version()}, uvicorn {uvicorn.__version__}, aiohttp "
        f"{aiohttp.__version__}; window {args.seconds:g} s after {args.warmup:g} s warm-up; "
        f"load generator: {args.load_procs} separate process(es), aiohttp, closed loop",
        flush=True,
    )
    load = LoadGenerator(args.load_procs)
    stack.callback(load.stop)
    upstream, upstream_url = start_upstream(stack, tmp, args.stream_chunk)
    routes = [Route("plain", new_key()), Route("tools", new_key())]
    gateway, gateway_url = start_gateway(stack, tmp, upstream_url, routes)
    floor, floor_url = start_floor(stack, tmp, upstream_url, "aiohttp")
    floor_kr, floor_kr_url = start_floor(stack, tmp, upstream_url, "keyrelay")
    paths = [
        Target("direct", upstream_url, client_headers(None)),
        Target(FLOOR, floor_url, client_headers(None), floor),
        Target(FLOOR_KEYRELAY, floor_kr_url, client_headers(None), floor_kr),
    ]
    paths += [Target(f"gw {r.label}", gateway_url, client_headers(r.key), gateway) for r in routes]
    asyncio.run(preflight(paths))
    print(
        "preflight: every path answers; the plain route forwards the stream byte-for-byte, "
        f"the tools route maps {TOOL_PREFIX}get_weather back to get_weather",
        flush=True,
    )
    bench = Bench(load, gateway, upstream, args)

    # --compare-http: the plain route on a gateway with another HTTP protocol, in the
    # non-stream rows only (the front door's cost is per request, not per event).
    compared: list[Target] = []
    for protocol in args.compare_http:
        service, url = start_gateway(stack, tmp, upstream_url, routes, protocol)
        label = f"gw plain/{protocol}"
        compared.append(Target(label, url, client_headers(routes[0].key), service))
    if compared:
        asyncio.run(preflight(compared))
    requests: list[Result] = []
    for concurrency in (1, HIGH_CONCURRENCY):
        measured = interleaved(
            [*paths, *compared],
            args.rounds,
            functools.partial(bench.measure, stream=False, concurrency=concurrency),
        )
        requests += measured
        for r in measured:
            print(
                f"  non-stream, concurrency {concurrency}, {r.path.label}: {r.rate:.0f} req/s, "
                f"p50 {fmt_ms(r.p(50))} ms",
                flush=True,
            )
    streams: list[Result] = []
    clients = ("lines", "chunks") if args.stream_client == "both" else (args.stream_client,)
    for client in clients:
        measured = interleaved(
            paths,
            args.rounds,
            functools.partial(
                bench.measure, stream=True, concurrency=args.stream_concurrency, client=client
            ),
        )
        streams += measured
        for r in measured:
            print(
                f"  stream, concurrency {args.stream_concurrency}, client reading {client}, "
                f"{r.path.label}: {r.events / r.window:.0f} events/s",
                flush=True,
            )
    # The pinned row: every proxy on one core, so that it sets the pace.
    pinned: list[Result] = []
    pinning: str | None = None
    if args.pinned_concurrency:
        proxies = list({p.proxy.pid: p.proxy for p in paths if p.proxy is not None}.values())
        with pinned_cpus(proxies, [upstream.pid, *load.pids]) as pinning:
            pinned = interleaved(
                paths,
                args.rounds,
                functools.partial(
                    bench.measure,
                    stream=True,
                    concurrency=args.pinned_concurrency,
                    client="chunks",
                    pinned=True,
                ),
            )
        for r in pinned:
            print(
                f"  stream, pinned, concurrency {args.pinned_concurrency}, client reading "
                f"chunks, {r.path.label}: {r.events / r.window:.0f} events/s",
                flush=True,
            )

    print("\n== Results ==")
    print(
        "(cpu: % of one core over the window: client = all load processes, proxy = the "
        f"gateway's or the floor proxy's process; host busy: % of all {os.cpu_count()} cores, "
        "other load on the machine included; SAT = saturated)"
    )
    print("\nNon-stream POST /v1/messages (+/x: against direct at the same concurrency):")
    print_requests(requests, args.load_procs)
    chunking = f"{args.stream_chunk}-byte HTTP chunks" if args.stream_chunk else "one per event"
    print(
        f"\nStreaming: {EVENTS}-event stream ({len(build_stream(EVENTS))} bytes, {chunking}) "
        f"at concurrency {args.stream_concurrency} (client reads lines: line by line, an event "
        "per blank line, like a minimal SSE client; chunks: raw reads, blank lines counted, "
        "nearly free, so the gateway sets the pace):"
    )
    print_streams(streams, args.load_procs)
    if pinned:
        print(
            f"\nStreaming, pinned: the same stream read as raw chunks at concurrency "
            f"{args.pinned_concurrency}, {pinning or 'not pinned (a single CPU)'}:"
        )
        print_streams(pinned, args.load_procs)
    print_client_choice(requests, streams)
    print_protocol_choice(requests, [p.label for p in compared])
    print_targets(requests, streams, [p.label for p in paths if p.proxy is gateway])
    print_pinned_targets(pinned, [p.label for p in paths if p.proxy is gateway])
    print_notes(requests + streams + pinned, args.load_procs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(lambda stack: run(args, stack))


if __name__ == "__main__":
    sys.exit(main())
