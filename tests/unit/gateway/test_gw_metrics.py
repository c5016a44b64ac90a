"""``Tally``: the hot path's metric updates, folded in when the registry is read."""

from __future__ import annotations

from prometheus_client import generate_latest

from keyrelay.gateway.http.metrics import LATENCY_BUCKETS, GatewayMetrics

# On and around every bound, beyond the last one, and 0.
VALUES = [0.0, 0.001, *LATENCY_BUCKETS, *(b + 1e-9 for b in LATENCY_BUCKETS), 301.0, 1e6]


def exposition(metrics: GatewayMetrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_tallied_updates_read_as_direct_ones() -> None:
    direct, tallied = GatewayMetrics(), GatewayMetrics()
    for value in VALUES:
        direct.latency_for("plain", "false").observe(value)
        tallied.tally.observe(tallied.latency_for("plain", "false"), value)
        direct.upstream_latency_for("default").observe(value / 2)
        tallied.tally.observe(tallied.upstream_latency_for("default"), value / 2)
    for route, status in [("plain", "200"), ("plain", "200"), ("-", "401")]:
        direct.requests_for(route, status, "metered").inc()
        tallied.tally.inc(tallied.requests_for(route, status, "metered"))
    direct.tokens_for("acct", "included", "input").inc(25)
    tallied.tally.inc(tallied.tokens_for("acct", "included", "input"), 25)
    direct.cost_for("-", "metered").inc(0.00125)
    tallied.tally.inc(tallied.cost_for("-", "metered"), 0.00125)
    assert exposition(tallied) == exposition(direct)
    assert 'keyrelay_gateway_requests_total{mode="metered",route="plain",status="200"} 2.0' in (
        exposition(tallied)
    )
    # Folded once: reading again adds nothing; later updates add to what was folded.
    assert exposition(tallied) == exposition(direct)
    direct.requests_for("plain", "200", "metered").inc()
    tallied.tally.inc(tallied.requests_for("plain", "200", "metered"))
    assert exposition(tallied) == exposition(direct)


def test_registry_collect_folds_first() -> None:
    metrics = GatewayMetrics()
    metrics.tally.inc(metrics.requests_for("plain", "200", "metered"))
    value = metrics.registry.get_sample_value(
        "keyrelay_gateway_requests_total", {"route": "plain", "status": "200", "mode": "metered"}
    )
    assert value == 1.0


def test_disconnected_accounts_are_read_at_scrape_time() -> None:
    class Tokens:
        hits = misses = rpcs = 0

        def __init__(self) -> None:
            self.disconnected: set[str] = set()

    metrics, tokens = GatewayMetrics(), Tokens()
    metrics.watch_token_cache(tokens)
    name = "keyrelay_gateway_accounts_disconnected"
    assert metrics.registry.get_sample_value(name) == 0.0
    tokens.disconnected |= {"a", "b"}
    assert metrics.registry.get_sample_value(name) == 2.0
    tokens.disconnected.discard("a")
    assert metrics.registry.get_sample_value(name) == 1.0
