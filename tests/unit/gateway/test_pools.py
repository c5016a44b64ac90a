"""Credential pools of ``gateway.core.pools``: sessions, member order, cool-downs.

Tables for the rules and the header forms (malformed ones included), hypothesis
for the properties: rendezvous hashing moves only a leaving member's sessions,
and nothing a client or an upstream sends makes the functions raise.
"""

from __future__ import annotations

import ast
import email.utils
import itertools
import json
import math
import os
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core import pools
from keyrelay.gateway.core.pools import (
    MAX_KEY_BYTES,
    MIN_COOL_SECONDS,
    WALK_BYTES,
    WALK_NODES,
    Member,
    Pool,
    Strategy,
    all_cooling_retry_after,
    available_mask,
    cool_down_until,
    cools,
    order,
    retry_allowed,
    session_of,
)

NOW = 1_741_964_966.0  # 2025-03-14T15:09:26Z
DEFAULT = 30.0
MAX = 3600.0

Headers = list[tuple[bytes, bytes]]


def make_pool(*ids: str, strategy: Strategy = Strategy.AFFINITY) -> Pool:
    return Pool("pool", tuple(Member(i) for i in ids), strategy)


def ranking(pool: Pool, session: bytes | None, available: int = -1, counter: int = 0) -> list[str]:
    """The member ids in the order ``order`` gives."""
    return [pool.members[i].id for i in order(pool, session, available, counter)]


def mask_of(pool: Pool, ids: set[str]) -> int:
    return sum(1 << i for i, member in enumerate(pool.members) if member.id in ids)


def iso(seconds_from_now: float) -> bytes:
    """An RFC 3339 UTC timestamp ``seconds_from_now`` after ``NOW``."""
    moment = email.utils.formatdate(NOW + seconds_from_now, usegmt=True)
    parsed = email.utils.parsedate_to_datetime(moment)
    return parsed.strftime("%Y-%m-%dT%H:%M:%SZ").encode()


def until(
    status: int = 429,
    headers: Headers | None = None,
    error_type: str | None = None,
    *,
    default: float = DEFAULT,
    maximum: float = MAX,
) -> float | None:
    """The wait in seconds ``cool_down_until`` gives at ``NOW``, or None."""
    result = cool_down_until(status, headers or [], error_type, NOW, default, maximum)
    return None if result is None else result - NOW


SESSIONS = [b"u%d" % i for i in range(30_000)]


# -- the module stays pure ---------------------------------------------------------------


def test_imports_no_io_and_no_clock() -> None:
    tree = ast.parse(Path(pools.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    allowed = {
        "__future__",
        "collections.abc",
        "dataclasses",
        "datetime",
        "email.utils",
        "enum",
        "hashlib",
        "itertools",
        "keyrelay.gateway.core.ratelimit",
        "math",
        "re",
        "struct",
        "typing",
        "zlib",
    }
    assert imported <= allowed, imported - allowed
    clocks = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "time_ns"}
    called = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not called & clocks


# -- members and pools -------------------------------------------------------------------


def test_pool_normalises_and_derives() -> None:
    pool = Pool("p", [Member("a"), Member("b")], "round_robin")  # type: ignore[arg-type]
    assert pool.members == (Member("a"), Member("b"))
    assert pool.strategy is Strategy.ROUND_ROBIN
    assert pool.all_mask == 0b11
    assert Pool("p", (Member("a"),)).strategy is Strategy.AFFINITY
    assert make_pool("a", "b") == make_pool("a", "b")  # derived fields do not compare
    assert hash(make_pool("a", "b")) == hash(make_pool("a", "b"))


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ((), "pool 'p' has no members"),
        ((Member("a"), Member("b"), Member("a")), "pool 'p' names a member twice"),
    ],
)
def test_bad_pools(members: tuple[Member, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pool("p", members)


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="sticky"):
        Pool("p", (Member("a"),), "sticky")  # type: ignore[arg-type]


@pytest.mark.parametrize("member_id", ["", None, 7])
def test_bad_member_ids(member_id: Any) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        Member(member_id)


def test_member_seed_comes_from_the_id_alone() -> None:
    assert Member("acct-1").seed == Member("acct-1").seed
    assert Member("acct-1").seed != Member("acct-2").seed
    assert 0 <= Member("\ud800 lone surrogate").seed < 1 << 64
    assert Member("acct-1") == Member("acct-1")


# -- order: affinity ---------------------------------------------------------------------

# Pinned: every worker and every gateway version must rank alike. If these change,
# every session moves once on upgrade: that needs a reason in the changelog.
PINNED = [
    (b"h1", ["alpha", "gamma", "beta"]),
    (b"uuser_1", ["alpha", "gamma", "beta"]),
    (b"c\x00\x00\x00\x00", ["beta", "alpha", "gamma"]),
    (b"", ["beta", "gamma", "alpha"]),
]


@pytest.mark.parametrize(("session", "expected"), PINNED)
def test_rankings_are_pinned(session: bytes, expected: list[str]) -> None:
    assert ranking(make_pool("alpha", "beta", "gamma"), session) == expected


def test_rankings_agree_across_processes() -> None:
    """``hash()`` is salted per process; the ranking must not be."""
    script = (
        "from keyrelay.gateway.core.pools import Member, Pool, order\n"
        "p = Pool('p', tuple(Member(i) for i in ('alpha', 'beta', 'gamma', 'delta')))\n"
        "print([order(p, b'u%d' % n, p.all_mask) for n in range(50)])\n"
    )
    outputs = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout)
    pool = make_pool("alpha", "beta", "gamma", "delta")
    here = str([order(pool, b"u%d" % n, pool.all_mask) for n in range(50)]) + "\n"
    assert outputs == {here}


member_ids = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8, unique=True)


