"""Tool-name prefixing: exactly one prefix on the way up, exactly one off on the
way back, deterministic aliases for names over 64 bytes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core.tool_names import (
    MAX_TOOL_NAME_BYTES,
    ToolNameConflict,
    ToolNameTable,
    upstream_tool_name,
)

LONG_ASCII = "a_really_long_tool_name_that_goes_on_and_on_for_more_than_sixty_bytes"
LONG_JAPANESE = "ツール" * 8  # 72 bytes in UTF-8, 24 characters


@pytest.mark.parametrize(
    ("name", "upstream"),
    [
        ("get_weather", "mcp_get_weather"),
        ("mcp_x", "mcp_mcp_x"),  # a tool really named mcp_x gets its own prefix
        ("mcp_", "mcp_mcp_"),
        ("x" * 60, "mcp_" + "x" * 60),  # exactly 64 bytes: no alias
        ("x" * 61, "mcp_" + hashlib.sha256(b"x" * 61).hexdigest()[:16]),
        ("é" * 30, "mcp_" + "é" * 30),  # 4 + 60 bytes
        ("é" * 31, "mcp_" + hashlib.sha256(("é" * 31).encode()).hexdigest()[:16]),
        # Golden values: the alias is the same in every process and release.
        (LONG_ASCII, "mcp_16d13a0a1434a042"),
        (LONG_JAPANESE, "mcp_d39abf37454ef93a"),
    ],
)
def test_upstream_names(name: str, upstream: str) -> None:
    assert upstream_tool_name("mcp_", name) == upstream
    assert len(upstream.encode()) <= MAX_TOOL_NAME_BYTES
    table = ToolNameTable("mcp_")
    assert table.add(name) == upstream
    assert table.to_client(upstream) == name
    assert table.upstream(name) == upstream
    assert name in table


def test_unknown_names_lose_one_prefix_or_stay() -> None:
    table = ToolNameTable("mcp_")
    table.add("known")
    assert table.to_client("mcp_known") == "known"
    assert table.to_client("mcp_other") == "other"
    assert table.to_client("mcp_mcp_other") == "mcp_other"
    assert table.to_client("no_prefix") == "no_prefix"
    assert table.to_client("known") == "known"
    assert table.to_client("mcp_") == ""


def test_add_is_idempotent_and_ordered() -> None:
    table = ToolNameTable("p_")
    assert table.add("b") == "p_b"
    assert table.add("a") == "p_a"
    assert table.add("b") == "p_b"
    assert len(table) == 2
    assert table.items() == [("b", "p_b"), ("a", "p_a")]
    assert "p_b" not in table
    assert "ToolNameTable(prefix='p_'" in repr(table)


def test_alias_collision_is_refused() -> None:
    table = ToolNameTable("mcp_")
    alias = table.add(LONG_ASCII)
    impostor = alias.removeprefix("mcp_")  # a tool literally named like the hash
    with pytest.raises(ToolNameConflict, match="both be sent upstream"):
        table.add(impostor)


@pytest.mark.parametrize("prefix", ["", "p" * 49, "é" * 25])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError):
        ToolNameTable(prefix)


def test_longest_allowed_prefix() -> None:
    table = ToolNameTable("p" * 48)
    assert len(table.add("y" * 100)) == 64


def test_lone_surrogates_do_not_crash() -> None:
    table = ToolNameTable("mcp_")
    name = "\ud800" * 40
    assert table.to_client(table.add(name)) == name


_names = st.text(min_size=1, max_size=40) | st.text(
    alphabet=st.characters(min_codepoint=0x80), min_size=10, max_size=40
)
_prefixes = st.sampled_from(["mcp_", "x", "proxy__", "é_", "p" * 48])


@settings(max_examples=300, deadline=None)
@given(_prefixes, st.lists(_names, max_size=8, unique=True))
def test_round_trip(prefix: str, names: list[str]) -> None:
    table = ToolNameTable(prefix)
    upstream = [table.add(n) for n in names]
    for name, up in zip(names, upstream, strict=True):
        assert up.startswith(prefix)
        assert len(up.encode("utf-8", "surrogatepass")) <= MAX_TOOL_NAME_BYTES
        assert table.to_client(up) == name
        # A fresh table (another request, another worker) agrees.
        assert upstream_tool_name(prefix, name) == up
