"""Credential pools (DESIGN §6.3): who serves a request, and for how long a member
rests after the upstream pushed back. No I/O, no clock: ``now`` is an argument.

A route's pool names several credentials (accounts, API keys), each a ``Member``
with a stable ``id``. For one request the HTTP layer does::

    session = session_of(client_headers, body)            # the client's, untransformed
    mask    = available_mask(pool, now, cooling_until, disconnected)
    for index in order(pool, session, mask, counter):      # each member at most once
        answer = send with pool.members[index]
        until  = cool_down_until(answer.status, answer.headers, error_type, now, ...)
        if until is not None: store ``until`` for that member (shared by all workers)
        if not retry_allowed(answer.status, error_type, client_bytes_sent): break
    nothing tried, every member cooling -> 429 rate_limit_error,
        retry-after: all_cooling_retry_after(cooling_until.values(), now)

Sessions (``session_of``), first rule that gives one:
    1. the first ``x-keyrelay-session`` header that is not blank;
    2. ``metadata.user_id`` of the body, a non-blank string;
    3. a checksum of the system prompt and the first message (see below);
    4. none: no header, no user id, no system and no first message. Such a
       request has no prompt cache to reuse, so it is spread like round robin
       (``order`` with ``session=None``) rather than pinned to one member.
    Keys over ``MAX_KEY_BYTES`` keep their first and last ``MAX_KEY_BYTES // 2``
    bytes (characters, for a user id) and their length.

The checksum (rule 3) costs a few microseconds, and no more for a body of
any size or shape: choosing a member must stay within about 10 µs of CPU (the
commonest shape, a plain first message, takes a shortcut of about 1 µs that
hashes the same bytes: ``_plain_checksum``). The
system prompt is walked as a JSON tree from its start; the first message from
its start and, unless that walk saw all of it, once more from its end (lists,
objects and strings backwards). Each walk stops after ``WALK_BYTES`` bytes of
string or ``WALK_NODES`` values, whichever comes first, so at most
``3 * WALK_BYTES`` bytes of string are hashed. A system prompt's start is what the prompt
caches of its sessions share anyway; a first message often opens with a fixed
preamble and ends with the conversation's own question, hence both of its ends.
Object keys are left out (they are the API's vocabulary), and so are the
values of ``cache_control`` (a client moves its breakpoints from turn to turn:
in turn 1 the first message is also the last one); the order of values counts.
The bytes go through ``zlib.crc32``: 32 bits are plenty to spread sessions, and
a collision only puts two conversations on the same member.

Order (``order``): the members that may be tried, best first.
    affinity     rendezvous (highest random weight) hashing: member ``i`` scores
                 ``mix(H(session) ^ seed_i)``, where ``H`` is 64-bit BLAKE2b,
                 ``seed_i`` the 64-bit BLAKE2b of the member's id and ``mix``
                 murmur3's fmix64 (its last xor-shift left out: the ranking
                 hardly needs it; still a bijection, so no ties). A score
                 depends on the session and the member's id only, so a member
                 leaving (cooling, disconnected, removed from the config) moves
                 only the sessions it ranked first, to their next member, and a
                 member returning takes back exactly those. The failover order
                 is the rest of the ranking. Every worker, on every machine,
                 ranks alike (``hash()`` would not: it is salted per process);
                 a change of these hashes would move every session once.
    round_robin  the available members in configured order, rotated by
                 ``counter`` (the caller's per-worker request count) modulo
                 their number, so the load is even over those available.

Cool-downs (``cool_down_until``): see its docstring for the rule.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import math
import re
import struct
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice
from typing import Final

from keyrelay.gateway.core.ratelimit import retry_after

__all__ = [
    "COOLING_STATUSES",
    "MAX_KEY_BYTES",
    "MIN_COOL_SECONDS",
    "OVERLOADED_ERROR",
    "SESSION_HEADER",
    "WALK_BYTES",
    "WALK_NODES",
    "Member",
    "Pool",
    "Strategy",
    "all_cooling_retry_after",
    "available_mask",
    "cool_down_until",
    "cools",
    "order",
    "retry_allowed",
    "session_of",
]

SESSION_HEADER: Final = b"x-keyrelay-session"
MAX_KEY_BYTES: Final = 256
WALK_BYTES: Final = 1024
WALK_NODES: Final = 12

COOLING_STATUSES: Final = frozenset({429, 529})
OVERLOADED_ERROR: Final = "overloaded_error"
# A cool-down is never shorter: ``retry-after: 0`` or a reset already past would
# otherwise have every worker hammer a member that has just refused.
MIN_COOL_SECONDS: Final = 1.0

_M64: Final = (1 << 64) - 1
_PERSON: Final = b"keyrelay-pool"


# -- pools -----------------------------------------------------------------------------


class Strategy(StrEnum):
    AFFINITY = "affinity"
    ROUND_ROBIN = "round_robin"


def _seed(member_id: str) -> int:
    digest = hashlib.blake2b(
        member_id.encode("utf-8", "surrogatepass"), digest_size=8, person=_PERSON
    ).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True, slots=True)
class Member:
    """A credential of a pool: ``id`` is stable across restarts and workers (an
    account id, an API key's name); ``seed`` is derived from it."""

    id: str
    seed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"a pool member id must be a non-empty string, got {self.id!r}")
        object.__setattr__(self, "seed", _seed(self.id))