@settings(max_examples=200)
@given(ids=member_ids, sessions=st.lists(st.binary(max_size=40), min_size=1, max_size=40))
def test_ranking_is_a_permutation_independent_of_configured_order(
    ids: list[str], sessions: list[bytes]
) -> None:
    pool = make_pool(*ids)
    shuffled = make_pool(*reversed(ids))
    for session in sessions:
        ranked = ranking(pool, session)
        assert sorted(ranked) == sorted(ids)
        assert ranking(shuffled, session) == ranked
        assert ranking(pool, session) == ranked  # deterministic


@settings(max_examples=200)
@given(
    ids=member_ids,
    data=st.data(),
    sessions=st.lists(st.binary(max_size=40), min_size=1, max_size=40),
)
def test_a_subset_ranks_as_the_whole_pool_filtered(
    ids: list[str], data: st.DataObject, sessions: list[bytes]
) -> None:
    """Members leaving (cooling, disconnected, removed from the config) change
    nothing for the others: only the sessions they ranked first move, each to
    its next member; when they return, those sessions come back to them."""
    pool = make_pool(*ids)
    kept = data.draw(st.sets(st.sampled_from(ids)), label="kept")
    smaller = make_pool(*[i for i in ids if i in kept]) if kept else None
    for session in sessions:
        full = ranking(pool, session)
        filtered = [i for i in full if i in kept]
        assert ranking(pool, session, mask_of(pool, kept)) == filtered
        if smaller is not None:
            assert ranking(smaller, session) == filtered


@settings(max_examples=50)
@given(ids=st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=6, unique=True))
def test_leaving_moves_only_its_own_sessions(ids: list[str]) -> None:
    pool = make_pool(*ids)
    leaving = ids[0]
    without = pool.all_mask & ~1
    for session in SESSIONS[:2_000]:
        before = ranking(pool, session)
        after = ranking(pool, session, without)
        if before[0] == leaving:
            assert after[0] == before[1]  # its failover member
        else:
            assert after[0] == before[0]  # unmoved
        assert ranking(pool, session) == before  # back: the same as before it left


def test_sessions_spread_evenly_and_moved_ones_too() -> None:
    pool = make_pool("acct-a", "acct-b", "acct-c", "key-d")
    firsts = Counter(order(pool, s, pool.all_mask)[0] for s in SESSIONS)
    for index in range(4):  # 7,500 each; one standard deviation is 75
        assert abs(firsts[index] - len(SESSIONS) / 4) < 400, firsts
    # The sessions of a member that leaves go to the others in equal shares.
    orphans = [s for s in SESSIONS if order(pool, s, pool.all_mask)[0] == 0]
    moved = Counter(order(pool, s, 0b1110)[0] for s in orphans)
    assert set(moved) == {1, 2, 3}
    for index in (1, 2, 3):
        assert abs(moved[index] - len(orphans) / 3) < 250, moved


def test_three_members_balance() -> None:
    pool = make_pool("acct-a", "acct-b", "key-c")
    firsts = Counter(order(pool, s, pool.all_mask)[0] for s in SESSIONS)
    for index in range(3):
        assert abs(firsts[index] - 10_000) < 500, firsts


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (0b111, (0, 2, 1)),
        (0b110, (2, 1)),
        (0b101, (0, 2)),
        (0b011, (0, 1)),
        (0b010, (1,)),
        (0b000, ()),
        (0b1000, ()),  # bits beyond the members: ignored
        (0b1111_1111, (0, 2, 1)),
        (-1, (0, 2, 1)),  # every bit set
    ],
)
def test_unavailable_members_are_skipped(available: int, expected: tuple[int, ...]) -> None:
    pool = make_pool("alpha", "beta", "gamma")
    assert order(pool, b"h1", available) == expected


def test_counter_does_not_move_an_affinity_session() -> None:
    pool = make_pool("a", "b", "c")
    assert {order(pool, b"h-session", pool.all_mask, counter) for counter in range(10)} == {
        order(pool, b"h-session", pool.all_mask)
    }


# -- order: round robin, and affinity without a session ----------------------------------


@pytest.mark.parametrize(
    ("available", "counter", "expected"),
    [
        (0b111, 0, (0, 1, 2)),
        (0b111, 1, (1, 2, 0)),
        (0b111, 2, (2, 0, 1)),
        (0b111, 3, (0, 1, 2)),
        (0b111, -1, (2, 0, 1)),
        (0b111, 3 * 10**30 + 1, (1, 2, 0)),
        (0b101, 0, (0, 2)),
        (0b101, 1, (2, 0)),  # rotates over the available ones: no member gets double
        (0b101, 2, (0, 2)),
        (0b100, 7, (2,)),
        (0b000, 7, ()),
    ],
)
def test_round_robin(available: int, counter: int, expected: tuple[int, ...]) -> None:
    pool = make_pool("a", "b", "c", strategy=Strategy.ROUND_ROBIN)
    assert order(pool, b"h-ignored", available, counter) == expected
    assert order(make_pool("a", "b", "c"), None, available, counter) == expected


@settings(max_examples=200)
@given(
    size=st.integers(1, 8),
    available=st.integers(0, 255),
    start=st.integers(-(10**6), 10**6),
    session=st.none() | st.binary(max_size=20),
)
def test_round_robin_is_even_over_the_available(
    size: int, available: int, start: int, session: bytes | None
) -> None:
    pool = make_pool(*(f"m{i}" for i in range(size)), strategy=Strategy.ROUND_ROBIN)
    expected = [i for i in range(size) if available >> i & 1]
    orders = [order(pool, session, available, start + k) for k in range(max(1, len(expected)))]
    for got in orders:
        assert sorted(got) == expected
    if expected:
        assert sorted(got[0] for got in orders) == expected  # each first once per lap


