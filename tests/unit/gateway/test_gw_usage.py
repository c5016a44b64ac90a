"""Usage extraction (JSON body, message_start + cumulative message_delta) and cost."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core.usage import (
    Billing,
    Price,
    PriceTable,
    Usage,
    UsageTracker,
    usage_from_body,
    usage_from_object,
)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {
                "input_tokens": 10,
                "output_tokens": 20,
                "cache_creation_input_tokens": 30,
                "cache_read_input_tokens": 40,
            },
            Usage(10, 20, 30, 40),
        ),
        ({"input_tokens": 10}, Usage(input_tokens=10)),
        ({}, Usage()),
        ({"input_tokens": None, "output_tokens": "7"}, Usage()),
        ({"input_tokens": -1, "output_tokens": True}, Usage()),
        ({"input_tokens": 12.0, "output_tokens": 1.5}, Usage(input_tokens=12)),
        ({"input_tokens": float("nan"), "output_tokens": float("inf")}, Usage()),
        ({"input_tokens": 5, "server_tool_use": {"web_search_requests": 1}}, Usage(5)),
        (None, None),
        ([], None),
        ("usage", None),
    ],
)
def test_usage_from_object(usage: Any, expected: Usage | None) -> None:
    assert usage_from_object(usage) == expected


def test_usage_from_body() -> None:
    assert usage_from_body({"usage": {"output_tokens": 3}}) == Usage(output_tokens=3)
    assert usage_from_body({"type": "message"}) is None
    assert usage_from_body([1]) is None


def test_stream_usage_is_cumulative_per_field() -> None:
    tracker = UsageTracker()
    assert not tracker.seen
    tracker.observe(
        {
            "type": "message_start",
            "message": {
                "model": "claude-opus-4-1",
                "usage": {
                    "input_tokens": 100,
                    "cache_creation_input_tokens": 5,
                    "cache_read_input_tokens": 7,
                    "output_tokens": 1,
                },
            },
        }
    )
    assert tracker.usage == Usage(100, 1, 5, 7)
    tracker.observe({"type": "message_delta", "usage": {"output_tokens": 20}})
    tracker.observe({"type": "ping"})
    tracker.observe({"type": "content_block_delta", "usage": {"output_tokens": 999}})
    tracker.observe({"type": "message_delta", "usage": {"output_tokens": 35, "input_tokens": None}})
    tracker.observe({"type": "message_delta", "usage": {"cache_read_input_tokens": "x"}})
    tracker.observe({"type": "message_delta", "usage": None})
    tracker.observe("garbage")
    tracker.observe({"type": "message_start", "message": "garbage"})
    assert tracker.usage == Usage(100, 35, 5, 7)
    assert tracker.model == "claude-opus-4-1"
    assert tracker.seen


def test_tracker_without_usage_events() -> None:
    tracker = UsageTracker()
    tracker.observe({"type": "message_start", "message": {"model": 5}})
    assert tracker.usage == Usage()
    assert tracker.model is None
    assert not tracker.seen


def test_usage_addition() -> None:
    assert Usage(1, 2, 3, 4) + Usage(10, 20, 30, 40) == Usage(11, 22, 33, 44)


_counts = st.one_of(st.none(), st.integers(-5, 10**9), st.text(max_size=3), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["input_tokens", "output_tokens"]), _counts)))
def test_later_valid_values_replace_earlier_ones(deltas: list[dict[str, Any]]) -> None:
    tracker = UsageTracker()
    expected = {"input_tokens": 0, "output_tokens": 0}
    for delta in deltas:
        tracker.observe({"type": "message_delta", "usage": delta})
        for key, value in delta.items():
            if type(value) is int and value >= 0:
                expected[key] = value
    assert tracker.usage == Usage(**expected)


# -- prices --------------------------------------------------------------------------

SONNET = Price(input=3, output=15, cache_creation=3.75, cache_read=0.3)
HAIKU = Price(input=1, output=5)
OPUS = Price(input=15, output=75, cache_creation=18.75, cache_read=1.5)
TABLE = PriceTable(
    {
        "claude-sonnet-4*": SONNET,
        "claude-sonnet-4-5-20250929": Price(input=3.5, output=16),
        "claude-*": HAIKU,
        "claude-opus-4*": OPUS,
    }
)


@pytest.mark.parametrize(
    ("model", "price"),
    [
        ("claude-sonnet-4-5-20250929", Price(input=3.5, output=16)),  # exact wins
        ("claude-sonnet-4-5", SONNET),
        ("claude-opus-4-1-20250805", OPUS),  # longest prefix wins
        ("claude-3-5-haiku-latest", HAIKU),
        ("gpt-4", None),
        (None, None),
    ],
)
def test_price_lookup(model: str | None, price: Price | None) -> None:
    assert TABLE.price_for(model) == price


def test_catch_all_pattern() -> None:
    table = PriceTable([("*", HAIKU), ("claude-opus-4*", OPUS)])
    assert table.price_for("anything") == HAIKU
    assert table.price_for("claude-opus-4") == OPUS


def test_cost() -> None:
    usage = Usage(1_000_000, 100_000, 200_000, 2_000_000)
    assert TABLE.cost(usage, "claude-sonnet-4-5", Billing.INCLUDED) == 0.0
    assert TABLE.cost(usage, "unknown-model", "included") == 0.0
    assert math.isclose(
        TABLE.cost(usage, "claude-sonnet-4-5", "metered") or 0,
        3 + 1.5 + 0.75 + 0.6,
    )
    # Cache prices default to 1.25x (write) and 0.1x (read) of the input price.
    assert math.isclose(
        TABLE.cost(usage, "claude-3-haiku", Billing.METERED) or 0,
        1 + 0.5 + 0.25 + 0.2,
    )
    assert TABLE.cost(usage, "gpt-4", Billing.METERED) is None
    assert TABLE.cost(Usage(), "claude-sonnet-4-5", "metered") == 0.0
    with pytest.raises(ValueError):
        TABLE.cost(usage, "claude-sonnet-4-5", "free")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input": -1, "output": 1},
        {"input": 1, "output": math.inf},
        {"input": 1, "output": math.nan},
        {"input": True, "output": 1},
        {"input": "1", "output": 1},
        {"input": 1, "output": 1, "cache_read": -0.1},
    ],
)
def test_bad_prices(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Price(**kwargs)


def test_bad_price_tables() -> None:
    with pytest.raises(ValueError, match="only allowed at the end"):
        PriceTable({"claude-*-sonnet": SONNET})
    with pytest.raises(TypeError):
        PriceTable({"claude": 3})  # type: ignore[arg-type]


def test_billing_labels() -> None:
    assert [b.value for b in Billing] == ["included", "metered"]
    assert Billing("metered") is Billing.METERED
