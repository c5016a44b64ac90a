"""What limits a gateway key or account may have, and their validation (DESIGN §6.2).

One set of rules for every place limits come from: the gateway's config file
(``[[keys]] limits``, ``[accounts.<id>.limits]``), the auth service's runtime
keys (``CreateKey``/``UpdateKey``) and the gateway loading those. Imports
neither service (``keyrelay.gateway.core.ratelimit`` decides with them; the auth
service validates with them). No I/O.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from enum import StrEnum
from typing import Final, TypeVar

MICRO_USD: Final = 1_000_000  # budgets in USD are counted in micro-dollars

# The largest limits accepted. Beyond them a value is a typo, not a policy, and
# every counter must stay exact in Lua (numbers are doubles: integers are exact
# up to 2**53 ~ 9.007e15; USD are counted in micro-dollars).
MAX_REQUESTS_PER_MINUTE: Final = 10**9
MAX_TOKENS_PER_MINUTE: Final = 10**12
MAX_CONCURRENT_REQUESTS: Final = 10**6
MAX_BUDGET_USD: Final = 10**9
MAX_BUDGET_TOKENS: Final = 10**15

_E = TypeVar("_E", bound=StrEnum)


class LimitsError(ValueError):
    """Limits that cannot be enforced: the message names the field and what is allowed."""


class Period(StrEnum):
    MINUTE = "minute"
    DAY = "day"
    MONTH = "month"


class BudgetUnit(StrEnum):
    USD = "usd"
    TOKENS = "tokens"


# What a budget may be counted in and over (a minute is tokens_per_minute's).
BUDGET_UNITS: Final = tuple(unit.value for unit in BudgetUnit)
BUDGET_PERIODS: Final = (Period.DAY.value, Period.MONTH.value)


# -- limits and their validation -------------------------------------------------------


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(data: Mapping[str, object], known: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise LimitsError(f"{where} must be a table of limits, got {type(data).__name__}")
    for name in data:
        if not isinstance(name, str) or name not in known:
            raise LimitsError(
                f"{where}: unknown limit {name!r}{_did_you_mean(str(name), known)}; "
                f"known: {', '.join(known)}"
            )


def _count(value: object, where: str, maximum: int) -> int:
    """A positive integer up to ``maximum`` (a bool is not an integer here)."""
    if type(value) is not int:
        raise LimitsError(f"{where} must be an integer, got {_shown(value)}")
    if value <= 0:
        raise LimitsError(f"{where} must be at least 1, got {value} (leave it out for no limit)")
    if value > maximum:
        raise LimitsError(f"{where} must be at most {maximum:,}, got {value:,}")
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}"


def _choice(value: object, where: str, enum: type[_E]) -> _E:
    names = [member.value for member in enum]
    if not isinstance(value, str):
        raise LimitsError(f"{where} must be one of {', '.join(names)}, got {_shown(value)}")
    try:
        return enum(value)
    except ValueError:
        raise LimitsError(
            f"{where} must be one of {', '.join(names)}, got {value!r}{_did_you_mean(value, names)}"
        ) from None


@dataclass(frozen=True, slots=True)
class Budget:
    """``amount`` in the budget's counter unit: micro-dollars (USD) or tokens."""

    amount: int
    unit: BudgetUnit
    period: Period

    def __post_init__(self) -> None:
        if self.period is Period.MINUTE:
            raise LimitsError("a budget's period is day or month")
        maximum = MAX_BUDGET_USD * MICRO_USD if self.unit is BudgetUnit.USD else MAX_BUDGET_TOKENS
        if type(self.amount) is not int or not 0 < self.amount <= maximum:
            raise LimitsError(f"budget amount must be in 1..{maximum:,} {self.counter_unit}")

    @property
    def counter_unit(self) -> str:
        return "micro-dollars" if self.unit is BudgetUnit.USD else "tokens"

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, where: str = "budget") -> Budget:
        _check_keys(data, ("amount", "unit", "period"), where)
        for name in ("amount", "unit", "period"):
            if data.get(name) is None:
                raise LimitsError(f"{where}.{name} is required")
        unit = _choice(data["unit"], f"{where}.unit", BudgetUnit)
        period = _choice(data["period"], f"{where}.period", Period)
        if period is Period.MINUTE:
            raise LimitsError(
                f"{where}.period must be day or month, got 'minute' "
                "(per minute: use tokens_per_minute)"
            )
        amount = data["amount"]
        if unit is BudgetUnit.TOKENS:
            return cls(_count(amount, f"{where}.amount", MAX_BUDGET_TOKENS), unit, period)
        return cls(_usd(amount, f"{where}.amount"), unit, period)

    @property
    def plain_amount(self) -> float | int:
        """The amount as people, the config and the admin RPC state it (``from_dict``
        takes it back): US dollars (a float) or tokens (an int)."""
        return self.amount / MICRO_USD if self.unit is BudgetUnit.USD else self.amount

    def to_dict(self) -> dict[str, object]:
        """Plain values: ``Budget.from_dict(budget.to_dict()) == budget``."""
        return {"amount": self.plain_amount, "unit": self.unit.value, "period": self.period.value}

    def shown(self, units: int) -> str:
        """A counter value in this budget's unit, for people: ``$12.50``, ``1,000 tokens``."""
        if self.unit is BudgetUnit.USD:
            return f"${units / MICRO_USD:,.2f}"
        return f"{units:,} tokens"