# -- availability ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cooling", "disconnected", "expected"),
    [
        (None, (), 0b111),
        ({}, (), 0b111),
        ({"b": NOW + 5}, (), 0b101),
        ({"b": NOW}, (), 0b111),  # cooled until now: back now
        ({"b": NOW - 5, "c": NOW + 0.001}, (), 0b011),
        ({"b": math.nan}, (), 0b111),  # a broken stored value does not ban a member
        ({"b": math.inf}, (), 0b101),
        ({"unknown": NOW + 5}, (), 0b111),
        (None, {"a"}, 0b110),
        ({"c": NOW + 5}, ("a", "b"), 0b000),
    ],
)
def test_available_mask(cooling: dict[str, float] | None, disconnected: Any, expected: int) -> None:
    assert available_mask(make_pool("a", "b", "c"), NOW, cooling, disconnected) == expected


# -- sessions ----------------------------------------------------------------------------

BODY: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "system": [
        {"type": "text", "text": "You are a coding agent."},
        {"type": "text", "text": "Repository rules. " * 40, "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<context>" + "fixed preamble " * 200 + "</context>"},
                {"type": "text", "text": "Why does test_foo fail?"},
            ],
        }
    ],
}


def with_(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**body, **changes}


def first_text(text: str, *, cache: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if cache:
        block["cache_control"] = {"type": "ephemeral"}
    return {"role": "user", "content": [block]}


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ([(b"x-keyrelay-session", b"conv-1")], BODY, b"hconv-1"),
        ([(b"x-keyrelay-session", b"  conv-1\t")], BODY, b"hconv-1"),
        ([(b"x-keyrelay-session", b"  "), (b"x-keyrelay-session", b"conv-2")], BODY, b"hconv-2"),
        ([(b"x-keyrelay-session", b"a"), (b"x-keyrelay-session", b"b")], BODY, b"ha"),
        ([(b"x-keyrelay-session", b"conv-1")], "not even a dict", b"hconv-1"),
        ([(b"x-keyrelay-session", b"conv-1")], with_(BODY, metadata={"user_id": "u"}), b"hconv-1"),
        ([], with_(BODY, metadata={"user_id": "user_42"}), b"uuser_42"),
        ([(b"x-keyrelay-session", b"")], with_(BODY, metadata={"user_id": "user_42"}), b"uuser_42"),
        ([], {"metadata": {"user_id": "\u00e9t\u00e9"}}, "u\u00e9t\u00e9".encode()),
        ([], {"metadata": {"user_id": "x\ud800"}}, b"ux\xed\xa0\x80"),  # a lone surrogate
        ([], {}, None),
        ([], {"messages": []}, None),
        ([], {"messages": "hello"}, None),
        ([], {"messages": None, "system": None}, None),
        ([], {"metadata": {"user_id": 42}}, None),
        ([], {"metadata": {"user_id": "   "}}, None),
        ([], {"metadata": ["user_id", "x"]}, None),
        ([], [], None),
        ([], None, None),
        ([(b"x-keyrelay-session", b" ")], {}, None),
        ([(b"x-other", b"conv-1")], {}, None),
    ],
)
def test_session_rules(headers: Headers, body: object, expected: bytes | None) -> None:
    assert session_of(headers, body) == expected


@pytest.mark.parametrize("user_id", [42, 4.2, None, True, ["u"], {"id": "u"}, "", "  "], ids=repr)
def test_a_user_id_that_is_not_a_string_falls_back_to_the_content(user_id: object) -> None:
    assert session_of([], with_(BODY, metadata={"user_id": user_id})) == session_of([], BODY)


def test_long_keys_keep_their_ends_and_length() -> None:
    half = MAX_KEY_BYTES // 2
    exact = b"k" * MAX_KEY_BYTES
    assert session_of([(b"x-keyrelay-session", exact)], {}) == b"h" + exact
    long_a = b"A" * half + b"middle-1" + b"Z" * 2000
    long_b = b"A" * half + b"middle-2" + b"Z" * 2000
    long_c = b"A" * half + b"middle-1" + b"Z" * 2001
    long_d = b"B" + long_a[1:]
    sessions = [session_of([(b"x-keyrelay-session", v)], {}) for v in (long_a, long_b)]
    assert sessions[0] == sessions[1]  # they differ only in the middle
    assert sessions[0] is not None
    assert len(sessions[0]) < 300
    for other in (long_c, long_d):
        assert session_of([(b"x-keyrelay-session", other)], {}) != sessions[0]
    ids = ["é" * half + "-one-" + "x" * 5000, "é" * half + "-two-" + "x" * 5000, "é" * 300]
    found = [session_of([], {"metadata": {"user_id": i}}) for i in ids]
    assert found[0] == found[1] != found[2]
    assert all(s is not None and len(s) < 1000 for s in found)


def test_content_session_ignores_everything_but_system_and_first_message() -> None:
    base = session_of([], BODY)
    assert base is not None
    assert base.startswith(b"c")
    assert len(base) == 5
    later_turn = with_(
        BODY,
        model="claude-opus-4-1",
        max_tokens=64_000,
        tools=[{"name": "bash", "input_schema": {"type": "object"}}],
        metadata={"other": "x"},
        messages=[*BODY["messages"], {"role": "assistant", "content": "Because."}],
    )
    assert session_of([], later_turn) == base
    assert session_of([(b"x-unrelated", b"1")], BODY) == base


