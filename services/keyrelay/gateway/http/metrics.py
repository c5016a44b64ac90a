"""Prometheus metrics of a gateway worker (served on ``GET /metrics``).

Label values are bounded: ``route`` is the configured key name, ``account``
a configured account, ``status`` an HTTP status, ``mode``/``billing`` enums.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

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
        # The children of each metric, cached (see ``Children``).
        self.requests_for = Children(self.requests)
        self.latency_for = Children(self.latency)
        self.upstream_latency_for = Children(self.upstream_latency)
        self.tokens_for = Children(self.tokens)
        self.cost_for = Children(self.cost)

    def watch_token_cache(self, cache: TokenCacheCounts) -> None:
        """Exports the cache's own counters at scrape time (nothing on the hot path)."""
        self.registry.register(_TokenCacheCollector(cache))


class TokenCacheCounts(Protocol):
    hits: int
    misses: int
    rpcs: int


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
