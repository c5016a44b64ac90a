"""The gateway's key book: config keys and keys created at runtime (DESIGN §6.1). No I/O.

Two sources, one lookup by the key's hash (``sha256:<hex>``):

- **config keys** (``[[keys]]``): read-only, and they always win: a runtime key
  whose hash is a config key's is not taken (it would shadow the operator's file);
- **runtime keys** (``CreateKey`` on the auth service; ``keyrelay.gateway.key_follower``
  loads and follows them): each becomes a ``Route`` with the config's profile,
  upstream and account limits *by name*; a key that names a pool gets the config's
  ``[pools.<name>]`` by name (mode ``pool``, its own limits only, as a config key
  naming a pool).

A runtime key this gateway cannot serve as its owner meant is **not taken**, never
a crash (``Refusal``): its hash then answers what the client should be told (401,
or 503 for limits this gateway cannot enforce), and the caller logs and counts it.

Expiry makes no event: ``lookup`` compares ``expires_at`` with ``now`` on every
call, and the app's raw-key cache keeps the expiry beside the route. ``version``
grows with every change, so that cache can tell when to forget what it holds.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.config import (
    DEFAULT_MODE,
    DEFAULT_PROFILE,
    DEFAULT_UPSTREAM,
    GatewayConfig,
    Route,
    key_subjects,
)
from keyrelay.gateway.core.errors import LIMITS_UNAVAILABLE, UNKNOWN_KEY, GatewayError
from keyrelay.limit_rules import Limits, LimitsError

__all__ = [
    "NEVER",
    "Entry",
    "KeyBook",
    "Refusal",
    "RuntimeKey",
    "runtime_key",
]

NEVER: Final = math.inf  # the expiry of a key that does not expire


class Refusal(StrEnum):
    """Why a runtime key was not taken (the metric's ``reason`` label)."""

    SHADOWS_CONFIG = "shadows_config"  # its hash is a [[keys]] entry's: the config wins
    UNKNOWN_PROFILE = "unknown_profile"  # no [profiles.<name>] here
    UNKNOWN_UPSTREAM = "unknown_upstream"  # no [upstreams.<name>] here
    UNKNOWN_POOL = "unknown_pool"  # no [pools.<name>] here
    NEEDS_API_KEY = "needs_api_key"  # mode api_key/auto: no upstream key travels at runtime
    NO_ACCOUNT = "no_account"  # mode oauth without an account
    BAD_LIMITS = "bad_limits"  # limits this gateway does not accept
    NO_LIMITS_STORE = "no_limits_store"  # limits, and no [gateway.limits] to enforce them


# What the client of a key that was not taken is told (and the log line says).
REFUSAL_MESSAGES: Final = {
    Refusal.UNKNOWN_PROFILE: "its profile {profile!r} is not defined on this gateway",
    Refusal.UNKNOWN_UPSTREAM: "its upstream {upstream!r} is not defined on this gateway",
    Refusal.UNKNOWN_POOL: "its pool {pool!r} is not defined on this gateway",
    Refusal.NEEDS_API_KEY: (
        "its mode {mode!r} needs an upstream API key, which only a [[keys]] entry of the "
        "gateway config can name (a runtime key's mode must be oauth)"
    ),
    Refusal.NO_ACCOUNT: "it names no account",
    Refusal.BAD_LIMITS: "its limits are not valid here ({detail})",
    Refusal.NO_LIMITS_STORE: (
        "it has limits and this gateway has no limits store ([gateway.limits]) to enforce "
        "them, so it refuses the key rather than serve it unlimited"
    ),
}


@dataclass(frozen=True, slots=True)
class RuntimeKey:
    """A runtime key as the auth service describes it (``GatewayKey``), in plain types."""

    key_id: str
    name: str
    key_sha256: str
    account: str
    mode: str
    profile: str
    upstream: str
    # Plain values as Limits.from_dict takes them (None: no limit of that kind).
    limits: Mapping[str, object]
    expires_at: int  # unix seconds; 0: never
    version: int
    revoked: bool = False
    pool: str = ""  # a [pools.<name>] of the config (mode "pool", no account); "": none


def runtime_key(message: auth_pb2.GatewayKey) -> RuntimeKey:
    """From the protobuf message (``GetKey``, ``ListKeys``)."""
    route, limits = message.route, message.limits
    plain: dict[str, object] = {
        name: getattr(limits, name) if limits.HasField(name) else None
        for name in ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
    }
    if limits.HasField("budget"):
        budget = limits.budget
        amount: float | int = budget.amount
        if budget.unit == "tokens" and float(amount).is_integer():
            amount = int(amount)  # a double on the wire; Limits counts tokens in integers
        plain["budget"] = {"amount": amount, "unit": budget.unit, "period": budget.period}
    return RuntimeKey(
        key_id=message.key_id,
        name=message.name,
        key_sha256=message.key_sha256.lower(),
        # A pool's members are the credentials: the route's own account and mode are
        # not used (the auth service leaves them empty and "pool").
        account="" if route.pool else route.account_id,
        mode="pool" if route.pool else route.mode or DEFAULT_MODE,
        profile=route.profile or DEFAULT_PROFILE,
        upstream=route.upstream or DEFAULT_UPSTREAM,
        limits=plain,
        expires_at=message.expires_at,
        version=message.version,
        revoked=message.revoked_at != 0,
        pool=route.pool,
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """What a runtime key's hash resolves to: a route, or the refusal to answer."""

    key_id: str
    name: str
    version: int
    route: Route | None
    expires_at: float  # NEVER, or unix seconds
    refusal: Refusal | None = None
    message: str = ""  # the refusal, for the client and the log


def expired_error(expires_at: float) -> GatewayError:
    when = dt.datetime.fromtimestamp(expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return GatewayError(
        UNKNOWN_KEY,
        f"this gateway key expired at {when}; ask the gateway's operator for a new one "
        "(or to extend it: keyrelay keys update KEY_ID --expires ...)",
    )


def refused_error(entry: Entry) -> GatewayError:
    kind = LIMITS_UNAVAILABLE if entry.refusal is Refusal.NO_LIMITS_STORE else UNKNOWN_KEY
    return GatewayError(kind, f"this gateway key is not usable on this gateway: {entry.message}")


class KeyBook:
    """Config keys (by hash, read-only) and runtime keys (by hash and by key id).

    ``put``/``remove``/``replace`` return what changed; ``lookup`` answers a hash.
    """

    __slots__ = ("_by_hash", "_by_id", "_config", "version")

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self._by_hash: dict[str, Entry] = {}
        self._by_id: dict[str, str] = {}  # key id -> its hash
        # One more with every change to the runtime keys (the app's cache compares it).
        self.version = 0

    def __len__(self) -> int:
        """The runtime keys taken (refused ones are not counted)."""
        return sum(1 for e in self._by_hash.values() if e.route is not None)

    def lookup(self, key_sha256: str, now: float) -> tuple[Route, float] | None:
        """The route of this hash and its expiry (``NEVER`` for config keys); None:
        no such key. Raises the ``GatewayError`` of an expired or refused runtime key."""
        route = self._config.routes.get(key_sha256)
        if route is not None:
            return route, NEVER
        entry = self._by_hash.get(key_sha256)
        if entry is None:
            return None
        if entry.route is None:
            raise refused_error(entry)
        if entry.expires_at <= now:
            raise expired_error(entry.expires_at)
        return entry.route, entry.expires_at

    def entry(self, key_id: str) -> Entry | None:
        key_hash = self._by_id.get(key_id)
        return None if key_hash is None else self._by_hash.get(key_hash)

    def put(self, key: RuntimeKey) -> Entry | None:
        """Takes (or refuses) ``key``, replacing an older version of it; a revoked key
        is removed. Returns the new entry, or None when nothing changed (an older
        version than the one held, or a revoked key not held). A key shadowing a
        config key is kept out of the book (its entry is returned, not stored)."""
        held = self.entry(key.key_id)
        if held is not None and held.version > key.version:
            return None
        if key.revoked:
            self._drop(key.key_id)
            return None
        entry = self._entry(key)
        if entry.refusal is Refusal.SHADOWS_CONFIG:
            self._drop(key.key_id)
            return entry
        if held != entry:
            self._drop(key.key_id)
            self._by_hash[key.key_sha256] = entry
            self._by_id[key.key_id] = key.key_sha256
            self.version += 1
        return entry

    def remove(self, key_id: str) -> bool:
        """Forgets the key (revoked, or gone from the auth service); True if it was held."""
        return self._drop(key_id)

    def replace(self, keys: Iterable[RuntimeKey]) -> list[Entry]:
        """Every runtime key at once (a full load): the book then holds these and no
        others. Returns the entries of the keys not taken (refusals), for the log."""
        self._by_hash.clear()
        self._by_id.clear()
        self.version += 1
        refused = []
        for key in keys:
            held = self.entry(key.key_id)
            if key.revoked or (held is not None and held.version > key.version):
                continue
            entry = self.put(key)
            if entry is not None and entry.refusal is not None:
                refused.append(entry)
        return refused

    def _drop(self, key_id: str) -> bool:
        key_hash = self._by_id.pop(key_id, None)
        if key_hash is None:
            return False
        del self._by_hash[key_hash]
        self.version += 1
        return True

    def _entry(self, key: RuntimeKey) -> Entry:
        config = self._config
        expires_at = float(key.expires_at) if key.expires_at else NEVER

        def refuse(refusal: Refusal, **detail: object) -> Entry:
            message = REFUSAL_MESSAGES.get(refusal, "")
            fields = {
                "profile": key.profile,
                "upstream": key.upstream,
                "mode": key.mode,
                "pool": key.pool,
            }
            return Entry(
                key.key_id,
                key.name,
                key.version,
                None,
                expires_at,
                refusal,
                message.format(**fields, **detail),
            )

        if key.key_sha256 in config.routes:
            return refuse(Refusal.SHADOWS_CONFIG)
        profile = config.profiles.get(key.profile)
        if profile is None:
            return refuse(Refusal.UNKNOWN_PROFILE)
        upstream = config.upstreams.get(key.upstream)
        if upstream is None:
            return refuse(Refusal.UNKNOWN_UPSTREAM)
        # A key naming a pool: the config's pool by name, whose members are the
        # credentials; its subjects are the key alone (an account's limits belong to
        # one account, and a pool's request may go to any member), as for a [[keys]]
        # entry naming a pool.
        pooled = config.pools.get(key.pool) if key.pool else None
        if key.pool and pooled is None:
            return refuse(Refusal.UNKNOWN_POOL)
        if pooled is None and key.mode != "oauth":
            return refuse(Refusal.NEEDS_API_KEY)
        if pooled is None and not key.account:
            return refuse(Refusal.NO_ACCOUNT)
        try:
            limits: Limits | None = Limits.from_dict(key.limits, where="limits")
        except LimitsError as exc:
            return refuse(Refusal.BAD_LIMITS, detail=str(exc))
        if limits is not None and limits.unlimited:
            limits = None
        account = None if pooled is not None else key.account
        account_limits = None if account is None else config.account_limits.get(account)
        if limits is not None and config.limits is None:
            return refuse(Refusal.NO_LIMITS_STORE)
        route = Route(
            name=key.name,
            account=account,
            mode="oauth" if pooled is None else "pool",
            profile_name=key.profile,
            profile=profile,
            upstream=upstream,
            subjects=key_subjects(key.key_sha256, key.name, account, limits, account_limits),
            pool=pooled,
        )
        return Entry(key.key_id, key.name, key.version, route, expires_at)