def test_cache_control_breakpoints_do_not_move_a_session() -> None:
    """Turn 1: the first message is the last one, with the breakpoint; turn 2: not."""
    turn_1 = {"system": "Be brief.", "messages": [first_text("Hello there", cache=True)]}
    turn_2 = {
        "system": "Be brief.",
        "messages": [
            first_text("Hello there"),
            {"role": "assistant", "content": "Hi."},
            first_text("And now?", cache=True),
        ],
    }
    assert session_of([], turn_1) == session_of([], turn_2)
    no_marks = json.loads(json.dumps(BODY))
    del no_marks["system"][1]["cache_control"]
    assert session_of([], no_marks) == session_of([], BODY)
    marked = json.loads(json.dumps(BODY))
    marked["system"][0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    assert session_of([], marked) == session_of([], BODY)


def test_different_conversations_get_different_sessions() -> None:
    variants = [
        BODY,
        with_(BODY, system="You are a coding agent."),
        with_(BODY, system=None),
        {k: v for k, v in BODY.items() if k != "system"} | {"system": []},
        with_(BODY, messages=[first_text("Hello")]),
        with_(BODY, messages=[first_text("Hello!")]),
        with_(BODY, messages=[{**first_text("Hello"), "role": "assistant"}]),
        {"messages": [first_text("Hello")]},
        {"system": "Be brief."},
        {"system": "Be brief!"},
        {"system": 42},
        {"system": 42.0},
        {"system": True},
        {"system": [None]},
    ]
    sessions = [session_of([], body) for body in variants]
    assert None not in sessions
    assert len(set(sessions)) == len(variants)


def test_absent_and_null_system_are_alike() -> None:
    only_message = {"messages": BODY["messages"]}
    assert session_of([], only_message) == session_of([], with_(only_message, system=None))


def test_first_message_is_read_from_both_ends() -> None:
    preamble = "shared preamble " * 2_000  # far more than WALK_BYTES
    ask = [first_text(preamble + question) for question in ("Fix a.py", "Fix b.py")]
    lead = [first_text(start + preamble) for start in ("A: ", "B: ")]
    sessions = [session_of([], {"system": "x", "messages": [m]}) for m in ask + lead]
    assert len(set(sessions)) == 4
    # Beyond the bound: a difference in the middle of a long first message is not read.
    middle = [first_text("x" * 5_000 + mid + "x" * 5_000) for mid in ("one", "two")]
    assert len({session_of([], {"messages": [m]}) for m in middle}) == 1


def test_the_system_prompt_is_read_from_its_start() -> None:
    """Its start is what the prompt caches of its sessions share anyway."""
    long = "Rules. " * 1_000
    first = [first_text("Hi")]
    same_start = [session_of([], {"system": long + end, "messages": first}) for end in "ab"]
    assert same_start[0] == same_start[1]
    other_start = session_of([], {"system": "Other " + long, "messages": first})
    assert other_start != same_start[0]


def test_many_blocks_are_read_from_both_ends() -> None:
    blocks = [{"type": "text", "text": f"block {i}"} for i in range(10_000)]
    variants = []
    for changed in (None, 0, len(blocks) - 1, len(blocks) // 2):
        content = list(blocks)
        if changed is not None:
            content[changed] = {"type": "text", "text": "changed"}
        variants.append(session_of([], {"messages": [{"role": "user", "content": content}]}))
    unchanged, first, last, middle = variants
    assert len({unchanged, first, last}) == 3
    assert middle == unchanged  # beyond the bound


def test_a_wide_object_is_read_from_both_ends() -> None:
    wide = {f"k{i}": i for i in range(10_000)}
    first_changed = {**wide, "k0": -1}
    last_changed = {**wide, "k9999": -1}
    sessions = {session_of([], {"messages": [m]}) for m in (wide, first_changed, last_changed)}
    assert len(sessions) == 3


def test_string_bounds_count_utf8_bytes() -> None:
    # Two-byte characters: WALK_BYTES bytes are WALK_BYTES // 2 characters.
    head = "é" * (WALK_BYTES // 2)
    same = [session_of([], {"system": head + tail}) for tail in ("x", "é" * 5, "y" * 10_000)]
    assert len(set(same)) == 1
    assert session_of([], {"system": head[:-1] + "e"}) != same[0]


def test_walks_are_bounded_by_nodes() -> None:
    """A first message of many tiny values: only WALK_NODES from each end count."""
    ends = [0] * (WALK_NODES - 1)  # the message's list, then these, fill a walk

    def message(head: list[int], middle: list[int]) -> dict[str, Any]:
        return {"messages": [head + middle + ends]}

    assert session_of([], message(ends, [1, 2, 3])) == session_of([], message(ends, [4]))
    changed = [1, *ends[1:]]
    assert session_of([], message(ends, [1])) != session_of([], message(changed, [1]))
    changed = [*ends[:-1], 1]
    assert session_of([], message(ends, [1])) != session_of([], message(changed, [1]))


def test_deep_nesting_needs_no_recursion() -> None:
    deep: Any = "core"
    for _ in range(100_000):
        deep = [deep]
    assert session_of([], {"system": deep, "messages": [deep]}) is not None
    nested: Any = {}
    for _ in range(100_000):
        nested = {"c": nested}
    assert session_of([], {"messages": [nested]}) is not None


def test_huge_values_are_read_only_in_part() -> None:
    huge = "y" * 20_000_000
    body = {"system": huge, "messages": [first_text(huge), *[first_text(huge)] * 1000]}
    assert session_of([], body) == session_of([], with_(body, system=huge + "tail"))


def test_huge_integers_and_odd_values() -> None:
    big = {"messages": [{"n": 10**5000}]}
    assert session_of([], big) != session_of([], {"messages": [{"n": 10**5001 + 7}]})
    assert session_of([], big) == session_of([], {"messages": [{"n": 10**5000 + 2}]})  # by size
    odd = {"system": (1, 2), "messages": [{1: b"bytes", None: {3, 4}}, object()]}
    assert session_of([], odd) is not None


json_leaf = (
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=60)
)
json_tree = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=15), children, max_size=6)
    ),
    max_leaves=40,
)
hostile = json_tree | st.binary() | st.tuples(json_leaf) | st.builds(object)


