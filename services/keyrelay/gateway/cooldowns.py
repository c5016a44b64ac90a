"""Cool-downs of pool members shared by every gateway worker within a second (DESIGN §6.3).

A member the upstream pushed back (429, 529, ``overloaded_error``) rests until
``cool_down_until`` says (``gateway.core.pools``). The worker that saw it calls
``note``; every worker, itself included, reads ``cooling(pool, now)`` per request,
a dict lookup with no I/O, and hands it to ``available_mask``.

How the workers agree, through the limits store's Redis and its ACL user (keys
under ``<prefix>limits:``, only commands of ``limits_store.ACL_COMMANDS``)::

    <prefix>limits:cool:<pool>:<member>   string  until (epoch ms); expires at until

- **note** (the worker that was refused): the local entry becomes the later of
  the two at once; then the note script writes the key only if it is later than
  what is there (a later until wins, an earlier one never shortens it), with a
  TTL of ``until - now``, so the key vanishes when the cool-down ends. The write
  is fire-and-forget: its task is held, a failure is counted and observed, never
  raised. At most one write per member is in flight; notes arriving meanwhile
  coalesce into one more (the latest until); a write that failed is sent again
  at the next poll while its until is still ahead.
- **run** (every worker, a background task): every ``poll_seconds`` the poll
  script GETs every known member's key in one EVALSHA, and the local view
  becomes, per member, the later of local and remote, for entries still ahead
  of ``now`` (expired ones are dropped). So a cool-down noted anywhere is
  honoured everywhere within ``poll_seconds`` plus a round trip.
- **Redis unreachable** (or refusing): the local view stays (every worker still
  honours what it noted and what it read before), the error is counted and
  observed, the next tick tries again; at most one log line per ``LOG_INTERVAL``
  per operation (``LineLimiter``).
- **Values read back are not trusted**: not a string of at most 15 digits
  (negative, a float, text, another type), in the past, or later than
  ``now + max_seconds + MAX_SKEW_SECONDS`` is ignored (and overwritten by the
  next note); a value up to ``MAX_SKEW_SECONDS`` past the cap (another worker's
  clock a little ahead) is clamped to ``now + max_seconds``.

The key is per (pool, member), as the design decided: a credential named in two
pools cools in each separately. A pool name's ``%`` and ``:`` are written
``%25`` and ``%3A``, so (``a:b``, ``c``) and (``a``, ``b:c``) are different keys.

``CoolView`` is the pure part (explicit ``now``, no I/O, no clock, no asyncio);
``CoolDowns`` drives it with a ``RespClient`` (which it does not own: ``close``
stops the polling and the writes, not the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final, TypeAlias

from keyrelay.gateway.resp_client import (
    RedisUnavailable,
    Reply,
    ReplyError,
    RespClient,
    Script,
    encode,
)
from keyrelay.log_limit import LineLimiter

__all__ = [
    "DEFAULT_MAX_SECONDS",
    "DEFAULT_POLL_SECONDS",
    "LOG_INTERVAL",
    "MAX_SKEW_SECONDS",
    "CoolDowns",
    "CoolView",
    "Observer",
    "cool_key",
    "parse_until",
]

log = logging.getLogger("keyrelay.gateway.cooldowns")

DEFAULT_POLL_SECONDS: Final = 0.25
DEFAULT_MAX_SECONDS: Final = 86_400.0  # no cool-down is longer (the caller caps too)
MAX_SKEW_SECONDS: Final = 60.0  # beyond the cap by more than this: garbage, not a clock
LOG_INTERVAL: Final = 10.0  # seconds between two warnings of one operation
_MAX_DIGITS: Final = 15  # epoch ms has 13; 15 digits are exact in a Lua double

# (operation, outcome, seconds), for metrics: "cool_poll" ok | error;
# "cool_note" written | held (a later until was there) | error | unknown (a member
# not among those given: honoured by this worker only). Wired by the gateway.
Observer: TypeAlias = Callable[[str, str, float], None]
Member: TypeAlias = tuple[str, str]  # (pool name, member id)

# KEYS: [1] the member's cool-down key.
# ARGV: [1] until (epoch ms, an integer), [2] its TTL (ms, > 0), [3] the latest until
#       believable (epoch ms): a value there that is later, or not an integer of at
#       most 15 digits, or not a string at all, is garbage and overwritten.
# Returns the until the key holds after the call (ms): ARGV[1], or the later one there.
_NOTE: Final = """
local held = redis.pcall('GET', KEYS[1])
if type(held) == 'string' and #held <= 15 and string.match(held, '^%d+$') then
  held = tonumber(held)
  if held >= tonumber(ARGV[1]) and held <= tonumber(ARGV[3]) then return held end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return tonumber(ARGV[1])
