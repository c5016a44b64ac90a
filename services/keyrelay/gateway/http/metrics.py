"""Prometheus metrics of a gateway worker (served on ``GET /metrics``).

Label values are bounded: ``route`` is the configured key name, ``account``
a configured account, ``status`` an HTTP status, ``mode``/``billing`` enums.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keyrelay.gateway.http.upstream import WAIT_BUCKETS, PoolStats
from keyrelay.gateway.limits_store import LimitsStore
from keyrelay.log_limit import LineLimiter

M = TypeVar("M", Counter, Histogram)


class Children(Generic[M]):
    """``metric.labels(*values)``, looked up once per label set.

    ``labels()`` stringifies, locks and builds a key on every call; the hot path
    calls this instead. The cache is as bounded as the label values are.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


# Limits store calls are one Redis round trip: sub-millisecond, up to the store's timeout.
STORE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BOUNDS: Final = (*LATENCY_BUCKETS, math.inf)


class Tally:
    """The hot path's increments and observations in plain numbers, folded into
    the metric children whenever the registry is read (``fold``).

    ``Counter.inc`` and ``Histogram.observe`` take a lock per value (nine per
    request); a dict update costs a fraction. Everything runs on the worker's
    event loop, scrapes included, so nothing is locked. A histogram's tally is
    ``[sum, count in bucket 0, ...]`` (not cumulative, as ``observe`` counts).
    """

    __slots__ = ("_counts", "_observed")

    def __init__(self) -> None:
        self._counts: dict[Counter, float] = {}
        self._observed: dict[Histogram, list[float]] = {}

    def inc(self, child: Counter, amount: float = 1) -> None:
        counts = self._counts
        counts[child] = counts.get(child, 0) + amount

    def observe(self, child: Histogram, value: float) -> None:
        tally = self._observed.get(child)
        if tally is None:
            tally = self._observed[child] = [0.0] * (len(_BOUNDS) + 1)
        tally[0] += value
        # The first bound >= value: the bucket Histogram.observe would count.
        tally[1 + bisect_left(_BOUNDS, value)] += 1

    def fold(self) -> None:
        counts, self._counts = self._counts, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        observed, self._observed = self._observed, {}
        for histogram, tally in observed.items():
            # Histogram has no public "add n observations": its sum and buckets.
            histogram._sum.inc(tally[0])
            for bucket, count in zip(histogram._buckets, tally[1:], strict=True):
                if count:
                    bucket.inc(count)