@dataclass(frozen=True, slots=True)
class Pool:
    """A route's credentials and how a request picks among them. Member ``i`` is
    bit ``1 << i`` of an availability mask."""

    name: str
    members: tuple[Member, ...]
    strategy: Strategy = Strategy.AFFINITY
    all_mask: int = field(init=False, repr=False, compare=False)
    _indices: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _seeds: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if not members:
            raise ValueError(f"pool {self.name!r} has no members")
        ids = [member.id for member in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"pool {self.name!r} names a member twice")
        seeds = tuple(member.seed for member in members)
        if len(set(seeds)) != len(seeds):  # 64-bit BLAKE2b of distinct ids: never seen
            raise ValueError(f"pool {self.name!r}: two member ids hash alike; rename one")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        object.__setattr__(self, "all_mask", (1 << len(members)) - 1)
        object.__setattr__(self, "_indices", tuple(range(len(members))))
        object.__setattr__(self, "_seeds", seeds)


def available_mask(
    pool: Pool,
    now: float,
    cooling_until: Mapping[str, float] | None = None,
    disconnected: Collection[str] = (),
) -> int:
    """The availability mask: members not in ``disconnected`` whose cool-down (by
    member id; absent: none) is not after ``now``."""
    cooling = cooling_until or {}
    mask = 0
    for index, member in enumerate(pool.members):
        if member.id not in disconnected and not cooling.get(member.id, 0.0) > now:
            mask |= 1 << index
    return mask


def order(pool: Pool, session: bytes | None, available: int, counter: int = 0) -> tuple[int, ...]:
    """The indices of the members to try, best first, each once; only those whose
    bit is set in ``available``. Empty when none is available."""
    if (available & pool.all_mask) == pool.all_mask:
        indices = pool._indices
    else:
        indices = tuple([i for i in pool._indices if available >> i & 1])
        if not indices:
            return ()
    if session is None or pool.strategy is Strategy.ROUND_ROBIN:
        k = counter % len(indices)
        return indices[k:] + indices[:k] if k else indices
    h = int.from_bytes(hashlib.blake2b(session, digest_size=8, person=_PERSON).digest(), "little")
    scores = []
    for seed in pool._seeds:  # mix(), see the module docstring
        x = h ^ seed
        x = ((x ^ (x >> 33)) * 0xFF51AFD7ED558CCD) & _M64
        scores.append(((x ^ (x >> 33)) * 0xC4CEB9FE1A85EC53) & _M64)
    # Seeds differ (Pool checks) and the mix is a bijection, so scores differ: no
    # ties, and the ranking does not depend on the members' configured order.
    return tuple(sorted(indices, key=scores.__getitem__, reverse=True))


# -- sessions --------------------------------------------------------------------------


def _clip_bytes(value: bytes) -> bytes:
    if len(value) <= MAX_KEY_BYTES:
        return value
    half = MAX_KEY_BYTES // 2
    return value[:half] + b"\0%d\0" % len(value) + value[-half:]