"""

# KEYS: the cool-down keys of every known member. ARGV: none.
# Returns each key's value in order: its string, or nil (absent, or not a string).
_POLL: Final = """
local values = {}
for i = 1, #KEYS do
  local value = redis.pcall('GET', KEYS[i])
  if type(value) ~= 'string' then value = false end
  values[i] = value
end
return values
"""

_EMPTY: Final[Mapping[str, float]] = MappingProxyType({})
_DIGITS: Final = re.compile(rb"[0-9]{1,%d}" % _MAX_DIGITS)


def cool_key(base: str, pool: str, member: str) -> str:
    """The key of ``member``'s cool-down in ``pool`` (``base``: ``<prefix>limits:``)."""
    return f"{base}cool:{pool.replace('%', '%25').replace(':', '%3A')}:{member}"


def parse_until(raw: object, now: float, max_seconds: float) -> float | None:
    """A value read back from a cool-down key as epoch seconds, or None when it is
    not one to honour: absent, not digits (at most 15), not after ``now``, or later
    than ``now + max_seconds + MAX_SKEW_SECONDS``. Up to that, it is clamped to
    ``now + max_seconds``. Never raises."""
    if type(raw) is not bytes or not _DIGITS.fullmatch(raw):
        return None
    until = int(raw) / 1000
    if not until > now:
        return None
    cap = now + max_seconds
    if until > cap + MAX_SKEW_SECONDS:
        return None
    return min(until, cap)


