"""Prometheus metrics of an auth replica, in prometheus_client's default registry.

The auth service's HTTP side serves that registry on ``/metrics``; this module
only defines and updates the metrics. They are module-level (one set per
process, however many servers a test starts in it) and every hot-path update
goes through a label child bound once, so an RPC costs two dict lookups, an
``inc`` and an ``observe``.

Label values are bounded: ``method`` an AuthService RPC, ``code`` a gRPC
status name, ``provider`` a configured provider, the rest enums. Never an
account id (unbounded), token or code.
"""

from __future__ import annotations

from typing import Final

import grpc
from prometheus_client import Counter, Gauge, Histogram

RPC_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_ENDPOINT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REFRESH_OUTCOMES: Final = (
    "refreshed",
    "fenced",
    "invalid_grant",
    "transient",
    "misconfigured",
    "not_sent",
    "answer_lost",
)
EVENT_KINDS: Final = ("CONNECTED", "REFRESHED", "DISCONNECTED", "REFRESH_FAILED", "KEY_CHANGED")

RPCS: Final = Counter(
    "keyrelay_auth_rpcs",
    "AuthService RPCs answered, by method and gRPC status",
    ["method", "code"],
)
RPC_SECONDS: Final = Histogram(
    "keyrelay_auth_rpc_seconds",
    "Time to answer an AuthService RPC (WatchEvents: how long the stream lasted)",
    ["method"],
    buckets=RPC_BUCKETS,
)
REFRESHES: Final = Counter(
    "keyrelay_auth_refreshes",
    "Token-endpoint refresh attempts made by this replica, by provider and outcome",
    ["provider", "outcome"],
)
TOKEN_ENDPOINT_SECONDS: Final = Histogram(
    "keyrelay_auth_token_endpoint_seconds",
    "Duration of token-endpoint calls (refresh, exchange of a code, revocation)",
    ["provider", "call"],
    buckets=TOKEN_ENDPOINT_BUCKETS,
)
LOCK_WAITS: Final = Counter(
    "keyrelay_auth_lock_waits",
    "Times this replica waited for another replica's refresh (the account's lock was held)",
)
FORCED_REFRESHES_REFUSED: Final = Counter(
    "keyrelay_auth_forced_refreshes_refused",
    "Reports of a rejected token (stale_generation) answered with the current token because "
    "a forced refresh of the account was made less than forced_refresh_cooldown_seconds ago",
)
EVENTS: Final = Counter(
    "keyrelay_auth_events",
    "Account events this replica appended to the event stream, by kind",
    ["kind"],
)
STORE_ERRORS: Final = Counter(
    "keyrelay_auth_store_errors",
    "Token-store operations that failed, by operation (a RedisStore method, e.g. get_account; "
    "ping for a readiness check) and kind (the exception class, e.g. ConnectionError; "
    "deadline for a readiness check without an answer in time)",
    ["operation", "kind"],
)
READINESS_RESULTS: Final = ("ready", "not_ready", "timeout")
READINESS_CHECKS: Final = Counter(
    "keyrelay_auth_readiness_checks",
    "Checks of the token store for /readyz (concurrent probes share one), by result",
    ["result"],
)

_EVENTS: Final = {kind: EVENTS.labels(kind) for kind in EVENT_KINDS}
_READINESS: Final = {result: READINESS_CHECKS.labels(result) for result in READINESS_RESULTS}


class RpcMetrics:
    """The metrics of one RPC method, label children bound once."""

    __slots__ = ("_codes", "_seconds", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self._seconds = RPC_SECONDS.labels(method)
        self._codes: dict[grpc.StatusCode, Counter] = {}

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = RPCS.labels(self.method, code.name)
        counter.inc()
        self._seconds.observe(seconds)


_RPC: dict[str, RpcMetrics] = {}


def rpc(method: str) -> RpcMetrics:
    """``method`` is the short name (``GetToken``); one ``RpcMetrics`` per name."""
    metrics = _RPC.get(method)
    if metrics is None:
        metrics = _RPC[method] = RpcMetrics(method)
    return metrics


def event(kind: str) -> None:
    _EVENTS[kind].inc()


def refresh(provider: str, outcome: str) -> None:
    REFRESHES.labels(provider, outcome).inc()


def token_endpoint(provider: str, call: str, seconds: float) -> None:
    TOKEN_ENDPOINT_SECONDS.labels(provider, call).observe(seconds)


def store_error(operation: str, kind: str) -> None:
    STORE_ERRORS.labels(operation, kind).inc()


def readiness(result: str) -> None:
    _READINESS[result].inc()


# -- WatchEvents fan-out (keyrelay.auth.events) ------------------------------------------

WATCH_SUBSCRIBERS: Final = Gauge(
    "keyrelay_auth_watch_subscribers",
    "WatchEvents subscribers this replica serves (live and catching up from history)",
)
WATCH_FANNED_OUT: Final = Counter(
    "keyrelay_auth_watch_events_fanned_out",
    "Events handed to WatchEvents subscribers (one per event per subscriber), by source: "
    "live (from memory) or history (read from Redis for a subscriber behind)",
    ["source"],
)
WATCH_CUT: Final = Counter(
    "keyrelay_auth_watch_subscribers_cut",
    "WatchEvents subscribers cut (RESOURCE_EXHAUSTED) for falling more than "
    "events_subscriber_queue events behind",
)
WATCH_REFUSED: Final = Counter(
    "keyrelay_auth_watch_subscribers_refused",
    "WatchEvents calls refused (RESOURCE_EXHAUSTED) at events_max_subscribers",
)
WATCH_READER_UP: Final = Gauge(
    "keyrelay_auth_watch_reader_up",
    "1 while this replica's reader of the event stream reads it, 0 while Redis fails it",
)
_FANNED_OUT: Final = {source: WATCH_FANNED_OUT.labels(source) for source in ("live", "history")}


def watch_events_fanned_out(source: str, count: int) -> None:
    _FANNED_OUT[source].inc(count)