class _FoldOnCollect(Collector):
    """Registered first: the registry collects it before the metrics it feeds."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no metrics of its own

    def collect(self) -> Iterator[Metric]:
        self._tally.fold()
        return iter(())


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.tally = Tally()
        r.register(_FoldOnCollect(self.tally))
        self.upstream_pools = UpstreamPoolMetrics(r)
        self.requests = Counter(
            "keyrelay_gateway_requests",
            "Requests answered, by route, HTTP status and auth mode used",
            ["route", "status", "mode"],
            registry=r,
        )
        self.latency = Histogram(
            "keyrelay_gateway_request_seconds",
            "Time from request to the last byte of the response",
            ["route", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "keyrelay_gateway_upstream_seconds",
            "Time until the upstream's response headers arrived",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "keyrelay_gateway_tokens",
            "Model tokens by account, billing and kind (input, output, cache_creation, cache_read)",
            ["account", "billing", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "keyrelay_gateway_cost_usd",
            "Cost in USD by account and billing (included: always 0)",
            ["account", "billing"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "keyrelay_gateway_upstream_auth_retries",
            "Requests retried once with a newer token after an upstream 401",
            ["route"],
            registry=r,
        )
        self.stream_errors = Counter(
            "keyrelay_gateway_stream_errors",
            "Streams that ended with an SSE error event after their headers were sent (an "
            "upstream cut, an event over max_event_bytes, a stall, bytes that are not UTF-8), "
            "by route",
            ["route"],
            registry=r,
        )
        self.readiness_checks = Counter(
            "keyrelay_gateway_readiness_checks",
            "Answers of /readyz by result (ready, auth_unreachable, token_refused, keys_loading)",
            ["result"],
            registry=r,
        )
        self.limit_decisions = Counter(
            "keyrelay_gateway_limit_decisions",
            "Admissions of requests of keys with limits (theirs or their account's), by route, "
            "outcome (allowed; limited, budget: 429; store_error: the limits store unreachable) "
            "and the limit that refused (requests, tokens, concurrent, budget; - when none did)",
            ["route", "outcome", "limit"],
            registry=r,
        )
        self.limits_store_seconds = Histogram(
            "keyrelay_gateway_limits_store_seconds",
            "Time of a limits store call (admit, finish), failed ones included",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.limits_store_errors = Counter(
            "keyrelay_gateway_limits_store_errors",
            "Limits store calls that failed (unreachable, timed out, refused), by operation",
            ["operation"],
            registry=r,
        )
        self.limits_usage_dropped = Counter(
            "keyrelay_gateway_limits_usage_dropped",
            "Usage records (and lease releases) of finished requests the limits store never "
            "took, by reason (full: too many waiting; unavailable: not taken after retries); "
            "their leases expire",
            ["reason"],
            registry=r,
        )
        self.limits_finishes_pending = Gauge(
            "keyrelay_gateway_limits_finishes_pending",
            "Usage records of finished requests not yet taken by the limits store "
            "(queued, in flight, or waiting to be sent again); at most max_finishes",
            registry=r,
        )
        self.limits_tickets_held = Gauge(
            "keyrelay_gateway_limits_tickets_held",
            "Admissions this worker holds ahead (grants of the limits store), unused",
            registry=r,
        )
        self.pool_attempts = Counter(
            "keyrelay_gateway_pool_attempts",
            "Pool members tried for requests of pool keys, by pool, member and result "
            "(served: its answer went to the client; cooled: 429, 529 or overloaded, the "
            "next member was tried; no_credential: disconnected or no token)",
            ["pool", "member", "result"],
            registry=r,
        )
        self.runtime_keys = Gauge(
            "keyrelay_gateway_runtime_keys",
            "Keys created at runtime (on the auth service) this worker serves",
            registry=r,
        )
        self.runtime_keys_refused = Counter(
            "keyrelay_gateway_runtime_keys_refused",
            "Runtime keys not taken, by reason (shadows_config, unknown_profile, "
            "unknown_upstream, unknown_pool, needs_api_key, no_account, bad_limits, "
            "no_limits_store), each time one is loaded or changes",
            ["reason"],
            registry=r,
        )
        self.runtime_key_loads = Counter(
            "keyrelay_gateway_runtime_key_loads",
            "Full loads of the runtime keys (ListKeys), by result (ok, error)",
            ["result"],
            registry=r,
        )
        # The front door's connection and rejection counts (``FrontDoorCounts``).
        self.front_door = FrontDoorCounts()
        r.register(_FrontDoorCollector(self.front_door))
        # The children of each metric, cached (see ``Children``).
        self.requests_for = Children(self.requests)
        self.latency_for = Children(self.latency)
        self.upstream_latency_for = Children(self.upstream_latency)
        self.tokens_for = Children(self.tokens)
        self.cost_for = Children(self.cost)
        self.stream_errors_for = Children(self.stream_errors)
        self.limit_decisions_for = Children(self.limit_decisions)
        self.pool_attempts_for = Children(self.pool_attempts)
        self._store_seconds_for = Children(self.limits_store_seconds)
        self._store_errors_for = Children(self.limits_store_errors)

    def observe_store(self, operation: str, outcome: str, seconds: float) -> None:
        """The limits store's ``observe`` hook: every call's time, and its failures."""
        if seconds > 0.0:  # 0.0: answered without a round trip
            self._store_seconds_for(operation).observe(seconds)
        if outcome == "error":
            self._store_errors_for(operation).inc()

    def watch_limits_store(self, store: LimitsStore) -> None:
        """The store's finishes waiting and tickets held, read at scrape time."""
        self.limits_finishes_pending.set_function(lambda: store.finishes_pending)
        self.limits_tickets_held.set_function(lambda: store.tickets_held)

    def watch_token_cache(self, cache: TokenCacheCounts) -> None:
        """Exports the cache's own counters at scrape time (nothing on the hot path)."""
        self.registry.register(_TokenCacheCollector(cache))


