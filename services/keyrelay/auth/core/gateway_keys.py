"""Gateway keys at runtime (DESIGN.md §6.1): what a key is and what input is accepted. No I/O.

Each check raises ``InvalidArgument`` with a message naming the field (as the proto
spells it) and what it accepts. The rules:

- ``name``: 1-64 letters, digits and ``._@+-``, starting with a letter or digit.
- ``route.account_id``: as for accounts; required for modes ``oauth`` and ``auto``.
- ``route.mode``: ``oauth`` (the default), ``api_key`` or ``auto``.
- ``route.profile``/``route.upstream``: 1-64 letters, digits and ``._-``; default
  ``default``. Whether the gateway config defines them is the gateway's to check.
- limits: ``keyrelay.limit_rules``, the rules the gateways enforce them by (unset:
  no limit; zero refused: leave it unset, or revoke the key to stop it).
- ``expires_at``: 0 (never) or a Unix time in the future, at most ``MAX_EXPIRES_AT``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from keyrelay import limit_rules as rules
from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.ids import validate_account_id

MODES: Final = ("oauth", "api_key", "auto")
DEFAULT_MODE: Final = "oauth"
DEFAULT_PROFILE: Final = "default"
DEFAULT_UPSTREAM: Final = "default"
LIMIT_FIELDS: Final = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
MAX_EXPIRES_AT: Final = 253_402_300_799  # 9999-12-31T23:59:59Z

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_ID = re.compile(r"^gk-[0-9a-f]{16}$")
KEY_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Route:
    account_id: str = ""
    mode: str = DEFAULT_MODE
    profile: str = DEFAULT_PROFILE
    upstream: str = DEFAULT_UPSTREAM


@dataclass(frozen=True, slots=True)
class Budget:
    amount: float
    unit: str
    period: str


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    budget: Budget | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {f: getattr(self, f) for f in LIMIT_FIELDS}
        if self.budget is not None:
            budget = self.budget
            data["budget"] = {"amount": budget.amount, "unit": budget.unit, "period": budget.period}
        return json.dumps({k: v for k, v in data.items() if v is not None}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Limits:
        data: dict[str, Any] = json.loads(text) if text else {}
        budget = data.pop("budget", None)
        return cls(**data, budget=None if budget is None else Budget(**budget))


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

    def fields(self) -> dict[str, str]:
        """The stored fields these changes write (the store's hash layout)."""
        fields: dict[str, str] = {}
        if self.name is not None:
            fields["name"] = self.name
        if self.route is not None:
            fields.update(route_fields(self.route))
        if self.limits is not None:
            fields["limits"] = self.limits.to_json()
        if self.expires_at is not None:
            fields["expires_at"] = str(self.expires_at)
        return fields


def route_fields(route: Route) -> dict[str, str]:
    return {
        "account_id": route.account_id,
        "mode": route.mode,
        "profile": route.profile,
        "upstream": route.upstream,
    }


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
    mode = route.mode or DEFAULT_MODE
    if mode not in MODES:
        raise InvalidArgument(f"route.mode must be one of {', '.join(MODES)} (got {mode[:32]!r})")
    if route.account_id:
        validate_account_id(route.account_id, "route.account_id")
    elif mode != "api_key":
        raise InvalidArgument(f"route.account_id is required for mode {mode!r}")
    profile = route.profile or DEFAULT_PROFILE
    upstream = route.upstream or DEFAULT_UPSTREAM
    for field_name, value in (("route.profile", profile), ("route.upstream", upstream)):
        if not ROUTE_NAME.match(value):
            raise InvalidArgument(
                f"{field_name} must be 1-64 characters of letters, digits and ._- "
                "starting with a letter or digit"
            )
    return Route(route.account_id, mode, profile, upstream)


def validate_limits(limits: Limits) -> Limits:
    """The gateway's rules (``keyrelay.limit_rules``), so the auth service never
    accepts limits a gateway would refuse to enforce; zero is refused there too
    (leave a limit unset for none, or revoke the key to stop it)."""
    data: dict[str, object] = {
        name: getattr(limits, name) for name in LIMIT_FIELDS if getattr(limits, name) is not None
    }
    if limits.budget is not None:
        budget = limits.budget
        amount: object = budget.amount
        if budget.unit == "tokens" and math.isfinite(budget.amount) and budget.amount.is_integer():
            amount = int(budget.amount)  # a whole number of tokens, as the proto's double
        data["budget"] = {"amount": amount, "unit": budget.unit, "period": budget.period}
    try:
        rules.Limits.from_dict(data, where="limits")
    except rules.LimitsError as exc:
        raise InvalidArgument(str(exc)) from None
    return limits


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
        limits=None if changes.limits is None else validate_limits(changes.limits),
        expires_at=None
        if changes.expires_at is None
        else validate_expires_at(changes.expires_at, now),
    )
