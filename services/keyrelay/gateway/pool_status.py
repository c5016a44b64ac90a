"""``keyrelay pools``: each pool's members and whether each cools down now (README,
"Credential pools"), as every gateway worker sees it.

The cool-downs live in the limits store's Redis (``keyrelay.gateway.cooldowns``:
``<prefix>limits:cool:<pool>:<member>``, an epoch-ms until). This reads them with
the config's ``[gateway.limits]`` ``redis_url`` and ``key_prefix`` (so as the
gateway's ACL user): one script call for all, the one a worker's poll makes
(``cooldowns.read_cool_downs``), each value judged by ``cooldowns.parse_until``
exactly as a worker's poll judges it
(a value a worker would ignore is "available" here too). Read only; every call
gives up within ``wait_seconds``: an unreachable or refusing store is
``StoreUnreachable``, never a hang.

Whether an OAuth member's account is connected is the auth service's to say
(``keyrelay accounts``), not shown here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keyrelay.gateway.config import GatewayConfig, LimitsStoreConfig
from keyrelay.gateway.cooldowns import (
    DEFAULT_MAX_SECONDS,
    cool_key,
    parse_until,
    poll_command,
    read_cool_downs,
)
from keyrelay.gateway.resp_client import (
    RedisUnavailable,
    Reply,
    ReplyError,
    RespClient,
    parse_url,
)

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MemberState",
    "PoolState",
    "StoreUnreachable",
    "format_pools",
    "pools_json",
    "read_pools",
]

DEFAULT_TIMEOUT_SECONDS = 2.0


class StoreUnreachable(Exception):
    """The limits store did not answer, or refused, within the timeout (the message
    says which store, without its password, and what happened)."""


@dataclass(frozen=True, slots=True)
class MemberState:
    id: str  # account:<account> or key:<name> (the cool-down key's)
    name: str
    mode: str
    account: str | None
    until: float | None  # epoch seconds it cools until; None: available


@dataclass(frozen=True, slots=True)
class PoolState:
    name: str
    strategy: str
    members: tuple[MemberState, ...]


def store_address(limits: LimitsStoreConfig) -> str:
    """Where the store is, for a message: ``host:port`` or the socket path (never the
    URL, which carries the ACL user's password)."""
    try:
        address = parse_url(limits.redis_url)
    except ValueError:
        return "[gateway.limits] redis_url"
    return address.path or f"{address.host}:{address.port}"


async def read_pools(
    config: GatewayConfig,
    *,
    wait_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    clock: Callable[[], float] = time.time,
) -> list[PoolState]:
    """Every pool of ``config`` with its members' states now (config order)."""
    if not config.pools:
        return []
    limits = config.limits
    assert limits is not None, "a pool needs [gateway.limits] (the config says so)"
    base = f"{limits.key_prefix}limits:"
    keys = [
        cool_key(base, name, member.id)
        for name, pooled in config.pools.items()
        for member in pooled.members
    ]
    replies = await _get_all(limits, keys, wait_seconds)
    now = clock()
    found = iter(replies)
    return [
        PoolState(
            name,
            pooled.pool.strategy.value,
            tuple(
                MemberState(
                    member.id,
                    member.name,
                    member.mode,
                    member.account,
                    # As a worker's poll: DEFAULT_MAX_SECONDS is the cap its view applies.
                    parse_until(next(found), now, DEFAULT_MAX_SECONDS),
                )
                for member in pooled.members
            ),
        )
        for name, pooled in config.pools.items()
    ]


async def _get_all(
    limits: LimitsStoreConfig, keys: Sequence[str], wait_seconds: float
) -> list[Reply]:
    """Every key's value, read as a worker's poll reads them (``read_cool_downs``: a
    key holding another type reads as absent). ``StoreUnreachable`` past
    ``wait_seconds``, or when the store refuses."""
    where = store_address(limits)
    client = RespClient.from_url(limits.redis_url, timeout=wait_seconds)
    try:
        # The client's deadlines bound each call; this bounds a connect that hangs too.
        async with asyncio.timeout(wait_seconds + 0.5):
            return await read_cool_downs(client, poll_command(keys), len(keys))
    except ReplyError as exc:
        raise StoreUnreachable(
            f"the limits store at {where} ([gateway.limits]) cannot be read: it "
            f"refused: {exc}; the pools' cool-downs are unknown"
        ) from None
    except (TimeoutError, RedisUnavailable) as exc:
        raise StoreUnreachable(_unreachable(where, wait_seconds, exc)) from None
    finally:
        await client.close()


def _unreachable(where: str, wait_seconds: float, exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        detail = f"no reply within {wait_seconds:g} s"
    return (
        f"the limits store at {where} ([gateway.limits]) cannot be read: {detail}; "
        "the pools' cool-downs are unknown"
    )


def _stamp(until: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))


def _left(until: float, now: float) -> int:
    return max(1, math.ceil(until - now))


def member_state(member: MemberState, now: float) -> str:
    """``cooling until 2027-01-31 12:00:05 UTC (37 s)`` or ``available``."""
    if member.until is None:
        return "available"
    return f"cooling until {_stamp(member.until)} ({_left(member.until, now)} s)"


def format_pools(pools: Sequence[PoolState], now: float) -> str:
    """A table per pool, under a line naming it and its strategy."""
    blocks = []
    for pool in pools:
        rows = [("MEMBER", "NAME", "MODE", "ACCOUNT", "STATE")]
        rows += [
            (m.id, m.name, m.mode, m.account or "-", member_state(m, now)) for m in pool.members
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        cooling = sum(1 for m in pool.members if m.until is not None)
        count = f"{len(pool.members)} member{'s' if len(pool.members) != 1 else ''}"
        lines = [f"pool {pool.name} ({pool.strategy}; {count}, {cooling} cooling)"]
        lines += [
            "  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def pools_json(pools: Sequence[PoolState], now: float) -> list[dict[str, object]]:
    return [
        {
            "name": pool.name,
            "strategy": pool.strategy,
            "members": [
                {
                    "id": m.id,
                    "name": m.name,
                    "mode": m.mode,
                    "account": m.account,
                    "state": "available" if m.until is None else "cooling",
                    "cooling_until": None
                    if m.until is None
                    else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.until)),
                    "seconds_left": None if m.until is None else _left(m.until, now),
                }
                for m in pool.members
            ],
        }
        for pool in pools
    ]
