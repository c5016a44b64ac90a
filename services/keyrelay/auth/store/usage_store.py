"""Reading the usage records the gateways write (layout: ``keyrelay.usage_layout``).

The auth service only reads them: ``SCARD``/``SMEMBERS`` of the day indexes and
``HGETALL`` of day hashes, each batch in one pipelined round trip, under the
auth service's own prefix (the gateways' ``[gateway.limits] key_prefix`` must be
the same, and their limits store the same Redis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from keyrelay.auth.store.redis_store import RedisStore
from keyrelay.usage_layout import DAY, UsageLayout, UsageRecord, parse_member

Cell = tuple[str, str, str]  # (kind, id, day label)


class UsageStore:
    """Usage records on the connection pool and prefix of a ``RedisStore``."""

    def __init__(self, store: RedisStore) -> None:
        self._redis = store.client
        self._layout = UsageLayout(store.prefix)

    async def count_subjects(self, days: Sequence[str]) -> int:
        """How many (subject, day) records the day indexes of ``days`` name."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.scard(self._layout.days(day))
            counts = cast(list[int], await pipe.execute())
        return sum(counts)

    async def subjects_on(self, days: Sequence[str]) -> list[Cell]:
        """(kind, id, day) of every subject with usage on each of ``days``."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.smembers(self._layout.days(day))
            replies = cast(list[set[bytes]], await pipe.execute())
        return [
            (*parse_member(found), day)
            for day, members in zip(days, replies, strict=True)
            for found in members
        ]

    async def read(self, cells: Sequence[Cell]) -> list[UsageRecord]:
        """The usage of each (kind, id, day); zeros where nothing was recorded."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for kind, subject_id, day in cells:
                pipe.hgetall(self._layout.usage(kind, subject_id, DAY, day))
            replies = cast(list[dict[bytes, bytes]], await pipe.execute())
        return [UsageRecord.from_hash(reply) for reply in replies]
