"""Gateway keys at runtime (DESIGN.md §6.1): what a key is and what input is accepted. No I/O.

Each check raises ``InvalidArgument`` with a message naming the field (as the proto
spells it) and what it accepts. The rules:

- ``name``: 1-64 letters, digits and ``._@+-``, starting with a letter or digit.
- ``route.account_id``: as for accounts; required for modes ``oauth`` and ``auto``.
- ``route.mode``: ``oauth`` (the default), ``api_key`` or ``auto``.
- ``route.profile``/``route.upstream``: 1-64 letters, digits and ``._-``; default
  ``default``. Whether the gateway config defines them is the gateway's to check.
- ``route.pool``: a pool of the gateway config (DESIGN §6.3), instead of an account
  and a mode (the pool's members are the credentials): the shape of a profile's name;
  whether a gateway defines it is the gateway's to check. Its mode is then ``pool``
  (a request leaves it empty or says ``pool``), its account empty.
- limits (``limits_from``): ``keyrelay.limit_rules.Limits``, the one definition, which
  the gateways enforce (unset: no limit; zero refused: leave it unset, or revoke the
  key to stop it). A ``Limits`` is valid by construction.
- ``expires_at``: 0 (never) or a Unix time in the future, at most ``MAX_EXPIRES_AT``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.ids import validate_account_id
from keyrelay.limit_rules import Limits, LimitsError

# Limits is limit_rules' (not a copy): part of what a key is, so named here too.
__all__ = [
    "DEFAULT_MODE",
    "DEFAULT_PROFILE",
    "DEFAULT_UPSTREAM",
    "KEY_ID",
    "KEY_NAME",
    "KEY_SHA256",
    "LIMIT_FIELDS",
    "MAX_EXPIRES_AT",
    "MODES",
    "POOL_MODE",
    "ROUTE_NAME",
    "KeyChanges",
    "KeyRecord",
    "Route",
    "limits_from",
    "validate_changes",
    "validate_expires_at",
    "validate_key_id",
    "validate_name",
    "validate_route",
    "whole_tokens",
]

MODES: Final = ("oauth", "api_key", "auto")
POOL_MODE: Final = "pool"  # the mode of a route that names a pool
DEFAULT_MODE: Final = "oauth"
DEFAULT_PROFILE: Final = "default"
DEFAULT_UPSTREAM: Final = "default"
LIMIT_FIELDS: Final = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
MAX_EXPIRES_AT: Final = 253_402_300_799  # 9999-12-31T23:59:59Z

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
KEY_ID = re.compile(r"^gk-[0-9a-f]{16}\Z")
KEY_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True, slots=True)
class Route:
    account_id: str = ""
    mode: str = DEFAULT_MODE
    profile: str = DEFAULT_PROFILE
    upstream: str = DEFAULT_UPSTREAM
    pool: str = ""  # a pool of the gateway config; then mode POOL_MODE, no account


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored key. ``revoked_at`` 0: live; ``expires_at`` 0: never expires."""

    key_id: str
    name: str
    key_sha256: str
    route: Route
    limits: Limits
    created_at: int
    updated_at: int
    expires_at: int
    revoked_at: int
    version: int

    @property
    def revoked(self) -> bool:
        return self.revoked_at != 0


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """What an update replaces; ``None`` keeps the key's."""

    name: str | None = None
    route: Route | None = None
    limits: Limits | None = None
    expires_at: int | None = None


def validate_key_id(key_id: str) -> str:
    if not KEY_ID.match(key_id):
        raise InvalidArgument("key_id must look like gk-0123456789abcdef (as CreateKey returns)")
    return key_id


def validate_name(name: str) -> str:
    if not KEY_NAME.match(name):
        got = f"{len(name)} characters" if not 0 < len(name) <= 64 else "another character"
        raise InvalidArgument(
            "name must be 1-64 characters of letters, digits and ._@+- "
            f"starting with a letter or digit (got {got})"
        )
    return name