def _usd(value: object, where: str) -> int:
    """A positive USD amount (int or float) up to MAX_BUDGET_USD, as micro-dollars."""
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise LimitsError(f"{where} must be a number of US dollars, got {_shown(value)}")
    try:
        micro = int((Decimal(repr(value)) * MICRO_USD).to_integral_value(rounding=ROUND_HALF_EVEN))
    except InvalidOperation:  # pragma: no cover - finite numbers always convert
        raise LimitsError(f"{where} must be a number of US dollars, got {value!r}") from None
    if micro <= 0:
        raise LimitsError(
            f"{where} must be more than 0 US dollars (at least 0.000001), got {value!r} "
            "(leave the budget out for none)"
        )
    if micro > MAX_BUDGET_USD * MICRO_USD:
        raise LimitsError(f"{where} must be at most {MAX_BUDGET_USD:,} US dollars, got {value!r}")
    return micro


_LIMIT_NAMES: Final = ("requests_per_minute", "tokens_per_minute", "concurrent_requests", "budget")


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one subject; ``None``: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    budget: Budget | None = None

    def __post_init__(self) -> None:
        for name, maximum in (
            ("requests_per_minute", MAX_REQUESTS_PER_MINUTE),
            ("tokens_per_minute", MAX_TOKENS_PER_MINUTE),
            ("concurrent_requests", MAX_CONCURRENT_REQUESTS),
        ):
            value = getattr(self, name)
            if value is not None:
                _count(value, name, maximum)

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, where: str = "limits") -> Limits:
        """Limits from a plain dict (TOML table, admin RPC). A missing or ``None``
        value is no limit; anything else must be valid. Raises ``LimitsError``."""
        _check_keys(data, _LIMIT_NAMES, where)

        def count(name: str, maximum: int) -> int | None:
            value = data.get(name)
            return None if value is None else _count(value, f"{where}.{name}", maximum)

        budget = data.get("budget")
        if budget is not None and not isinstance(budget, Mapping):
            raise LimitsError(
                f"{where}.budget must be a table (amount, unit, period), got {_shown(budget)}"
            )
        return cls(
            requests_per_minute=count("requests_per_minute", MAX_REQUESTS_PER_MINUTE),
            tokens_per_minute=count("tokens_per_minute", MAX_TOKENS_PER_MINUTE),
            concurrent_requests=count("concurrent_requests", MAX_CONCURRENT_REQUESTS),
            budget=None if budget is None else Budget.from_dict(budget, where=f"{where}.budget"),
        )

    def to_dict(self) -> dict[str, object]:
        """Plain values, the limits set only: ``Limits.from_dict(limits.to_dict()) == limits``."""
        counts = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
        data: dict[str, object] = {
            name: value for name in counts if (value := getattr(self, name)) is not None
        }
        if self.budget is not None:
            data["budget"] = self.budget.to_dict()
        return data

    @property
    def unlimited(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.concurrent_requests is None
            and self.budget is None
        )
