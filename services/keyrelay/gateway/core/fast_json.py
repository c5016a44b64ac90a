"""JSON on the hot path: orjson where it gives the stdlib's answer, the stdlib where it may not.

``loads(raw)`` is ``json.loads(raw)`` (same result, same errors) at about a third
of the cost for the common body. orjson is only asked when its answer is the
stdlib's one:

- a run of 19 or more digits anywhere in ``raw`` (possibly an integer beyond
  64 bits, which orjson would read as a lossy float) goes to the stdlib
  directly; a digit run inside a string just takes the slower path;
- whatever orjson refuses (``NaN``/``Infinity``, ``1e400``, a lone surrogate
  escape such as ``"\\ud800"``, a BOM, UTF-16, nesting deeper than 1024) is
  parsed again by the stdlib, which accepts or refuses it with today's message.

Everything else orjson reads exactly as the stdlib does (duplicate keys: the
last wins, in the first one's place). Hence a tree that ``loads`` got from
orjson (``parsed_fast``) holds no NaN, infinity, lone surrogate or integer
beyond 64 bits, and ``dumps`` of it can be orjson's too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

import orjson

__all__ = ["dumps", "loads", "loads_flagged"]

# Digits -> "0", everything else -> " ": a run of 19 zeros is a run of 19 digits
# (a translate and a substring search: far cheaper than a regular expression).
_DIGITS: Final = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_WIDE: Final = b"0" * 19


def loads_flagged(
    raw: bytes, parse_constant: Callable[[str], Any] | None = None
) -> tuple[Any, bool]:
    """``(json.loads(raw, parse_constant=...), parsed_fast)``; raises what ``json.loads`` raises."""
    if _WIDE not in raw.translate(_DIGITS):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass  # the stdlib decides, with its own message
    if parse_constant is None:
        return json.loads(raw), False
    return json.loads(raw, parse_constant=parse_constant), False


def loads(raw: bytes, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """``json.loads(raw, parse_constant=...)``, through orjson when that gives the same."""
    return loads_flagged(raw, parse_constant)[0]


def dumps(obj: object, *, fast: bool, allow_nan: bool) -> bytes:
    """``json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=...)``
    as UTF-8; with a lone surrogate (not UTF-8) the stdlib's ASCII-escaped form.

    ``fast``: ``obj`` came from ``loads`` via orjson plus plain strings. Otherwise
    orjson's output is kept only when it has no ``null``: orjson writes NaN and
    infinities as ``null`` where the stdlib writes ``NaN`` or raises. Floats may
    be spelled differently (``1e-7``, not ``1e-07``): the same JSON value.
    """
    try:
        out = orjson.dumps(obj)
    except TypeError:  # JSONEncodeError: an integer beyond 64 bits, a lone surrogate
        pass
    else:
        if fast or b"null" not in out:
            return out
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=allow_nan)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=allow_nan).encode("ascii")
