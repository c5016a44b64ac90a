"""The README's metric tables and the metrics the code registers are the same set.

Every keyrelay module is imported (so every module-level metric registers),
the gateway's per-app registry is built the way a worker builds it, and the
names and label sets are compared with the README's ``| `metric` | labels |``
rows in both directions: documentation cannot drift from the code.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.registry import Collector

import keyrelay
from keyrelay.gateway.http.metrics import GatewayMetrics

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(keyrelay_[a-z0-9_]+)`[^|]*\|([^|]*)\|\s*$")


def documented() -> dict[str, frozenset[str]]:
    rows: dict[str, frozenset[str]] = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            name, labels = match.groups()
            without_values = re.sub(r"\([^)]*\)", "", labels)  # "(`hit`, `miss`)" are values
            assert name not in rows, f"{name} documented twice"
            rows[name] = frozenset(re.findall(r"`([a-z_]+)`", without_values))
    return rows


class _Counts:
    hits = misses = rpcs = 0
    disconnected: frozenset[str] = frozenset()


def _exposed(registry: CollectorRegistry, prefix: str) -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {}
    collectors: list[Collector] = list(registry._collector_to_names)
    for collector in collectors:
        for family in collector.collect():
            if not family.name.startswith(prefix):
                continue
            name = family.name + ("_total" if family.type == "counter" else "")
            labelnames = getattr(collector, "_labelnames", None)
            if labelnames is None:  # a custom collector: its samples carry the labels
                labelnames = {k for s in family.samples for k in s.labels if k != "le"}
            found[name] = frozenset(labelnames)
    return found


def registered() -> dict[str, frozenset[str]]:
    for module in pkgutil.walk_packages(keyrelay.__path__, "keyrelay."):
        if not module.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(module.name)
    gateway = GatewayMetrics()
    gateway.watch_token_cache(_Counts())
    return {**_exposed(REGISTRY, "keyrelay_"), **_exposed(gateway.registry, "keyrelay_")}


def test_every_registered_metric_is_documented_with_its_labels() -> None:
    docs = documented()
    code = registered()
    assert set(code) - set(docs) == set(), "registered but not in README.md"
    assert set(docs) - set(code) == set(), "in README.md but registered by no code"
    for name, labels in code.items():
        assert docs[name] == labels, name


def test_both_services_have_metrics() -> None:
    code = registered()
    assert any(name.startswith("keyrelay_auth_") for name in code)
    assert any(name.startswith("keyrelay_gateway_") for name in code)
