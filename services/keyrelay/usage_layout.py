"""Usage records in Redis: their key names and their shape, written once.

The gateways write them (``keyrelay.gateway.limits_store``, in its ``finish``
script) and the auth service reads them (``keyrelay.auth.store.usage_store``);
neither imports the other, both import this. Nothing here does I/O or imports
either service.

Keys (``L`` is ``<prefix>limits:``, ``prefix`` the gateway's ``[gateway.limits]
key_prefix`` and the auth service's ``key_prefix``, both ``keyrelay:`` by
default; a subject is a key, id ``sha256:<hex>`` of its secret, or an account,
id the account id)::

    L<kind>:<id>:day:<YYYY-MM-DD>  hash  usage of that UTC day    (USAGE_FIELDS,
    L<kind>:<id>:month:<YYYY-MM>   hash  usage of that UTC month   integers)
    Ldays:<YYYY-MM-DD>             set   "<kind>:<id>" of every subject with
                                         usage recorded that day
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Final

__all__ = [
    "DAY",
    "KINDS",
    "MONTH",
    "USAGE_FIELDS",
    "UsageLayout",
    "UsageRecord",
    "day_label",
    "member",
    "parse_member",
]

KINDS: Final = ("key", "account")
DAY: Final = "day"
MONTH: Final = "month"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """The usage of one subject over one UTC day or month (or a sum of those).

    ``tokens`` is what token limits and budgets count; ``cost_micro_usd`` is in
    integer micro-dollars (no float drift); ``unpriced`` counts requests of a
    metered model without a price (not in the cost)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    tokens: int = 0
    cost_micro_usd: int = 0
    unpriced: int = 0

    @property
    def cost_usd(self) -> float:
        return self.cost_micro_usd / 1_000_000

    @property
    def empty(self) -> bool:
        return not any(getattr(self, name) for name in USAGE_FIELDS)

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes] | Mapping[str, str]) -> UsageRecord:
        """A usage hash as Redis returns it (``HGETALL``); a missing field is 0."""
        values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        return cls(*(int(values.get(name, 0)) for name in USAGE_FIELDS))

    def __add__(self, other: UsageRecord) -> UsageRecord:
        return UsageRecord(*(getattr(self, n) + getattr(other, n) for n in USAGE_FIELDS))


# The hash fields, in the order of UsageRecord's fields.
USAGE_FIELDS: Final = tuple(f.name for f in fields(UsageRecord))


def day_label(day: dt.date) -> str:
    """``2025-01-31``: a day's label in key names (UTC days)."""
    return day.isoformat()


def member(kind: str, subject_id: str) -> str:
    """A subject's member of the ``days:`` sets."""
    return f"{kind}:{subject_id}"


def parse_member(text: str | bytes) -> tuple[str, str]:
    """(kind, id) of a ``days:`` set member (an id may hold ``:``: a key's ``sha256:``)."""
    value = text.decode() if isinstance(text, bytes) else text
    kind, _, subject_id = value.partition(":")
    return kind, subject_id


class UsageLayout:
    """The key names under one prefix."""

    __slots__ = ("base",)

    def __init__(self, prefix: str = "keyrelay:") -> None:
        self.base: Final = f"{prefix}limits:"  # every limits and usage key starts with this

    def subject(self, kind: str, subject_id: str) -> str:
        """The stem of a subject's keys (its counters and usage hashes)."""
        return f"{self.base}{kind}:{subject_id}"

    def usage(self, kind: str, subject_id: str, period: str, label: str) -> str:
        """A usage hash: ``period`` DAY (``label`` ``YYYY-MM-DD``) or MONTH (``YYYY-MM``)."""
        return f"{self.subject(kind, subject_id)}:{period}:{label}"

    def days(self, label: str) -> str:
        """The set of subjects with usage on the day ``label`` (``YYYY-MM-DD``)."""
        return f"{self.base}days:{label}"