class TokenCacheCounts(Protocol):
    hits: int
    misses: int
    rpcs: int

    @property
    def disconnected(self) -> Collection[str]:
        """Accounts known to be disconnected (pools skip their members)."""


# Why a request was refused before the app saw it whole (and the status it got).
REJECT_REASONS: Final = (
    "header_bytes",  # 431: request line + headers over max_header_bytes
    "header_count",  # 431: more than max_header_count headers
    "header_timeout",  # 408: the head did not end within header_timeout_seconds
    "body_timeout",  # 408: the body did not end within body_timeout_seconds of the head
    "body_too_large",  # 413: the body over max_request_bytes
    "bad_request",  # 400: not HTTP/1.1 the parser accepts (smuggling shapes included)
)
# Why the gateway closed a connection without an answer to a request on it.
CLOSE_REASONS: Final = (
    "idle",  # a new connection sent nothing within first_byte_timeout_seconds
    "unread_body",  # answered before its body ended; the rest was not read
)
FRONT_DOOR_LOG_INTERVAL: Final = 10.0  # seconds between two log lines of one reason


class FrontDoorCounts:
    """The front door's numbers as plain ints, kept by the worker's HTTP protocol
    (``gateway.http.front_door``) and exported at scrape time, with the limiter
    of its log lines (one line per reason per ``FRONT_DOOR_LOG_INTERVAL``)."""

    __slots__ = ("closed", "lines", "open", "refused", "rejected")

    def __init__(self) -> None:
        self.open = 0
        self.refused = 0
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self.lines: LineLimiter[str] = LineLimiter(FRONT_DOOR_LOG_INTERVAL)


class _FrontDoorCollector(Collector):
    def __init__(self, counts: FrontDoorCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts
        yield GaugeMetricFamily(
            "keyrelay_gateway_open_connections",
            "Client connections open in this worker (at most max_connections)",
            value=counts.open,
        )
        yield CounterMetricFamily(
            "keyrelay_gateway_refused_connections",
            "Connections answered 503 and closed: the worker had max_connections open",
            value=counts.refused,
        )
        rejected = CounterMetricFamily(
            "keyrelay_gateway_rejected_requests",
            "Requests refused before the app had them whole, by reason "
            "(header_bytes, header_count: 431; header_timeout, body_timeout: 408; "
            "body_too_large: 413; "
            "bad_request: 400)",
            labels=["reason"],
        )
        for reason, count in counts.rejected.items():
            rejected.add_metric([reason], count)
        yield rejected
        closed = CounterMetricFamily(
            "keyrelay_gateway_closed_connections",
            "Connections the gateway closed, by reason (idle: no first byte within "
            "first_byte_timeout_seconds; unread_body: answered before the body ended)",
            labels=["reason"],
        )
        for reason, count in counts.closed.items():
            closed.add_metric([reason], count)
        yield closed


class _TokenCacheCollector(Collector):
    def __init__(self, cache: TokenCacheCounts) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "keyrelay_gateway_token_cache",
            "Token lookups by result (hit: served from the worker's cache; miss: GetToken)",
            labels=["result"],
        )
        lookups.add_metric(["hit"], self._cache.hits)
        lookups.add_metric(["miss"], self._cache.misses)
        yield lookups
        rpcs = CounterMetricFamily(
            "keyrelay_gateway_get_token_rpcs", "GetToken calls made to the auth service"
        )
        rpcs.add_metric([], self._cache.rpcs)
        yield rpcs
        disconnected = GaugeMetricFamily(
            "keyrelay_gateway_accounts_disconnected",
            "Accounts this worker knows to be disconnected (pools skip their members)",
        )
        disconnected.add_metric([], len(self._cache.disconnected))
        yield disconnected


