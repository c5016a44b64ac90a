"""Token usage of one request, and what it cost. No I/O.

Where usage comes from
    - a JSON response: its top-level ``usage`` object;
    - a stream: ``message_start`` carries ``message.usage`` (input and cache
      tokens, and a first output count), then each ``message_delta`` carries a
      ``usage`` whose counts are cumulative. So every count that is present and
      valid replaces the earlier value of that field; absent, ``null`` or
      garbage values leave it as it was (``UsageTracker``).

A count is valid when it is a non-negative integer (a float with an integral
value is accepted; booleans are not). Anything else is treated as missing, so a
malformed usage object never breaks a response.

Cost
    ``billing`` is ``included`` (an OAuth subscription pays: cost 0) or
    ``metered`` (an API key: tokens times the price table). Prices are USD per
    million tokens for the four kinds of tokens. A table entry is either an
    exact model name or a prefix ending in ``*`` (``claude-sonnet-4*``); an exact
    entry wins, then the longest matching prefix (a lone ``*`` is the fallback).
    A metered request whose model has no price costs ``None`` ("unknown"), not 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum

__all__ = [
    "Billing",
    "Price",
    "PriceTable",
    "Usage",
    "UsageTracker",
    "usage_from_body",
    "usage_from_object",
]

_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


class Billing(StrEnum):
    INCLUDED = "included"
    METERED = "metered"


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
        )


def _count(value: object) -> int | None:
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float and value.is_integer() and value >= 0:
        return int(value)
    return None


def _counts(usage: object) -> dict[str, int]:
    """The valid counts of a ``usage`` object; empty when it is not one."""
    if not isinstance(usage, dict):
        return {}
    found: dict[str, int] = {}
    for name in _FIELDS:
        count = _count(usage.get(name))
        if count is not None:
            found[name] = count
    return found


def usage_from_object(usage: object) -> Usage | None:
    """A ``usage`` JSON object as ``Usage`` (missing counts are 0); ``None`` if not an object."""
    if not isinstance(usage, dict):
        return None
    return Usage(**_counts(usage))


def usage_from_body(body: object) -> Usage | None:
    """The usage of a decoded non-streaming response (its top-level ``usage``)."""
    if not isinstance(body, dict):
        return None
    return usage_from_object(body.get("usage"))


class UsageTracker:
    """Accumulates usage (and the model) over the events of one stream."""

    __slots__ = ("_counts", "_seen", "model")

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._seen = False
        self.model: str | None = None

    @property
    def seen(self) -> bool:
        """True once a usage-bearing event was read."""
        return self._seen

    @property
    def usage(self) -> Usage:
        return Usage(**self._counts)

    def observe(self, data: object) -> None:
        """Read the decoded ``data`` of any event; only usage-bearing ones count."""
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                model = message.get("model")
                if isinstance(model, str):
                    self.model = model
                self._merge(message.get("usage"))
        elif kind == "message_delta":
            self._merge(data.get("usage"))

    def _merge(self, usage: object) -> None:
        if isinstance(usage, dict):
            self._seen = True
            self._counts.update(_counts(usage))


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Cache prices default to Anthropic's multipliers
    of the input price (5-minute cache write 1.25x, cache read 0.1x)."""

    input: float
    output: float
    cache_creation: float | None = None
    cache_read: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"price {f.name} must be a non-negative number, got {value!r}")

    def cost(self, usage: Usage) -> float:
        cache_creation = self.input * 1.25 if self.cache_creation is None else self.cache_creation
        cache_read = self.input * 0.1 if self.cache_read is None else self.cache_read
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_creation_input_tokens * cache_creation
            + usage.cache_read_input_tokens * cache_read
        ) / 1_000_000


class PriceTable:
    """Model name (exact, or a prefix ending in ``*``) -> ``Price``."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, prices: Mapping[str, Price] | Iterable[tuple[str, Price]] = ()) -> None:
        items = prices.items() if isinstance(prices, Mapping) else prices
        self._exact: dict[str, Price] = {}
        prefixes: list[tuple[str, Price]] = []
        for pattern, price in items:
            if not isinstance(price, Price):
                raise TypeError(f"price for {pattern!r} must be a Price")
            star = pattern.find("*")
            if star < 0:
                self._exact[pattern] = price
            elif star == len(pattern) - 1:
                prefixes.append((pattern[:-1], price))
            else:
                raise ValueError(
                    f"model pattern {pattern!r}: '*' is only allowed at the end (a prefix match)"
                )
        # Longest prefix first, so the first match is the most specific one.
        prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        self._prefixes = tuple(prefixes)

    def price_for(self, model: str | None) -> Price | None:
        if model is None:
            return None
        price = self._exact.get(model)
        if price is not None:
            return price
        for prefix, price in self._prefixes:
            if model.startswith(prefix):
                return price
        return None

    def cost(self, usage: Usage, model: str | None, billing: Billing | str) -> float | None:
        """USD for ``usage``: 0 when ``included``; ``None`` when metered and unpriced."""
        billing = Billing(billing)
        if billing is Billing.INCLUDED:
            return 0.0
        price = self.price_for(model)
        return None if price is None else price.cost(usage)