@settings(max_examples=400)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"x-keyrelay-session", b"X-Keyrelay-Session", b"host"]),
            st.binary(max_size=400),
        ),
        max_size=4,
    ),
    body=st.dictionaries(
        st.sampled_from(["system", "messages", "metadata", "model"]), hostile, max_size=4
    )
    | st.builds(lambda m: {"metadata": {"user_id": m}}, hostile)
    | hostile,
)
def test_session_never_raises(headers: Headers, body: object) -> None:
    session = session_of(headers, body)
    assert session is None or (isinstance(session, bytes) and session)
    if session is not None:
        assert len(session) <= 1 + 4 * MAX_KEY_BYTES + 16
        assert session_of(headers, body) == session  # deterministic
        pool = make_pool("a", "b", "c")
        assert sorted(order(pool, session, pool.all_mask)) == [0, 1, 2]


def without_cache_control(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [without_cache_control(v) for v in value]
    return value


block_keys = st.sampled_from(["type", "text", "cache_control", "content"]) | st.text(max_size=4)
marked_tree = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=20) | st.dictionaries(block_keys, children, max_size=20)
    ),
    max_leaves=60,
)


@settings(max_examples=300)
@given(system=marked_tree, first=marked_tree)
def test_cache_control_never_counts(system: Any, first: Any) -> None:
    marked = {"system": system, "messages": [first]}
    plain = {"system": without_cache_control(system), "messages": [without_cache_control(first)]}
    assert session_of([], marked) == session_of([], plain)


def test_cache_control_in_a_wide_object_does_not_count() -> None:
    wide = {f"k{i}": i for i in range(WALK_NODES - 1)}  # exactly what one walk reads
    marked = {**wide, "cache_control": {"type": "ephemeral"}}
    first_marked = {"cache_control": {"type": "ephemeral"}, **wide}
    sessions = {session_of([], {"messages": [m]}) for m in (wide, marked, first_marked)}
    assert len(sessions) == 1


@settings(max_examples=200)
@given(system=json_tree, first=json_tree, extra=json_tree)
def test_only_system_and_first_message_matter(system: Any, first: Any, extra: Any) -> None:
    body = {"system": system, "messages": [first]}
    more = {"system": system, "messages": [first, extra], "model": extra, "tools": extra}
    assert session_of([], body) == session_of([], more)


# The shortcut for plain bodies (``_plain_checksum``) must hash exactly what the walk
# hashes, or a session would move the turn its body changes shape. Strings near the
# byte bound, multi-byte and NUL characters and lone surrogates are where they could part.
near_bound = st.integers(WALK_BYTES - 8, WALK_BYTES + 8).flatmap(
    lambda n: st.sampled_from(
        ["a" * n, "\u00e9" * (n // 2), "x\0" * (n // 2), "\U0001f600" * (n // 4)]
    )
)
plain_text = st.text(max_size=40) | near_bound | st.just("lone \ud800 surrogate")
plain_key = st.sampled_from(["role", "content", "name"]) | st.text(max_size=3)
plain_message = (
    st.dictionaries(plain_key, st.text(max_size=40), min_size=1, max_size=WALK_NODES - 1)
    | st.dictionaries(plain_key | st.just("cache_control"), plain_text, max_size=3)
    | st.builds(
        lambda n, text: {f"k{i}": text for i in range(n)},
        st.integers(0, WALK_NODES + 1),
        plain_text,
    )
)


@settings(max_examples=1000)
@given(system=st.none() | plain_text, first=plain_message)
def test_the_shortcut_for_plain_bodies_hashes_what_the_walk_hashes(system: Any, first: Any) -> None:
    shortcut = pools._plain_checksum(system, first)
    if shortcut is not None:
        assert shortcut == zlib.crc32(pools._walked_pieces(system, first))


@settings(max_examples=300)
@given(system=hostile, first=hostile | st.just(pools._ABSENT))
def test_the_shortcut_agrees_on_any_shape(system: Any, first: Any) -> None:
    shortcut = pools._plain_checksum(system, first)
    if shortcut is not None:
        assert shortcut == zlib.crc32(pools._walked_pieces(system, first))


@pytest.mark.parametrize(
    ("system", "first"),
    [
        (None, {"role": "user", "content": "What is the weather like in Paris?"}),
        ("You are terse.", {"role": "user", "content": "Hi"}),
        ("", {"role": "user", "content": ""}),
        ("s" * (3 * WALK_BYTES), {"role": "user", "content": "x" * (WALK_BYTES - 5)}),
        ("\u00e9" * WALK_BYTES, {f"k{i}": "v" for i in range(WALK_NODES - 1)}),
    ],
)
def test_the_shortcut_takes_plain_bodies(system: Any, first: dict[str, str]) -> None:
    """It answers for these (so the test above is not vacuous), alike."""
    assert pools._plain_checksum(system, first) == zlib.crc32(pools._walked_pieces(system, first))


@pytest.mark.parametrize(
    ("system", "first"),
    [
        (None, {}),
        (None, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}),
        ([{"type": "text", "text": "s"}], {"role": "user", "content": "Hi"}),
        (None, {"role": "user", "content": "x" * (WALK_BYTES - 3)}),  # one byte over
        (None, {f"k{i}": "v" for i in range(WALK_NODES)}),
        (None, {"role": "user", "content": "Hi", "cache_control": "x"}),
        ("s\ud800", {"role": "user", "content": "Hi"}),
        (None, pools._ABSENT),
        (None, ["not", "an", "object"]),
    ],
)
def test_the_shortcut_leaves_other_shapes_to_the_walk(system: Any, first: Any) -> None:
    assert pools._plain_checksum(system, first) is None


# -- cool-downs: which answers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "expected"),
    [
        (429, "rate_limit_error", True),
        (429, None, True),
        (529, "overloaded_error", True),
        (529, None, True),
        (200, "overloaded_error", True),  # an error event inside a stream
        (500, "overloaded_error", True),
        (200, None, False),
        (400, "invalid_request_error", False),
        (401, "authentication_error", False),
        (403, "permission_error", False),
        (413, "request_too_large", False),
        (500, "api_error", False),
        (502, None, False),
        (503, "api_error", False),
        (504, None, False),
        (200, "rate_limit_error", False),
        (200, "Overloaded_Error", False),
    ],
)
def test_cools_and_retry_allowed(status: int, error_type: str | None, expected: bool) -> None:
    assert cools(status, error_type) is expected
    assert retry_allowed(status, error_type, client_bytes_sent=False) is expected
    assert retry_allowed(status, error_type, client_bytes_sent=True) is False
    assert (until(status, [], error_type) is not None) is expected