class CoolView:
    """Until when each (pool, member) cools, as this worker knows it. Pure: explicit
    ``now`` (epoch seconds), no I/O.

    Per pool, a dict member -> until that is replaced, never changed, so a mapping
    ``cooling`` returned stays as it was (copy on write: notes are rare, reads are
    per request)."""

    __slots__ = ("_earliest", "_max_seconds", "_pools")

    def __init__(self, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be more than 0, got {max_seconds}")
        self._max_seconds = float(max_seconds)
        self._pools: dict[str, dict[str, float]] = {}
        self._earliest: dict[str, float] = {}  # per pool, its earliest until

    @property
    def max_seconds(self) -> float:
        return self._max_seconds

    def until(self, pool: str, member: str) -> float | None:
        """The member's until as held (expired or not), or None."""
        members = self._pools.get(pool)
        return None if members is None else members.get(member)

    def note(self, pool: str, member: str, until: float, now: float) -> float | None:
        """The member cools until ``until`` (clamped to ``now + max_seconds``): the
        until now held when that made it later, else None (not after ``now``, not
        a finite number, or an equal or later until already held)."""
        if not math.isfinite(until) or not until > now:
            return None
        until = min(until, now + self._max_seconds)
        held = self.until(pool, member)
        if held is not None and held >= until:
            return None
        self._set(pool, {**self._pools.get(pool, {}), member: until})
        return until

    def merge(self, remote: Iterable[tuple[Member, float | None]], now: float) -> None:
        """The view becomes, per member, the later of local and ``remote`` (values
        already checked: ``parse_until``), keeping only untils after ``now``."""
        merged: dict[str, dict[str, float]] = {
            pool: {member: until for member, until in members.items() if until > now}
            for pool, members in self._pools.items()
        }
        for (pool, member), until in remote:
            if until is None or not until > now:
                continue
            members = merged.setdefault(pool, {})
            if until > members.get(member, 0.0):
                members[member] = until
        self._pools, self._earliest = {}, {}
        for pool, members in merged.items():
            if members:
                self._set(pool, members)

    def cooling(self, pool: str, now: float) -> Mapping[str, float]:
        """The members of ``pool`` cooling after ``now``: member id -> until. Not to
        be changed by the caller; it does not change afterwards either."""
        members = self._pools.get(pool)
        if members is None:
            return _EMPTY
        if self._earliest[pool] > now:
            return members
        kept = {member: until for member, until in members.items() if until > now}
        if not kept:
            del self._pools[pool], self._earliest[pool]
            return _EMPTY
        self._set(pool, kept)
        return kept

    def entries(self) -> list[tuple[Member, float]]:
        """Every (pool, member) and its until held (expired ones included)."""
        return [
            ((pool, member), until)
            for pool, members in self._pools.items()
            for member, until in members.items()
        ]

    def _set(self, pool: str, members: dict[str, float]) -> None:
        self._pools[pool] = members
        self._earliest[pool] = min(members.values())


_NOTE_SCRIPT: Final = Script(_NOTE)
_POLL_SCRIPT: Final = Script(_POLL)


def poll_command(keys: Sequence[str]) -> bytes:
    """The call that reads ``keys`` (``cool_key``s) in one script call, as a poll."""
    return encode("EVALSHA", _POLL_SCRIPT.sha, len(keys), *keys)


async def read_cool_downs(client: RespClient, command: bytes, keys: int) -> list[Reply]:
    """The raw value of each of the ``keys`` keys ``command`` (``poll_command``) reads:
    a string, or None (absent, or a key of another type). A worker's poll and
    ``keyrelay pools`` read alike. Raises ``RedisUnavailable``, ``ReplyError``."""
    return _poll_reply(await _POLL_SCRIPT.run(client, command), keys)


class CoolDowns:
    def __init__(
        self,
        client: RespClient,
        *,
        prefix: str,
        members: Iterable[Member],
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        observe: Observer | None = None,
    ) -> None:
        """Cool-downs of ``members`` ((pool name, member id), from the config) shared
        on ``client`` (the limits store's Redis, as its ACL user) under
        ``<prefix>limits:cool:``; polled every ``poll_seconds`` once ``run`` runs.
        Cool-downs longer than ``max_seconds`` are cut to it."""
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be more than 0, got {poll_seconds}")
        self._client = client
        self._base = f"{prefix}limits:"
        self._view = CoolView(max_seconds)
        # The request path's one question, ``cooling(pool, now)``: the members of
        # ``pool`` cooling after ``now`` (member id -> until, epoch s), as
        # ``available_mask`` takes them; read only. The view's own method, bound:
        # asked on every pooled request, it is not wrapped in a call of this class.
        self.cooling: Callable[[str, float], Mapping[str, float]] = self._view.cooling
        self._max_seconds = self._view.max_seconds
        self._poll_seconds = float(poll_seconds)
        self._observe = observe
        known = list(dict.fromkeys(members))  # in order, each once
        self._keys: dict[Member, str] = {m: cool_key(self._base, *m) for m in known}
        self._known = tuple(known)
        self._poll_command = poll_command(list(self._keys.values()))
        # Writes: the until waiting to be written per member (the latest noted), and
        # the task writing each member's (one at most; held until done).
        self._unshared: dict[Member, float] = {}
        self._writers: dict[Member, asyncio.Task[None]] = {}
        self._lines: LineLimiter[str] = LineLimiter(LOG_INTERVAL)
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[object] | None = None
        self._closed = False
        # Counters (metrics, tests): failed calls, values read back and ignored,
        # polls that answered, writes the store took.
        self.errors = 0
        self.ignored = 0
        self.polls = 0
        self.writes = 0

    @property
    def key_prefix(self) -> str:
        """Every key written or read starts with this (``<prefix>limits:cool:``)."""
        return f"{self._base}cool:"

    @property
    def writes_pending(self) -> int:
        """Members with a write in flight or waiting to be sent (tests, metrics)."""
        return len(self._unshared.keys() | self._writers.keys())

    # -- the request path: no I/O --------------------------------------------------------

    def note(self, pool: str, member: str, until: float, now: float) -> None:
        """``member`` of ``pool`` was refused: it cools until ``until`` (epoch s), here
        at once and, within ``poll_seconds`` or so, in every worker. Never raises,
        never waits; a member not among those given is honoured by this worker only."""
        noted = self._view.note(pool, member, until, now)
        key = (pool, member)
        if key not in self._keys:
            self._report("cool_note", "unknown", 0.0)
            return
        if noted is None or self._closed:
            return
        if noted > self._unshared.get(key, 0.0):
            self._unshared[key] = noted
        self._write_soon(key)

    # -- writes --------------------------------------------------------------------------

    def _write_soon(self, key: Member) -> None:
        if key in self._writers:
            return  # the writer sends it after the write in flight
        with contextlib.suppress(RuntimeError):  # no running loop: sent at the next poll
            task = asyncio.get_running_loop().create_task(self._write(key))
            self._writers[key] = task

    async def _write(self, key: Member) -> None:
        """Sends the member's latest until until none is waiting or a write fails
        (then it waits for the next poll)."""
        try:
            while (until := self._unshared.pop(key, None)) is not None:
                if not await self._send_note(key, until):
                    if until > self._unshared.get(key, 0.0):
                        self._unshared[key] = until
                    return
        finally:
            self._writers.pop(key, None)

    async def _send_note(self, key: Member, until: float) -> bool:
        """One note script call: True when the store took it (or it is over)."""
        now = time.time()
        ttl_ms = math.ceil((until - now) * 1000)
        if ttl_ms <= 0:
            return True  # over: nothing to share
        until_ms = round(until * 1000)
        cap_ms = int((now + self._max_seconds + MAX_SKEW_SECONDS) * 1000)
        command = encode("EVALSHA", _NOTE_SCRIPT.sha, 1, self._keys[key], until_ms, ttl_ms, cap_ms)
        started = time.perf_counter()
        try:
            reply = _note_reply(await _NOTE_SCRIPT.run(self._client, command))
        except (RedisUnavailable, ReplyError) as exc:
            self._failed("cool_note", started, exc)
            return False
        self.writes += 1
        held = parse_until(b"%d" % reply, time.time(), self._max_seconds)
        if held is not None and reply > until_ms:  # another worker's later one: ours now
            self._view.merge([(key, held)], time.time())
            self._report("cool_note", "held", time.perf_counter() - started)
        else:
            self._report("cool_note", "written", time.perf_counter() - started)
        return True

    # -- polling -------------------------------------------------------------------------

    async def run(self) -> None:
        """Polls every ``poll_seconds`` until ``close``, sending again the writes that
        failed. Never raises (a bug is logged, and the next tick comes)."""
        self._runner = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            started = loop.time()
            try:
                await self.poll()
                for key in list(self._unshared):
                    self._write_soon(key)
            except Exception:  # a bug: logged (limited), the worker keeps its view
                if self._lines.admit("bug", time.monotonic()) is not None:
                    log.exception("cool-downs: unexpected error; polling goes on")
            pause = max(0.0, started + self._poll_seconds - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stop.wait()

    async def poll(self) -> bool:
        """One poll: every known member's key read, merged into the view. False when
        the store did not answer (counted, observed; the view is kept)."""
        if not self._known:
            return True
        started = time.perf_counter()
        try:
            reply = await read_cool_downs(self._client, self._poll_command, len(self._known))
        except (RedisUnavailable, ReplyError) as exc:
            self._failed("cool_poll", started, exc)
            return False
        now = time.time()
        remote: list[tuple[Member, float | None]] = []
        ignored = 0
        for key, raw in zip(self._known, reply, strict=True):
            until = parse_until(raw, now, self._max_seconds)
            if until is None and raw is not None and not _over(raw, now):
                ignored += 1
            remote.append((key, until))
        self._view.merge(remote, now)
        self.polls += 1
        self._report("cool_poll", "ok", time.perf_counter() - started)
        if ignored:
            self.ignored += ignored
            left_out = self._lines.admit("garbage", time.monotonic())
            if left_out is not None:
                log.warning(
                    "cool-downs: values that are no cool-down ignored (the next note overwrites)",
                    extra={"count": ignored, "suppressed": left_out},
                )
        return True

    async def close(self) -> None:
        """Stops ``run`` and the writes (each waited for at most the client's timeout,
        then cancelled). The client stays open: it is not this object's."""
        self._closed = True
        self._stop.set()
        tasks: set[asyncio.Task[object]] = set(self._writers.values())
        if self._runner is not None and self._runner is not asyncio.current_task():
            tasks.add(self._runner)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._client.timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # -- the store -----------------------------------------------------------------------

    def _failed(self, operation: str, started: float, exc: Exception) -> None:
        self.errors += 1
        self._report(operation, "error", time.perf_counter() - started)
        left_out = self._lines.admit(operation, time.monotonic())
        if left_out is not None:
            log.warning(
                "cool-downs: the limits store did not answer; this worker keeps its own view",
                extra={
                    "operation": operation,
                    "error": f"{type(exc).__name__}: {exc}",
                    "suppressed": left_out,
                },
            )

    def _report(self, operation: str, outcome: str, seconds: float) -> None:
        if self._observe is not None:
            self._observe(operation, outcome, seconds)


def _note_reply(reply: Reply) -> int:
    """The note script's reply, checked: the until the key holds (ms)."""
    if type(reply) is int:
        return reply
    raise ReplyError(f"unexpected reply to the note script: {reply!r:.80}")


def _poll_reply(reply: Reply, keys: int) -> list[Reply]:
    """The poll script's reply, checked: one value per key."""
    if type(reply) is list and len(reply) == keys:
        return reply
    raise ReplyError(f"unexpected reply to the poll script: {reply!r:.80}")


def _over(raw: object, now: float) -> bool:
    """A well-formed until that is over (not garbage: a key about to expire)."""
    return type(raw) is bytes and bool(_DIGITS.fullmatch(raw)) and int(raw) / 1000 <= now
