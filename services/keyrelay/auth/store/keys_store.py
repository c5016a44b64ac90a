"""Gateway keys in Redis (DESIGN.md §6.1), beside the accounts of ``redis_store``.

Keys (``P`` is the configured prefix)::

    P gwkey:<key_id>   hash   name, key_sha256, account_id, mode, profile, upstream,
                              pool (below), limits (JSON, below), created_at,
                              updated_at, expires_at (0: never), revoked_at (0: live),
                              version
    P gwkeys           zset   every key id ever created (revoked ones stay, for audit),
                              scored by its creation time (ms): ListKeys' order
    P gwkeys:sha256    hash   key_sha256 -> key_id: one key per hash, for good

The secret is never stored, only ``sha256:<hex>`` of it. Every write is one Lua
script that checks first, then appends ``KEY_CHANGED`` (reason ``created``,
``updated`` or ``revoked``; ``generation`` the key's new version) to the event
stream, then writes: the checks read every key the script writes (a key of the
wrong type fails them) and the append comes before the other writes, so a script
that fails leaves nothing half-written, and no event is without its change. Each
carries an operation key (``_ONCE``): a re-sent copy answers as the first run.

``limits`` is ``keyrelay.limit_rules.Limits.to_dict()`` as JSON with sorted keys, the
limits set only: ``{"budget": {"amount": 12.5, "period": "month", "unit": "usd"},
"requests_per_minute": 60}``; ``{}`` for none. A budget's amount is in US dollars or
tokens, as the admin RPC states it (not the micro-dollars ``Limits`` counts in), which
is what every earlier version wrote and reads, so replicas of both can share a Redis.
Read back, a whole number of tokens written as a float (by the version before) is the
integer it is, and a USD amount under a micro-dollar (which the version before that
accepted) is the smallest budget, a micro-dollar.

``pool`` is the name of the gateway pool a key routes to (its ``mode`` is then
``pool`` and its ``account_id`` empty), else empty; every route write writes it. A
record without it (written before keys could name a pool) has no pool, and so does
one whose ``mode`` is not ``pool``: a replica of that earlier version that replaced
such a key's route wrote the other fields and left a stale ``pool`` behind.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Sequence
from typing import Final, cast

from keyrelay.auth.core.gateway_keys import (
    POOL_MODE,
    KeyChanges,
    KeyRecord,
    Route,
    whole_tokens,
)
from keyrelay.auth.store.redis_store import _ONCE, OPERATION_TTL_MS, RedisStore
from keyrelay.limit_rules import MICRO_USD, Limits

# KEYS: [1] key hash, [2] key ids (sorted set), [3] sha256 index, [4] event stream,
#       [5] operation key
# ARGV: [1] key id, [2] key_sha256, [3] account id (the event's), [4] stream maxlen,
#       [5] event time (ms), [6 .. #ARGV-1] field/value pairs, [#ARGV] operation key TTL (ms)
# Returns 1, or a Refused value: nothing is written then.
_CREATE_KEY = (
    _ONCE
    + """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) or redis.call('EXISTS', KEYS[1]) == 1 then
  return done(-4)
end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return done(-5) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'account_id', ARGV[3],
  'kind', 'KEY_CHANGED', 'reason', 'created', 'generation', 1, 'at', ARGV[5], 'key_id', ARGV[1])