# -- cool-downs: retry-after and retry-after-ms ------------------------------------------


def http_date(seconds_from_now: float) -> bytes:
    return email.utils.formatdate(NOW + seconds_from_now, usegmt=True).encode()


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ([], DEFAULT),
        ([(b"retry-after", b"30")], 30),
        ([(b"retry-after", b"17")], 17),
        ([(b"Retry-After", b"17")], 17),  # names in any case
        ([(b"retry-after", b" 17 ")], 17),
        ([(b"retry-after", b"1.5")], 1.5),
        ([(b"retry-after", b"0")], MIN_COOL_SECONDS),
        ([(b"retry-after", b"0.2")], MIN_COOL_SECONDS),
        ([(b"retry-after", b"86400")], MAX),
        ([(b"retry-after", b"9" * 500)], MAX),  # parses to infinity: the maximum
        ([(b"retry-after", b"17"), (b"retry-after", b"99")], 17),  # the first line
        ([(b"retry-after", b"-5")], DEFAULT),
        ([(b"retry-after", b"+5")], DEFAULT),
        ([(b"retry-after", b"5s")], DEFAULT),
        ([(b"retry-after", b"1e3")], DEFAULT),
        ([(b"retry-after", b"1_000")], DEFAULT),
        ([(b"retry-after", b"nan")], DEFAULT),
        ([(b"retry-after", b"inf")], DEFAULT),
        ([(b"retry-after", b"")], DEFAULT),
        ([(b"retry-after", b".5")], DEFAULT),
        ([(b"retry-after", b"5.")], DEFAULT),
        ([(b"retry-after", "\u0661\u0662".encode())], DEFAULT),  # Arabic-Indic digits
        ([(b"retry-after", b"\xff\xfe")], DEFAULT),
        ([(b"retry-after", b"soon")], DEFAULT),
        ([(b"retry-after", http_date(120))], 120),
        ([(b"retry-after", http_date(-120))], MIN_COOL_SECONDS),  # already past
        ([(b"retry-after", http_date(10**9))], MAX),
        ([(b"retry-after", b"Fri, 14 Mar 2025 15:11:26 GMT")], 120),
        ([(b"retry-after", b"Friday, 14-Mar-25 15:11:26 GMT")], 120),  # RFC 850
        ([(b"retry-after", b"Fri Mar 14 15:11:26 2025")], 120),  # asctime: UTC
        ([(b"retry-after", b"Fri, 14 Mar 2025 16:11:26 +0100")], 120),
        ([(b"retry-after", b"Fri, 14 Mar 2025 15:11:26 -0000")], 120),
        ([(b"retry-after", b"Fri, 32 Mar 2025 15:11:26 GMT")], DEFAULT),
        ([(b"retry-after", b"Fri, 14 Mar 99999 15:11:26 GMT")], DEFAULT),
        ([(b"retry-after", b"Fri, 14 Foo 2025 15:11:26 GMT")], DEFAULT),
        ([(b"retry-after-ms", b"2500")], 2.5),
        ([(b"retry-after-ms", b"2500.5")], 2.5005),
        ([(b"retry-after-ms", b"100")], MIN_COOL_SECONDS),
        ([(b"retry-after-ms", b"2500"), (b"retry-after", b"60")], 2.5),  # ms first
        ([(b"retry-after", b"60"), (b"retry-after-ms", b"2500")], 2.5),
        ([(b"retry-after-ms", b"soon"), (b"retry-after", b"60")], 60),
        ([(b"retry-after-ms", b"-1"), (b"retry-after", b"60")], 60),
        ([(b"retry-after-ms", b"")], DEFAULT),
    ],
)
def test_explicit_waits(headers: Headers, wait: float) -> None:
    assert until(429, headers) == pytest.approx(wait)
    assert until(529, headers) == pytest.approx(wait)
    assert until(200, headers, "overloaded_error") == pytest.approx(wait)


@pytest.mark.parametrize(
    ("default", "maximum", "wait"),
    [
        (30, 3600, 30),
        (30, 10, 10),  # the default is clamped too
        (0, 3600, MIN_COOL_SECONDS),
        (-5, 3600, MIN_COOL_SECONDS),
        (math.nan, 3600, MIN_COOL_SECONDS),
        (math.inf, 3600, 3600),
        (30, 0.5, MIN_COOL_SECONDS),  # a maximum below the minimum: the minimum
        (30, math.nan, MIN_COOL_SECONDS),
        (30, math.inf, 30),
    ],
)
def test_default_and_bounds(default: float, maximum: float, wait: float) -> None:
    assert until(529, [], default=default, maximum=maximum) == pytest.approx(wait)


# -- cool-downs: anthropic-ratelimit-* ---------------------------------------------------