def _clip_str(value: str) -> bytes:
    if len(value) > MAX_KEY_BYTES:
        half = MAX_KEY_BYTES // 2
        value = f"{value[:half]}\0{len(value)}\0{value[-half:]}"
    return value.encode("utf-8", "surrogatepass")


_ABSENT: Final = object()


def _scalar(value: object) -> bytes:
    """A JSON scalar's spelling; an integer beyond 64 bits (no JSON body has one)
    by its size: ``str()`` of a huge integer is slow, and refused past 4300 digits."""
    if value is None:
        return b"null"
    if type(value) is bool:
        return b"true" if value else b"false"
    if type(value) is int:
        return b"%d" % value if -_M64 <= value <= _M64 else b"I%d" % value.bit_length()
    if type(value) is float:
        return repr(value).encode()
    return b"?"  # not a JSON value


def _walk(value: object, reverse: bool, out: list[bytes]) -> bool:
    """Append the pieces of ``value`` (from its end if ``reverse``) to ``out``,
    within ``WALK_BYTES`` of string and ``WALK_NODES`` values: a string is its
    UTF-8, a list ``[`` then its items, an object ``{`` then its values but
    ``cache_control``'s, a scalar its JSON spelling. Only the ``WALK_NODES`` first
    (last) items of a container are looked at, and without recursion: a wide or
    deep tree costs no more than a small one. True when all of ``value`` was read."""
    room = WALK_BYTES
    nodes = WALK_NODES
    complete = True
    stack: list[object] = [value]
    emit = out.append
    pop = stack.pop
    while stack:
        if nodes == 0:
            return False
        nodes -= 1
        item = pop()
        if type(item) is str:
            size = len(item)
            text = item if size <= room else item[size - room :] if reverse else item[:room]
            try:
                data = text.encode()
            except UnicodeEncodeError:  # a lone surrogate: JSON allows "\ud800"
                data = text.encode("utf-8", "surrogatepass")
            if size <= room and len(data) <= room:
                emit(data)
                room -= len(data)
                continue
            emit(data[len(data) - room :] if reverse else data[:room])
            return False
        if type(item) is dict:
            emit(b"{")
            # Pushed so that the one to read next is popped first.
            marked = "cache_control" in item
            if not marked and len(item) <= nodes:  # the common case
                stack += item.values() if reverse else reversed(item.values())
            else:  # only what can still be read: at most ``nodes`` values
                pairs = islice(reversed(item.items()) if reverse else item.items(), nodes + marked)
                children = [child for key, child in pairs if key != "cache_control"]
                if len(item) - marked > nodes:
                    complete = False
                    del children[nodes:]
                stack += reversed(children)
        elif type(item) is list:
            emit(b"[")
            if len(item) > nodes:
                complete = False
                stack += item[len(item) - nodes :] if reverse else reversed(item[:nodes])
            else:
                stack += item if reverse else reversed(item)
        else:
            emit(_scalar(item))
    return complete


def session_of(headers: Iterable[tuple[bytes, bytes]], body: object) -> bytes | None:
    """The affinity session of a request (see the module docstring for the rules),
    or ``None`` when it has none. ``headers``: the client's, lower-case names as the
    ASGI server gives them; ``body``: the client's decoded JSON (any shape; its
    strings ``str`` exactly, as a JSON decoder makes them: ``_plain_checksum``
    would hash a ``str`` subclass that ``_walk`` spells ``?``)."""
    for name, value in headers:
        if name == SESSION_HEADER:
            key = value.strip(b" \t")
            if key:
                return b"h" + _clip_bytes(key)
    if not isinstance(body, dict):
        return None
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        user_id = metadata.get("user_id")
        if isinstance(user_id, str) and user_id.strip():
            return b"u" + _clip_str(user_id)
    system = body.get("system")
    messages = body.get("messages")
    first = messages[0] if isinstance(messages, list) and messages else _ABSENT
    if system is None and first is _ABSENT:
        return None
    crc = _plain_checksum(system, first)
    if crc is None:
        crc = zlib.crc32(_walked_pieces(system, first))
    return _CHECKSUM_SESSION(b"c", crc)


