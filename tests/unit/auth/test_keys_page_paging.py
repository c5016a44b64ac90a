"""The keys page's paging (``keyrelay.auth.web.keys_page``): the ``?page=`` it takes and
the page it shows; over real HTTP in tests/integration/test_web_keys.py."""

from __future__ import annotations

import pytest

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.gateway_keys import KeyRecord, Route
from keyrelay.auth.web.keys_page import PAGE_SIZE, page_of, parse_page
from keyrelay.limit_rules import Limits


def key(n: int) -> KeyRecord:
    return KeyRecord(
        key_id=f"gk-{n:016x}",
        name=f"k{n}",
        key_sha256="sha256:" + f"{n:064x}",
        route=Route("acct"),
        limits=Limits(),
        created_at=n,
        updated_at=n,
        expires_at=0,
        revoked_at=0,
        version=1,
    )


@pytest.mark.parametrize(
    ("text", "number"),
    [
        (None, 1),
        ("", 1),
        ("1", 1),
        ("7", 7),
        ("007", 7),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, 10**18),  # past any last page: not parsed
        ("1" + "0" * 5000, 10**18),
    ],
)
def test_page_numbers_the_links_have_and_huge_ones(text: str | None, number: int) -> None:
    assert parse_page(text) == number


@pytest.mark.parametrize(
    "text", ["0", "00", "-1", "+1", " 1", "1 ", "1.0", "1e3", "one", "\uff11", "\u0661", "1,2"]
)
def test_other_page_numbers_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^page must be a whole number from 1"):
        parse_page(text)


def test_pages_are_newest_first_and_past_the_last_is_the_last() -> None:
    keys = [key(n) for n in range(2 * PAGE_SIZE + 20)]  # oldest first, as ListKeys has them
    first = page_of(keys, 1)
    assert (first.number, first.pages, first.total) == (1, 3, 120)
    assert [k.key_id for k in first.records] == [k.key_id for k in keys[::-1][:PAGE_SIZE]]
    last = page_of(keys, 3)
    assert last.records == keys[:20][::-1]
    assert page_of(keys, 10**18) == last
    whole = [k for n in (1, 2, 3) for k in page_of(keys, n).records]
    assert whole == keys[::-1]


def test_no_keys_is_one_empty_page() -> None:
    empty = page_of([], 5)
    assert (empty.records, empty.number, empty.pages, empty.total) == ([], 1, 1, 0)
    assert page_of([key(1)], 2).number == 1