def limits(**kinds: tuple[bytes | None, bytes | None]) -> Headers:
    """``requests=(remaining, reset)`` and so on (``input_tokens`` for input-tokens)."""
    headers: Headers = [(b"anthropic-ratelimit-requests-limit", b"50")]
    for kind, (remaining, reset) in kinds.items():
        name = kind.replace("_", "-").encode()
        if remaining is not None:
            headers.append((b"anthropic-ratelimit-" + name + b"-remaining", remaining))
        if reset is not None:
            headers.append((b"anthropic-ratelimit-" + name + b"-reset", reset))
    return headers


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        # The latest reset among the exhausted limits: all of them must refill.
        (limits(requests=(b"5", iso(2)), tokens=(b"0", iso(40))), 40),
        (limits(requests=(b"0", iso(50)), tokens=(b"0", iso(40))), 50),
        (limits(input_tokens=(b"0", iso(45)), output_tokens=(b"100", iso(3))), 45),
        (limits(output_tokens=(b"0", iso(12)), requests=(b"3", iso(59))), 12),
        (limits(tokens=(b"-3", iso(20)), requests=(b"3", iso(59))), 20),
        # None exhausted (a request larger than what remains): the earliest reset.
        (limits(requests=(b"5", iso(7)), tokens=(b"1000", iso(40))), 7),
        (limits(requests=(None, iso(9)), tokens=(None, iso(40))), 9),
        (limits(requests=(b"lots", iso(9)), tokens=(b"", iso(40))), 9),
        (limits(requests=(b"0" * 30, iso(9)), tokens=(b"9", iso(40))), 9),  # too long
        (limits(requests=(b"0", None), tokens=(b"5", iso(40))), 40),  # no reset: unknown
        # Timestamp forms.
        (limits(tokens=(b"0", b"2025-03-14T15:10:26Z")), 60),
        (limits(tokens=(b"0", b"2025-03-14t15:10:26z")), 60),
        (limits(tokens=(b"0", b"2025-03-14 15:10:26Z")), 60),
        (limits(tokens=(b"0", b"2025-03-14T15:10:26.5Z")), 60.5),
        (limits(tokens=(b"0", b"2025-03-14T15:10:26.123456789Z")), 60.123456),
        (limits(tokens=(b"0", b"2025-03-14T16:10:26+01:00")), 60),
        (limits(tokens=(b"0", b"2025-03-14T14:10:26-01:00")), 60),
        (limits(tokens=(b"0", b"2025-03-14T15:09:20Z")), MIN_COOL_SECONDS),  # past
        (limits(tokens=(b"0", b"9999-12-31T23:59:59Z")), MAX),
        (limits(tokens=(b"0", b"1741965026")), 60),  # epoch seconds, tolerated
        # Malformed timestamps: as if absent.
        (limits(tokens=(b"0", b"2025-03-14T15:10:26")), DEFAULT),  # no offset
        (limits(tokens=(b"0", b"2025-03-14")), DEFAULT),
        (limits(tokens=(b"0", b"2025-02-30T15:10:26Z")), DEFAULT),
        (limits(tokens=(b"0", b"2025-03-14T23:59:60Z")), DEFAULT),  # leap second
        (limits(tokens=(b"0", b"0000-01-01T00:00:00Z")), DEFAULT),
        (limits(tokens=(b"0", b"20250314T151026Z")), DEFAULT),
        (limits(tokens=(b"0", b"2025-03-14T15:10:26+0100")), DEFAULT),
        (limits(tokens=(b"0", b"yesterday")), DEFAULT),
        (limits(tokens=(b"0", b"-1741965026")), DEFAULT),
        (limits(tokens=(b"0", "2025-03-14T15:10:26Z\u0661".encode())), DEFAULT),
        (limits(tokens=(b"0", b"garbage"), requests=(b"0", iso(30))), 30),
        # retry-after wins over the limits' resets.
        ([(b"retry-after", b"5"), *limits(tokens=(b"0", iso(40)))], 5),
        ([(b"retry-after", b"junk"), *limits(tokens=(b"0", iso(40)))], 40),
    ],
)
def test_ratelimit_resets(headers: Headers, wait: float) -> None:
    assert until(429, headers) == pytest.approx(wait)


def test_limits_headers_do_not_set_an_overloads_wait() -> None:
    """Every answer carries them; an overload has nothing to do with them."""
    headers = limits(requests=(b"0", iso(50)), tokens=(b"0", iso(40)))
    assert until(529, headers) == DEFAULT
    assert until(200, headers, "overloaded_error") == DEFAULT
    assert until(529, [(b"retry-after", b"8"), *headers]) == 8


UNIFIED_REJECTED = [
    (b"anthropic-ratelimit-unified-status", b"rejected"),
    (b"anthropic-ratelimit-unified-reset", b"%d" % (NOW + 3 * 3600)),
]


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (429, UNIFIED_REJECTED, 3 * 3600),
        (429, [*UNIFIED_REJECTED, (b"retry-after", b"300")], 3 * 3600),  # the later
        (429, [*UNIFIED_REJECTED, (b"retry-after", b"20000")], 20000),
        (429, [(b"anthropic-ratelimit-unified-status", b"Rejected"), UNIFIED_REJECTED[1]], 10800),
        (
            429,
            [UNIFIED_REJECTED[0], (b"anthropic-ratelimit-unified-reset", iso(600))],
            600,
        ),
        (
            429,
            [(b"anthropic-ratelimit-unified-status", b"allowed"), UNIFIED_REJECTED[1]],
            DEFAULT,
        ),
        (
            429,
            [(b"anthropic-ratelimit-unified-status", b"allowed_warning"), UNIFIED_REJECTED[1]],
            DEFAULT,
        ),
        (429, [UNIFIED_REJECTED[0], (b"anthropic-ratelimit-unified-reset", b"soon")], DEFAULT),
        (429, [UNIFIED_REJECTED[0]], DEFAULT),
        (429, [UNIFIED_REJECTED[0], (b"anthropic-ratelimit-unified-reset", b"1")], 1),
        (
            429,
            [*UNIFIED_REJECTED, *limits(tokens=(b"0", iso(40)))],
            3 * 3600,
        ),
        (529, UNIFIED_REJECTED, DEFAULT),  # an overload is not the window
    ],
)
def test_subscription_window(status: int, headers: Headers, wait: float) -> None:
    assert until(status, headers, maximum=7 * 86400) == pytest.approx(wait)