def _walked_pieces(system: object, first: object) -> bytes:
    """The bytes rule 3 hashes: ``_walk``'s pieces of the system prompt and the
    first message (``_ABSENT``: none), joined by NUL."""
    out: list[bytes] = [b"S"]
    if system is not None:
        _walk(system, False, out)
    out.append(b"M")
    if first is not _ABSENT and not _walk(first, False, out):
        out.append(b"~")
        _walk(first, True, out)
    return b"\0".join(out)


def _plain_checksum(system: object, first: object) -> int | None:
    """``zlib.crc32(_walked_pieces(system, first))`` for the commonest shape, at a
    fraction of its cost: no system prompt or a string one, and a first message of
    at most ``WALK_NODES - 1`` string values and ``WALK_BYTES`` of their UTF-8
    (``{"role": "user", "content": "..."}``). None for any other shape. The same
    bytes by construction: a string system prompt is its first ``WALK_BYTES`` (a
    walk of one node), and a first message that fits is read whole, values in
    order, with no walk from its end; they are hashed in place (a CRC goes on
    from a prefix's), not joined. The unit tests check that both agree wherever
    this one answers."""
    if type(first) is not dict or not first or len(first) >= WALK_NODES or "cache_control" in first:
        return None
    try:
        data = "\0".join(first.values()).encode()  # TypeError: a value not a string
        if len(data) - (len(first) - 1) > WALK_BYTES:  # (the NULs joining them)
            return None
        if system is None:
            return zlib.crc32(data, _CRC_NO_SYSTEM)
        if type(system) is str:
            head = zlib.crc32(system[:WALK_BYTES].encode()[:WALK_BYTES], _CRC_SYSTEM)
            return zlib.crc32(data, zlib.crc32(_SYSTEM_END, head))
    except (TypeError, UnicodeEncodeError):  # (UnicodeEncodeError: a lone surrogate)
        pass
    return None


_CRC_NO_SYSTEM: Final = zlib.crc32(b"S\0M\0{\0")
_CRC_SYSTEM: Final = zlib.crc32(b"S\0")
_SYSTEM_END: Final = b"\0M\0{\0"
_CHECKSUM_SESSION: Final = struct.Struct("<cI").pack  # b"c" + the CRC, little-endian


# -- cool-downs ------------------------------------------------------------------------