redis.call('HSET', KEYS[1], 'version', 1, unpack(ARGV, 6, #ARGV - 1))
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
return done(1)
"""
)

# KEYS: [1] key hash, [2] event stream, [3] operation key
# ARGV: [1] key id, [2] expected version ('' = any), [3] reason ('updated' or 'revoked'),
#       [4] stream maxlen, [5] event time (ms), [6 .. #ARGV-1] field/value pairs
#       (updated_at always; revoked_at for a revocation), [#ARGV] operation key TTL (ms)
# Returns the new version, or a Refused value: nothing is written then. A revoked key
# never changes again, so of an update and a revocation racing, exactly one wins
# when both expect the same version, and none lands after the revocation anyway.
_CHANGE_KEY = (
    _ONCE
    + """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return done(-1) end
if redis.call('HGET', KEYS[1], 'revoked_at') ~= '0' then return done(-2) end
if ARGV[2] ~= '' and version ~= ARGV[2] then return done(-3) end
version = tonumber(version) + 1
local account = redis.call('HGET', KEYS[1], 'account_id')
for i = 6, #ARGV - 2, 2 do
  if ARGV[i] == 'account_id' then account = ARGV[i + 1] end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'account_id', account,
  'kind', 'KEY_CHANGED', 'reason', ARGV[3], 'generation', version, 'at', ARGV[5],
  'key_id', ARGV[1])
redis.call('HSET', KEYS[1], 'version', version, unpack(ARGV, 6, #ARGV - 1))
return done(version)
"""
)


class Refused(enum.IntEnum):
    """Why a key script wrote nothing (its negative results)."""

    NOT_FOUND = -1
    REVOKED = -2
    VERSION_MISMATCH = -3
    ID_TAKEN = -4
    HASH_TAKEN = -5


KEY_ID_PREFIX: Final = "gk-"


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(8)


def _pairs(fields: dict[str, str]) -> list[str]:
    return [part for item in fields.items() for part in item]


def stored_limits(limits: Limits) -> str:
    """The ``limits`` field of a key's hash (module docstring)."""
    return json.dumps(limits.to_dict(), sort_keys=True)


def limits_of_stored(text: str, where: str = "stored limits") -> Limits:
    """A key's ``limits`` field read back, as any version wrote it (module docstring).
    ``LimitsError`` (naming ``where``) if it is not limits at all."""
    data = json.loads(text) if text else {}
    if isinstance(data, dict):
        data = whole_tokens(data)
        budget = data.get("budget")
        if isinstance(budget, dict) and budget.get("unit") == "usd":
            amount = budget.get("amount")
            if isinstance(amount, int | float) and 0 < amount < 1 / MICRO_USD:
                data = {**data, "budget": {**budget, "amount": 1 / MICRO_USD}}
    return Limits.from_dict(data, where=where)


def route_fields(route: Route) -> dict[str, str]:
    return {
        "account_id": route.account_id,
        "mode": route.mode,
        "profile": route.profile,
        "upstream": route.upstream,
        "pool": route.pool,
    }


def change_fields(changes: KeyChanges) -> dict[str, str]:
    """The fields of a key's hash that ``changes`` write."""
    fields: dict[str, str] = {}
    if changes.name is not None:
        fields["name"] = changes.name
    if changes.route is not None:
        fields.update(route_fields(changes.route))
    if changes.limits is not None:
        fields["limits"] = stored_limits(changes.limits)
    if changes.expires_at is not None:
        fields["expires_at"] = str(changes.expires_at)
    return fields


def _record(key_id: str, raw: dict[bytes, bytes]) -> KeyRecord:
    text = {k.decode(): v.decode() for k, v in raw.items()}
    return KeyRecord(
        key_id=key_id,
        name=text["name"],
        key_sha256=text["key_sha256"],
        route=Route(
            text["account_id"],
            text["mode"],
            text["profile"],
            text["upstream"],
            text.get("pool", "") if text["mode"] == POOL_MODE else "",
        ),
        limits=limits_of_stored(text["limits"], f"gateway key {key_id}: stored limits"),
        created_at=int(text["created_at"]),
        updated_at=int(text["updated_at"]),
        expires_at=int(text["expires_at"]),
        revoked_at=int(text["revoked_at"]),
        version=int(text["version"]),
    )


class KeyStore:
    """Gateway keys, on the connection pool, prefix and event stream of a ``RedisStore``."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._redis = store.client
        self._prefix = store.prefix
        self._ids_key = f"{store.prefix}gwkeys"
        self._sha_index = f"{store.prefix}gwkeys:sha256"
        self._create = self._redis.register_script(_CREATE_KEY)
        self._change = self._redis.register_script(_CHANGE_KEY)

    def _key(self, key_id: str) -> str:
        return f"{self._prefix}gwkey:{key_id}"

    async def create_key(
        self,
        key_id: str,
        *,
        name: str,
        key_sha256: str,
        route: Route,
        limits: Limits,
        expires_at: int,
        now: float,
    ) -> KeyRecord | Refused:
        """The new key (version 1), or ``ID_TAKEN``/``HASH_TAKEN``."""
        record = KeyRecord(
            key_id=key_id,
            name=name,
            key_sha256=key_sha256,
            route=route,
            limits=limits,
            created_at=int(now),
            updated_at=int(now),
            expires_at=expires_at,
            revoked_at=0,
            version=1,
        )
        fields = {
            "name": name,
            "key_sha256": key_sha256,
            **route_fields(route),
            "limits": stored_limits(limits),
            "created_at": str(record.created_at),
            "updated_at": str(record.updated_at),
            "expires_at": str(expires_at),
            "revoked_at": "0",
        }
        result = await self._create(
            keys=[
                self._key(key_id),
                self._ids_key,
                self._sha_index,
                self._store.events_stream,
                self._store.new_operation(),
            ],
            args=[
                key_id,
                key_sha256,
                route.account_id,
                self._store.events_maxlen,
                int(now * 1000),
                *_pairs(fields),
                OPERATION_TTL_MS,
            ],
        )
        return record if int(result) == 1 else Refused(int(result))

    async def update_key(
        self, key_id: str, changes: KeyChanges, *, expected_version: int | None, now: float
    ) -> int | Refused:
        """The new version, or why nothing changed."""
        fields = {**change_fields(changes), "updated_at": str(int(now))}
        return await self._run_change(key_id, "updated", fields, expected_version, now)

    async def revoke_key(
        self, key_id: str, *, expected_version: int | None, now: float
    ) -> int | Refused:
        """The new version, or why nothing changed (``REVOKED``: revoked before)."""
        stamp = str(int(now))
        fields = {"revoked_at": stamp, "updated_at": stamp}
        return await self._run_change(key_id, "revoked", fields, expected_version, now)

    async def _run_change(
        self,
        key_id: str,
        reason: str,
        fields: dict[str, str],
        expected_version: int | None,
        now: float,
    ) -> int | Refused:
        result = int(
            await self._change(
                keys=[self._key(key_id), self._store.events_stream, self._store.new_operation()],
                args=[
                    key_id,
                    "" if expected_version is None else str(expected_version),
                    reason,
                    self._store.events_maxlen,
                    int(now * 1000),
                    *_pairs(fields),
                    OPERATION_TTL_MS,
                ],
            )
        )
        return result if result > 0 else Refused(result)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._key(key_id)))
        return _record(key_id, raw) if raw else None

    async def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, oldest first: one round trip for the ids,
        one pipelined round trip for the records."""
        members = cast(list[bytes], await self._redis.zrange(self._ids_key, 0, -1))
        return await self._records([m.decode() for m in members])

    async def keys_by_sha256(self, key_sha256s: Sequence[str]) -> dict[str, KeyRecord]:
        """The runtime keys among ``key_sha256s`` (revoked ones too), by hash: one
        round trip for the ids, one pipelined round trip for the records."""
        if not key_sha256s:
            return {}
        found = cast(list[bytes | None], await self._redis.hmget(self._sha_index, key_sha256s))
        ids = [i.decode() for i in found if i is not None]
        records = await self._records(ids)
        return {r.key_sha256: r for r in records}

    async def _records(self, ids: Sequence[str]) -> list[KeyRecord]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self._key(key_id))
            raws = cast(list[dict[bytes, bytes]], await pipe.execute())
        return [_record(i, raw) for i, raw in zip(ids, raws, strict=True) if raw]