header_names = st.sampled_from(
    [
        b"retry-after",
        b"Retry-After",
        b"retry-after-ms",
        b"anthropic-ratelimit-requests-remaining",
        b"anthropic-ratelimit-requests-reset",
        b"anthropic-ratelimit-tokens-remaining",
        b"anthropic-ratelimit-tokens-reset",
        b"anthropic-ratelimit-input-tokens-reset",
        b"anthropic-ratelimit-output-tokens-remaining",
        b"anthropic-ratelimit-unified-status",
        b"anthropic-ratelimit-unified-reset",
        b"content-type",
    ]
)
header_values = (
    st.binary(max_size=40)
    | st.integers(-(10**30), 10**30).map(lambda n: b"%d" % n)
    | st.floats().map(lambda f: repr(f).encode())
    | st.sampled_from([b"rejected", b"0", iso(30), iso(-30), http_date(30), b"9" * 400])
    | st.datetimes().map(lambda d: d.isoformat().encode() + b"Z")
)


@settings(max_examples=500)
@given(
    status=st.sampled_from([200, 400, 429, 500, 503, 529]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=8),
    error_type=st.none() | st.sampled_from(["overloaded_error", "rate_limit_error", "api_error"]),
    now=st.floats(0, 4e9),
    default=st.floats(allow_nan=True, allow_infinity=True),
    maximum=st.floats(allow_nan=True, allow_infinity=True),
)
def test_cool_down_never_raises_and_stays_in_bounds(
    status: int,
    headers: Headers,
    error_type: str | None,
    now: float,
    default: float,
    maximum: float,
) -> None:
    result = cool_down_until(status, headers, error_type, now, default, maximum)
    if not cools(status, error_type):
        assert result is None
        return
    assert result is not None
    high = maximum if maximum >= MIN_COOL_SECONDS else MIN_COOL_SECONDS
    assert now + MIN_COOL_SECONDS <= result <= now + high or math.isclose(
        result, now + MIN_COOL_SECONDS
    )


# -- all members cooling -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cooling", "expected"),
    [
        ([NOW + 10], 10),
        ([NOW + 30.5, NOW + 10.2], 11),
        ([NOW + 0.2], 1),
        ([NOW - 5, NOW + 40], 1),  # one is back already: retry soon
        ([], 1),
        ([math.nan, NOW + 7], 7),
        ([math.inf, NOW + 7], 7),
        ([math.inf], 1),
        ([-math.inf, NOW + 7], 7),
    ],
)
def test_all_cooling_retry_after(cooling: list[float], expected: int) -> None:
    assert all_cooling_retry_after(cooling, NOW) == expected
    assert all_cooling_retry_after(iter(cooling), NOW) == expected


@given(st.lists(st.floats(NOW - 100, NOW + 10**6), min_size=1))
def test_all_cooling_retry_after_is_the_earliest_return(cooling: list[float]) -> None:
    got = all_cooling_retry_after(cooling, NOW)
    assert got >= 1
    assert got == max(1, math.ceil(min(cooling) - NOW))


def test_cool_down_then_retry_after_round_trip() -> None:
    """The 429 the gateway answers when every member cools names the earliest."""
    pool = make_pool("a", "b")
    cooling = {
        "a": cool_down_until(429, [(b"retry-after", b"20")], None, NOW, DEFAULT, MAX),
        "b": cool_down_until(529, [], "overloaded_error", NOW, DEFAULT, MAX),
    }
    stored = {k: v for k, v in cooling.items() if v is not None}
    assert available_mask(pool, NOW, stored) == 0
    assert order(pool, b"h1", available_mask(pool, NOW, stored)) == ()
    assert all_cooling_retry_after(stored.values(), NOW) == 20
    assert available_mask(pool, NOW + 20, stored) == 0b01
    assert available_mask(pool, NOW + DEFAULT, stored) == 0b11


def test_failover_walks_the_ranking_once_per_member() -> None:
    """The HTTP layer's loop, driven by hand: each member tried at most once."""
    pool = make_pool("a", "b", "c")
    session = session_of([], BODY)
    cooling: dict[str, float] = {}
    tried: list[str] = []
    for index in order(pool, session, available_mask(pool, NOW, cooling)):
        member = pool.members[index].id
        tried.append(member)
        wait = cool_down_until(429, [(b"retry-after", b"5")], None, NOW, DEFAULT, MAX)
        assert wait is not None
        cooling[member] = wait
        if not retry_allowed(429, "rate_limit_error", client_bytes_sent=False):
            break
    assert sorted(tried) == ["a", "b", "c"]
    assert tried == ranking(pool, session)
    assert all_cooling_retry_after(cooling.values(), NOW) == 5


def test_every_available_subset_keeps_relative_order() -> None:
    pool = make_pool("a", "b", "c", "d")
    for session in SESSIONS[:200]:
        full = order(pool, session, pool.all_mask)
        for size in range(5):
            for subset in itertools.combinations(range(4), size):
                mask = sum(1 << i for i in subset)
                assert order(pool, session, mask) == tuple(i for i in full if i in subset)
