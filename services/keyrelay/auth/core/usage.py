"""GetUsage's rules (issue 11 item 4), free of I/O: which subjects and days a
query covers, the bounds, the rows and their totals.

A query names subjects (a key by id or hash, an account) or none (every
subject with usage in the range, from the gateways' day indexes), and a number
of UTC days ending today. The gateways record a request under its key and,
when the key routes to an account, under the account too: totals are per kind,
never added across kinds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.gateway_keys import KEY_SHA256, validate_key_id
from keyrelay.auth.core.ids import validate_account_id
from keyrelay.usage_layout import KINDS, UsageRecord, day_label

DEFAULT_DAYS = 30
# Day hashes are kept 400 days after their day (the gateways' retention).
MAX_DAYS = 400
# Rows of one answer (about 100 bytes each in protobuf, well inside gRPC's 4 MiB).
MAX_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A validated query: ``key_id`` resolved to ``key_sha256`` by the caller."""

    key_id: str = ""
    key_sha256: str = ""
    account_id: str = ""
    days: int = DEFAULT_DAYS

    @property
    def filtered(self) -> bool:
        return bool(self.key_id or self.key_sha256 or self.account_id)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One subject's usage on one day (``day`` and ``id`` empty in totals)."""

    day: str
    kind: str
    id: str
    usage: UsageRecord
    key_id: str = ""  # runtime keys: their id and name
    name: str = ""


@dataclass(frozen=True, slots=True)
class UsageReport:
    days: list[str]  # every day of the range, oldest first
    rows: list[UsageRow]
    totals: list[UsageRow]  # one per kind present, in KINDS order

    @property
    def since(self) -> str:
        return self.days[0]

    @property
    def until(self) -> str:
        return self.days[-1]


def validate_query(
    key_id: str = "", key_sha256: str = "", account_id: str = "", days: int | None = None
) -> UsageQuery:
    """The query, or ``InvalidArgument`` naming the field."""
    if key_id and key_sha256:
        raise InvalidArgument("key_id and key_sha256 name the same thing: give one of them")
    if key_id:
        validate_key_id(key_id)
    if key_sha256 and not KEY_SHA256.match(key_sha256):
        raise InvalidArgument("key_sha256 must be sha256: and 64 lowercase hex digits")
    if account_id:
        validate_account_id(account_id)
    if days is None:
        days = DEFAULT_DAYS
    if not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(
            f"days must be 1 to {MAX_DAYS} (UTC days ending today; unset: {DEFAULT_DAYS}), "
            f"got {days}"
        )
    return UsageQuery(key_id, key_sha256, account_id, days)


def day_labels(today: dt.date, days: int) -> list[str]:
    """The ``days`` UTC days ending with ``today``, oldest first."""
    return [day_label(today - dt.timedelta(days=back)) for back in range(days - 1, -1, -1)]


def utc_today(now: float) -> dt.date:
    return dt.datetime.fromtimestamp(now, dt.UTC).date()


def check_rows(count: int, days: int) -> None:
    """``InvalidArgument`` when a query would answer more than MAX_ROWS rows."""
    if count > MAX_ROWS:
        raise InvalidArgument(
            f"days: {days} days hold {count:,} usage records, more than the {MAX_ROWS:,} "
            "one answer carries; ask for fewer days, or filter by key or account"
        )


def _kind_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def _order(row: UsageRow) -> tuple[str, tuple[int, str], str]:
    return (row.day, _kind_order(row.kind), row.id)


def report(days: Sequence[str], rows: Iterable[UsageRow]) -> UsageReport:
    """The rows with usage, by day then kind then id, and their totals per kind."""
    kept = sorted((row for row in rows if not row.usage.empty), key=_order)
    sums: dict[str, UsageRecord] = {}
    for row in kept:
        sums[row.kind] = sums.get(row.kind, UsageRecord()) + row.usage
    totals = [UsageRow("", kind, "", sums[kind]) for kind in sorted(sums, key=_kind_order)]
    return UsageReport(list(days), kept, totals)