_SECONDS = re.compile(rb"[0-9]+(?:\.[0-9]+)?")
_REMAINING = re.compile(rb"-?[0-9]{1,20}")
_RFC3339 = re.compile(
    rb"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    rb"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_LIMIT_KINDS: Final = ("requests", "tokens", "input-tokens", "output-tokens")
_PREFIX: Final = b"anthropic-ratelimit-"
_UNIFIED_STATUS: Final = b"anthropic-ratelimit-unified-status"
_UNIFIED_RESET: Final = b"anthropic-ratelimit-unified-reset"


def cools(status: int, error_type: str | None) -> bool:
    """Does this answer cool its member down? 429, 529, or an ``overloaded_error``
    (whatever the status: an ``error`` event may follow a 200 in a stream)."""
    return status in COOLING_STATUSES or error_type == OVERLOADED_ERROR


def retry_allowed(status: int, error_type: str | None, client_bytes_sent: bool) -> bool:
    """May the request go to the next member? Only after an answer that cools its
    member, and only while nothing of it has reached the client (for a stream: no
    byte, headers included)."""
    return not client_bytes_sent and cools(status, error_type)


def _seconds(value: bytes) -> float | None:
    """A non-negative decimal number, or None. Too many digits is +inf, not None."""
    return float(value) if _SECONDS.fullmatch(value) else None


def _instant(value: bytes) -> float | None:
    """Epoch seconds from an RFC 3339 timestamp or a number of epoch seconds."""
    if _RFC3339.fullmatch(value):
        try:
            return dt.datetime.fromisoformat(value.decode("ascii").upper()).timestamp()
        except ValueError:  # 2025-02-30, a leap second, year 0
            return None
    return _seconds(value)


def _http_date(value: bytes) -> float | None:
    try:
        date = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if date.tzinfo is None:  # "-0000" and the obsolete forms: UTC by RFC 9110
        date = date.replace(tzinfo=dt.UTC)
    try:
        return date.timestamp()
    except (ValueError, OverflowError):
        return None


def _explicit_wait(found: Mapping[bytes, bytes], now: float) -> float | None:
    millis = found.get(b"retry-after-ms")
    if millis is not None and (value := _seconds(millis)) is not None:
        return value / 1000
    after = found.get(b"retry-after")
    if after is None:
        return None
    if (value := _seconds(after)) is not None:
        return value
    if (date := _http_date(after)) is not None:
        return date - now
    return None


def _reset_wait(found: Mapping[bytes, bytes], now: float) -> float | None:
    exhausted: list[float] = []
    resets: list[float] = []
    for kind in _LIMIT_KINDS:
        raw = found.get(b"%s%s-reset" % (_PREFIX, kind.encode()))
        reset = None if raw is None else _instant(raw)
        if reset is None:
            continue
        resets.append(reset)
        remaining = found.get(b"%s%s-remaining" % (_PREFIX, kind.encode()))
        if remaining is not None and _REMAINING.fullmatch(remaining) and int(remaining) <= 0:
            exhausted.append(reset)
    if exhausted:
        return max(exhausted) - now
    if resets:
        return min(resets) - now
    return None


def _clamp(seconds: float, low: float, high: float) -> float:
    if not seconds >= low:  # NaN too
        return low
    return min(seconds, high)


def cool_down_until(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    error_type: str | None,
    now: float,
    default_seconds: float,
    max_seconds: float,
) -> float | None:
    """Until when (epoch seconds) the member that gave this answer rests, or
    ``None`` when the answer does not cool it (``cools``).

    The wait, from the upstream's response headers (names in any case; the
    first line of each name counts):

    1. The explicit ones: ``retry-after-ms`` (milliseconds), else ``retry-after``
       (delta-seconds, decimals tolerated, or an HTTP-date). For a 429 whose
       ``anthropic-ratelimit-unified-status`` is ``rejected`` (a subscription
       account's window is used up), also ``anthropic-ratelimit-unified-reset``
       (epoch seconds or RFC 3339). When either is there: the later of the two
       (neither admits a retry before its time).
    2. Else, for a 429 only (a 529 or an overload has nothing to do with the
       limits these headers describe): ``anthropic-ratelimit-{requests,tokens,
       input-tokens,output-tokens}-reset`` (RFC 3339; epoch seconds tolerated):
       the latest reset among the limits whose ``-remaining`` is 0 or less (all
       of them must refill), else the earliest reset of all.
    3. Else ``default_seconds``.

    A value that does not parse is as if absent (the next rule decides); one
    that parses is clamped into ``[MIN_COOL_SECONDS, max_seconds]``: a past
    date or ``retry-after: 0`` gives the minimum, a date in year 9999 or a
    thousand-digit number the maximum. Never raises.
    """
    if not cools(status, error_type):
        return None
    low = MIN_COOL_SECONDS
    high = max_seconds if max_seconds >= low else low
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        found.setdefault(name.lower(), value.strip(b" \t"))
    wait = _explicit_wait(found, now)
    if status == 429 and found.get(_UNIFIED_STATUS, b"").lower() == b"rejected":
        raw = found.get(_UNIFIED_RESET)
        reset = None if raw is None else _instant(raw)
        if reset is not None:
            window = reset - now
            wait = window if wait is None else max(wait, window)
    if wait is None and status == 429:
        wait = _reset_wait(found, now)
    if wait is None:
        wait = default_seconds
    return now + _clamp(wait, low, high)


def all_cooling_retry_after(cooling_until: Iterable[float], now: float) -> int:
    """The ``retry-after`` of the 429 when every member is cooling: whole seconds
    (at least 1) until the earliest one returns. NaN and infinities are ignored;
    with nothing left, 1."""
    finite = [until for until in cooling_until if math.isfinite(until)]
    if not finite:
        return 1
    return retry_after(min(finite) - now)