class UpstreamPoolMetrics(Collector):
    """The upstream pools: gauges of their connections and waiting requests, the
    wait histogram and the refusals, brought up to date from the pools' own counts
    (``Upstreams.stats``) whenever the registry is read: nothing on the hot path.

    Registered as a collector of no metrics of its own, before the metrics it
    sets, so a scrape sees them current (as ``_FoldOnCollect`` does).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        registry.register(self)
        labels = ["upstream"]
        self.open = Gauge(
            "keyrelay_gateway_upstream_connections_open",
            "Connections to the upstream open or being opened (at most max_connections)",
            labels,
            registry=registry,
        )
        self.in_use = Gauge(
            "keyrelay_gateway_upstream_connections_in_use",
            "Connections carrying a request, or being opened for one",
            labels,
            registry=registry,
        )
        self.idle = Gauge(
            "keyrelay_gateway_upstream_connections_idle",
            "Idle keep-alive connections (closed after idle_timeout_seconds)",
            labels,
            registry=registry,
        )
        self.waiting = Gauge(
            "keyrelay_gateway_upstream_pool_waiting",
            "Requests waiting for a connection (at most max_waiting)",
            labels,
            registry=registry,
        )
        self.wait = Histogram(
            "keyrelay_gateway_upstream_pool_wait_seconds",
            "Time a request waited for a pooled connection (0 when one was free)",
            labels,
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "keyrelay_gateway_upstream_pool_rejected",
            "Requests answered 503 for want of a connection, by reason "
            "(timeout: none free within pool_timeout_seconds; queue_full: max_waiting waited)",
            ["upstream", "reason"],
            registry=registry,
        )
        self._source: Callable[[], Iterable[PoolStats]] | None = None
        self._folded: dict[str, PoolStats] = {}

    def watch(self, source: Callable[[], Iterable[PoolStats]]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no metrics of its own

    def collect(self) -> Iterator[Metric]:
        if self._source is not None:
            for stats in self._source():
                self._update(stats)
        return iter(())

    def _update(self, stats: PoolStats) -> None:
        name = stats.upstream
        self.open.labels(name).set(stats.open)
        self.in_use.labels(name).set(stats.in_use)
        self.idle.labels(name).set(stats.idle)
        self.waiting.labels(name).set(stats.waiting)
        before = self._folded.get(name)
        self._folded[name] = stats
        if before is None or any(
            now < then for now, then in zip(stats.wait_buckets, before.wait_buckets, strict=True)
        ):  # the first scrape, or a pool made anew: everything counted is new
            before = PoolStats(name, 0, 0, 0, (0,) * len(stats.wait_buckets), 0.0, 0, 0)
        # The counters and the histogram get what was counted since the last scrape
        # (a Histogram has no public "add n observations": its sum and buckets).
        histogram = self.wait.labels(name)
        histogram._sum.inc(max(0.0, stats.wait_sum - before.wait_sum))
        for bucket, now, then in zip(
            histogram._buckets, stats.wait_buckets, before.wait_buckets, strict=True
        ):
            if now > then:
                bucket.inc(now - then)
        for reason, now, then in (
            ("timeout", stats.rejected_timeout, before.rejected_timeout),
            ("queue_full", stats.rejected_queue_full, before.rejected_queue_full),
        ):
            if now > then:
                self.rejected.labels(name, reason).inc(now - then)