def validate_route(route: Route) -> Route:
    if route.pool:
        return _validate_pool_route(route)
    mode = route.mode or DEFAULT_MODE
    if mode == POOL_MODE:
        raise InvalidArgument("route.mode 'pool' needs route.pool (the pool's name)")
    if mode not in MODES:
        raise InvalidArgument(f"route.mode must be one of {', '.join(MODES)} (got {mode[:32]!r})")
    if route.account_id:
        validate_account_id(route.account_id, "route.account_id")
    elif mode != "api_key":
        raise InvalidArgument(f"route.account_id is required for mode {mode!r}")
    profile, upstream = _profile_and_upstream(route)
    return Route(route.account_id, mode, profile, upstream)


def _validate_pool_route(route: Route) -> Route:
    """A route naming a pool: the pool's members are its credentials, so it names no
    account and no mode of its own (as a ``[[keys]]`` entry with ``pool`` names none)."""
    own = [
        name
        for name, value in (("route.account_id", route.account_id), ("route.mode", route.mode))
        if value and not (name == "route.mode" and value == POOL_MODE)
    ]
    if own:
        raise InvalidArgument(
            f"route.pool: a key names a pool or its own credential, not both: leave "
            f"{' and '.join(own)} empty"
        )
    _check_route_name("route.pool", route.pool)
    profile, upstream = _profile_and_upstream(route)
    return Route("", POOL_MODE, profile, upstream, route.pool)


def _profile_and_upstream(route: Route) -> tuple[str, str]:
    profile = route.profile or DEFAULT_PROFILE
    upstream = route.upstream or DEFAULT_UPSTREAM
    _check_route_name("route.profile", profile)
    _check_route_name("route.upstream", upstream)
    return profile, upstream


def _check_route_name(field_name: str, value: str) -> None:
    if not ROUTE_NAME.match(value):
        raise InvalidArgument(
            f"{field_name} must be 1-64 characters of letters, digits and ._- "
            "starting with a letter or digit"
        )


def limits_from(data: Mapping[str, object]) -> Limits:
    """Limits as a request states them (plain values: the proto's fields, the web form's),
    by the gateways' rules (``keyrelay.limit_rules``), so the auth service never accepts
    limits a gateway would refuse to enforce; zero is refused there too (leave a limit
    unset for none, or revoke the key to stop it). ``InvalidArgument`` names the field."""
    try:
        return Limits.from_dict(whole_tokens(data), where="limits")
    except LimitsError as exc:
        raise InvalidArgument(str(exc)) from None


def whole_tokens(data: Mapping[str, object]) -> Mapping[str, object]:
    """``data`` with a budget of a whole number of tokens given as a float (the proto's
    double, or JSON an earlier version wrote from it) as the integer it is."""
    budget = data.get("budget")
    if isinstance(budget, Mapping) and budget.get("unit") == "tokens":
        amount = budget.get("amount")
        if isinstance(amount, float) and amount.is_integer():
            return {**data, "budget": {**budget, "amount": int(amount)}}
    return data


def validate_expires_at(expires_at: int, now: float) -> int:
    if expires_at == 0:
        return 0
    if expires_at <= now:
        raise InvalidArgument(
            f"expires_at must be in the future (Unix seconds; got {expires_at}, now is "
            f"{int(now)}); 0 means never"
        )
    if expires_at > MAX_EXPIRES_AT:
        raise InvalidArgument(f"expires_at must be at most {MAX_EXPIRES_AT} (year 9999)")
    return expires_at


def validate_changes(changes: KeyChanges, now: float) -> KeyChanges:
    if changes == KeyChanges():
        raise InvalidArgument("nothing to update: set name, route, limits or expires_at")
    return KeyChanges(
        name=None if changes.name is None else validate_name(changes.name),
        route=None if changes.route is None else validate_route(changes.route),
        limits=changes.limits,  # valid once it is a Limits (limits_from)
        expires_at=None
        if changes.expires_at is None
        else validate_expires_at(changes.expires_at, now),
    )
