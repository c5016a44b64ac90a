"""The Redis store: accounts, flows, the refresh lock and the event stream.

Keys (``P`` is the configured prefix, default ``keyrelay:``)::

    P account:<id>   hash   provider, status, scopes, connected_at, expires_at,
                            token_type, tokens (encrypted blob), generation,
                            disconnect_reason, last_error, failures, retry_at,
                            forced_at (last forced refresh), answer_lost (1 after a
                            lost refresh answer, until a refresh succeeds)
    P accounts       set    every account id ever connected
    P flow:<id>      string encrypted flow (PKCE verifier, state, ...), PX = flow TTL
    P lock:<id>      string owner token of the refresh lock, PX = lock TTL
    P flow:<id>:claimed:<op>  the flow a claim took, for its re-sent copy (TAKE_ONCE)
    P op:<op>        string the result of one event-appending write, for its re-sent
                            copy (OPERATION_TTL_MS; see _ONCE)
    <events stream>  stream one entry per state change, MAXLEN ~ events_maxlen
    P gwkey...       gateway keys: keyrelay.auth.store.keys_store

Every state change and the event reporting it are written by one Lua script,
so a reader of the stream never sees an event without its change or the other
way round. ``generation`` only ever grows (reconnects included): it is the
fencing token that keeps a stalled refresher from overwriting newer tokens and
the version gateways use to tell a stale token from a fresh one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keyrelay.auth.core.redis_url import DirectUrl, SentinelUrl, parse_redis_url
from keyrelay.auth.store.crypto import TokenCipher

CONNECTED: Final = "connected"
DISCONNECTED: Final = "disconnected"

# Every script that appends an event or bumps a generation is given an operation key
# (``P op:<random id>``, one per call, always its last KEY). redis-py re-sends a command
# whose connection broke (retry_on_error), and a reply can be lost after the script
# ran: the re-sent copy then finds the key, which holds the first run's result, and
# returns that without a second event, bump or failure count (DESIGN §1.2.1). The key
# outlives every retry (OPERATION_TTL_MS); it is never read otherwise.
_ONCE = """
local op = KEYS[#KEYS]
local first = redis.call('GET', op)
if first then return tonumber(first) end
local function done(result)
  redis.call('SET', op, result, 'PX', ARGV[#ARGV])
  return result
end
"""

# KEYS: [1] account hash, [2] accounts set, [3] event stream, [4] operation key
# ARGV: [1] account id, [2] provider, [3] scopes, [4] connected_at (unix s),
#       [5] expires_at, [6] token_type, [7] tokens blob, [8] stream maxlen, [9] event time (ms),
#       [10] operation key TTL (ms)
# Returns the new generation: one more than any generation the account had before,
# so tokens of an earlier connection can never pass a fencing check.
_CONNECT = (
    _ONCE
    + """
local gen = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0') + 1
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'provider', ARGV[2], 'status', 'connected', 'scopes', ARGV[3],
  'connected_at', ARGV[4], 'expires_at', ARGV[5], 'token_type', ARGV[6], 'tokens', ARGV[7],
  'generation', gen, 'failures', 0, 'retry_at', 0)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'account_id', ARGV[1],
  'kind', 'CONNECTED', 'reason', '', 'generation', gen, 'at', ARGV[9])
return done(gen)
"""
)

# KEYS: [1] account hash, [2] event stream, [3] the refresh lock, [4] operation key
# ARGV: [1] account id, [2] generation read before the token call, [3] expires_at,
#       [4] token_type, [5] tokens blob, [6] scopes, [7] stream maxlen, [8] event time (ms),
#       [9] forced_at ('' unless a forced refresh), [10] the holder's lock owner token
#       ('' for none), [11] operation key TTL (ms)
# Returns the new generation, or 0 when fenced out (disconnected, or another
# holder already wrote a newer generation): then nothing is written. A written
# refresh releases the holder's lock in the same step: a holder that dies right
# after the write leaves no lease for the other replicas to wait out.
_REFRESH = (
    _ONCE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'connected' then return done(0) end
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[2] then return done(0) end
local gen = tonumber(ARGV[2]) + 1
redis.call('HSET', KEYS[1], 'expires_at', ARGV[3], 'token_type', ARGV[4], 'tokens', ARGV[5],
  'scopes', ARGV[6], 'generation', gen, 'failures', 0, 'retry_at', 0, 'last_error', '',
  'answer_lost', 0)
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'forced_at', ARGV[9]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'account_id', ARGV[1],
  'kind', 'REFRESHED', 'reason', '', 'generation', gen, 'at', ARGV[8])
if ARGV[10] ~= '' and redis.call('GET', KEYS[3]) == ARGV[10] then redis.call('DEL', KEYS[3]) end
return done(gen)
"""
)

# KEYS: [1] account hash, [2] event stream, [3] operation key
# ARGV: [1] account id, [2] expected generation ('' = whatever it is: a user's
#       disconnect), [3] reason, [4] stream maxlen, [5] event time (ms),
#       [6] operation key TTL (ms)
# Returns the new generation, or 0 when nothing changed (already disconnected,
# or fenced out): so exactly one DISCONNECTED event per disconnection.
_DISCONNECT = (
    _ONCE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'connected' then return done(0) end
local current = redis.call('HGET', KEYS[1], 'generation')
if ARGV[2] ~= '' and current ~= ARGV[2] then return done(0) end
local gen = tonumber(current) + 1
redis.call('HSET', KEYS[1], 'status', 'disconnected', 'disconnect_reason', ARGV[3],
  'generation', gen, 'last_error', '')
redis.call('HDEL', KEYS[1], 'tokens', 'expires_at', 'token_type')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'account_id', ARGV[1],
  'kind', 'DISCONNECTED', 'reason', ARGV[3], 'generation', gen, 'at', ARGV[5])
return done(gen)
"""
)

# KEYS: [1] account hash, [2] event stream, [3] operation key
# ARGV: [1] account id, [2] generation read before the token call, [3] reason,
#       [4] retry_at (unix s, no new attempt before), [5] stream maxlen, [6] event time (ms),
#       [7] answer_lost (1 or 0), [8] forced_at ('' unless forced), [9] operation key TTL (ms)
# Returns the failure count, or 0 when the account moved on meanwhile.
_REFRESH_FAILED = (
    _ONCE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'connected' then return done(0) end
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[2] then return done(0) end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'last_error', ARGV[3], 'retry_at', ARGV[4])
-- Once an answer is lost the flag stays until a refresh succeeds: a later failure
-- (the provider down meanwhile) does not make the loss forgotten.
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'answer_lost', 1) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'forced_at', ARGV[8]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'account_id', ARGV[1],
  'kind', 'REFRESH_FAILED', 'reason', ARGV[3], 'generation', ARGV[2], 'at', ARGV[6])
return done(failures)
"""
)

# KEYS: [1] lock key.  ARGV: [1] owner token, [2] TTL (ms).
# SET NX PX that a re-sent copy cannot turn into "busy": the owner who already holds
# the lock gets it again (its lease restarted). Returns 1 when ARGV[1] holds the lock.
_TRY_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: [1] a key to take, [2] the claim key of this taker.  ARGV: [1] claim TTL (ms).
# GETDEL that a re-sent copy cannot turn into "gone": the value moves to a key named
# after the taker (a random id) for a short while, so a re-sent take of the same
# call gets it again, and any other taker finds nothing. (Flows, web login states.)
TAKE_ONCE = """
local claimed = redis.call('GET', KEYS[2])
if claimed then return claimed end
local blob = redis.call('GET', KEYS[1])
if not blob then return false end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], blob, 'PX', ARGV[1])
return blob
"""

# KEYS: [1] lock key.  ARGV: [1] owner token.
# Deletes the lock only if we still own it; returns 1 if deleted, else 0.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: [1] lock key.  ARGV: [1] owner token, [2] new TTL (ms).
# Extends the lease only if we still own it; returns 1 if extended, else 0.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


# Reads give up after SOCKET_TIMEOUT_SECONDS (redis-py 8 would default to 5 s), and a
# blocking XREAD of the event stream waits EVENTS_BLOCK_MS: well under that timeout,
# or every quiet watch would end in a read timeout, retries, then UNAVAILABLE.
SOCKET_TIMEOUT_SECONDS = 10.0
EVENTS_BLOCK_MS = 2000


def _client_options() -> dict[str, Any]:
    """Every connection to a Redis primary, direct or through Sentinel, is made so."""
    return {
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        # A restarted Redis (or a Sentinel failover) is waited out for a few
        # seconds instead of failing the request at the first broken socket.
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }


def open_client(target: DirectUrl | SentinelUrl) -> tuple[redis.Redis, Sentinel | None]:
    """The client for a checked URL, and the Sentinel manager behind it if any.

    The master client asks the sentinels for the primary's address on every new
    connection; a connection to a demoted or dead primary fails, and the retry
    above reconnects to the one the sentinels name (none while they elect: a
    ``MasterNotFoundError``, a connection error, retried the same way). Each
    sentinel gets one attempt with short timeouts, so a dead one costs seconds
    at most before the next is asked.
    """
    if isinstance(target, DirectUrl):
        return redis.Redis.from_url(target.url, **_client_options()), None
    sentinel_options: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 2.0,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), retries=0),
        "ssl": target.tls,
        "username": target.sentinel_username,
        "password": target.sentinel_password,
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # annotated only in newer redis-py
        list(target.sentinels), sentinel_kwargs=sentinel_options
    )
    client = sentinel.master_for(
        target.service_name,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        **_client_options(),
    )
    return cast(redis.Redis, client), sentinel


@dataclass(frozen=True, slots=True)
class StoredTokens:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    account_id: str
    provider: str
    status: str
    scopes: tuple[str, ...]
    connected_at: float
    expires_at: float
    token_type: str
    generation: int
    disconnect_reason: str
    last_error: str
    failures: int
    retry_at: float
    tokens_blob: bytes | None = field(repr=False)
    forced_at: float = 0.0
    answer_lost: bool = False

    @property
    def connected(self) -> bool:
        return self.status == CONNECTED


@dataclass(frozen=True, slots=True)
class FlowRecord:
    flow_id: str
    account_id: str
    provider: str
    redirect_uri: str
    state: str = field(repr=False)
    verifier: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    account_id: str
    kind: str
    reason: str
    generation: int
    at_ms: int
    key_id: str = ""  # KEY_CHANGED only


# A claimed flow stays readable by its claimer for this long: time enough for a
# re-sent claim, far less than a flow's life. It holds only what the flow held.
CLAIM_TTL_MS = 60_000


async def take_once(script: AsyncScript, key: str) -> bytes | None:
    """Runs TAKE_ONCE (registered as ``script``) on ``key``.

    The claim key is only needed while redis-py may re-send the script, which is
    inside this call; once it returned, the claim key is deleted (a plain DEL is
    safe to re-send), so nothing of the value lingers.
    """
    claim_key = f"{key}:claimed:{_operation_id()}"
    value = cast(bytes | None, await script(keys=[key, claim_key], args=[CLAIM_TTL_MS]))
    if value is not None:
        await script.registered_client.delete(claim_key)
    return value


# An operation key (see _ONCE) outlives redis-py's retries (seconds) by far.
OPERATION_TTL_MS = 300_000


def _operation_id() -> str:
    """A fresh id for one write, so that a re-sent copy of it is recognised."""
    return secrets.token_hex(8)


def _text(value: bytes | None) -> str:
    return value.decode() if value else ""


def _number(value: bytes | None) -> float:
    return float(value) if value else 0.0


class RedisStore:
    def __init__(
        self,
        client: redis.Redis,
        cipher: TokenCipher,
        *,
        prefix: str = "keyrelay:",
        events_stream: str = "keyrelay:events",
        events_maxlen: int = 100_000,
        sentinel: Sentinel | None = None,
    ) -> None:
        self._redis = client
        self._sentinel = sentinel  # the sentinel connections behind a master_for client
        self._cipher = cipher
        self._prefix = prefix
        self.events_stream = events_stream
        self._maxlen = str(events_maxlen)
        self._accounts_key = f"{prefix}accounts"
        self._connect = client.register_script(_CONNECT)
        self._refresh = client.register_script(_REFRESH)
        self._disconnect = client.register_script(_DISCONNECT)
        self._refresh_failed = client.register_script(_REFRESH_FAILED)
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)
        self._try_lock = client.register_script(_TRY_LOCK)
        self._take_once = client.register_script(TAKE_ONCE)

    @classmethod
    def from_url(
        cls,
        url: str,
        cipher: TokenCipher,
        *,
        prefix: str = "keyrelay:",
        events_stream: str = "keyrelay:events",
        events_maxlen: int = 100_000,
    ) -> RedisStore:
        """A plain client, or for a ``redis+sentinel://`` URL the elected primary's."""
        client, sentinel = open_client(parse_redis_url(url))
        return cls(
            client,
            cipher,
            prefix=prefix,
            events_stream=events_stream,
            events_maxlen=events_maxlen,
            sentinel=sentinel,
        )

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def events_maxlen(self) -> str:
        """The stream's ``MAXLEN ~``, as scripts take it."""
        return self._maxlen

    @property
    def client(self) -> redis.Redis:
        """The connection pool, for other keys under the same prefix (web sessions)."""
        return self._redis

    async def close(self) -> None:
        await self._redis.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisConnectionError, RedisTimeoutError):
            return False

    def _account_key(self, account_id: str) -> str:
        return f"{self._prefix}account:{account_id}"

    def lock_key(self, account_id: str) -> str:
        return f"{self._prefix}lock:{account_id}"

    def new_operation(self) -> str:
        """A fresh operation key (see _ONCE)."""
        return f"{self._prefix}op:{_operation_id()}"

    def _flow_key(self, flow_id: str) -> str:
        return f"{self._prefix}flow:{flow_id}"

    # -- accounts -------------------------------------------------------------

    async def get_account(self, account_id: str) -> AccountRecord | None:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._account_key(account_id)))
        if not raw:
            return None
        return AccountRecord(
            account_id=account_id,
            provider=_text(raw.get(b"provider")),
            status=_text(raw.get(b"status")),
            scopes=tuple(_text(raw.get(b"scopes")).split()),
            connected_at=_number(raw.get(b"connected_at")),
            expires_at=_number(raw.get(b"expires_at")),
            token_type=_text(raw.get(b"token_type")) or "Bearer",
            generation=int(_number(raw.get(b"generation"))),
            disconnect_reason=_text(raw.get(b"disconnect_reason")),
            last_error=_text(raw.get(b"last_error")),
            failures=int(_number(raw.get(b"failures"))),
            retry_at=_number(raw.get(b"retry_at")),
            tokens_blob=raw.get(b"tokens"),
            forced_at=_number(raw.get(b"forced_at")),
            answer_lost=raw.get(b"answer_lost") == b"1",
        )

    async def list_account_ids(self) -> list[str]:
        members = cast(set[bytes], await self._redis.smembers(self._accounts_key))
        return sorted(m.decode() for m in members)

    def decrypt_tokens(self, record: AccountRecord) -> StoredTokens:
        if record.tokens_blob is None:
            raise ValueError(f"account {record.account_id} holds no tokens")
        data = json.loads(self._cipher.decrypt(f"account:{record.account_id}", record.tokens_blob))
        return StoredTokens(access_token=data["a"], refresh_token=data.get("r"))

    def _seal_tokens(self, account_id: str, tokens: StoredTokens) -> bytes:
        payload = {"a": tokens.access_token, "r": tokens.refresh_token}
        return self._cipher.encrypt(f"account:{account_id}", json.dumps(payload).encode())

    async def connect(
        self,
        account_id: str,
        *,
        provider: str,
        scopes: Sequence[str],
        tokens: StoredTokens,
        token_type: str,
        expires_at: float,
        now: float,
    ) -> int:
        result = await self._connect(
            keys=[
                self._account_key(account_id),
                self._accounts_key,
                self.events_stream,
                self.new_operation(),
            ],
            args=[
                account_id,
                provider,
                " ".join(scopes),
                repr(now),
                repr(expires_at),
                token_type,
                self._seal_tokens(account_id, tokens),
                self._maxlen,
                int(now * 1000),
                OPERATION_TTL_MS,
            ],
        )
        return int(result)

    async def store_refreshed(
        self,
        account_id: str,
        *,
        expected_generation: int,
        tokens: StoredTokens,
        token_type: str,
        expires_at: float,
        scopes: Sequence[str],
        now: float,
        lock_owner: str | None = None,
        forced: bool = False,
        operation: str | None = None,
    ) -> int:
        """Fenced write; returns the new generation or 0 when fenced out.

        With ``lock_owner``, a successful write also releases that holder's lock.
        ``forced``: a forced refresh, whose time starts the forced-refresh cool-down.
        ``operation`` (from :meth:`new_operation`): the caller retries the same write
        itself and wants every try recognised as one.
        """
        result = await self._refresh(
            keys=[
                self._account_key(account_id),
                self.events_stream,
                self.lock_key(account_id),
                operation or self.new_operation(),
            ],
            args=[
                account_id,
                str(expected_generation),
                repr(expires_at),
                token_type,
                self._seal_tokens(account_id, tokens),
                " ".join(scopes),
                self._maxlen,
                int(now * 1000),
                repr(now) if forced else "",
                lock_owner or "",
                OPERATION_TTL_MS,
            ],
        )
        return int(result)

    async def disconnect(
        self, account_id: str, *, reason: str, expected_generation: int | None, now: float
    ) -> int:
        """Fenced unless ``expected_generation`` is None; returns the new generation or 0."""
        expected = "" if expected_generation is None else str(expected_generation)
        result = await self._disconnect(
            keys=[self._account_key(account_id), self.events_stream, self.new_operation()],
            args=[account_id, expected, reason, self._maxlen, int(now * 1000), OPERATION_TTL_MS],
        )
        return int(result)

    async def record_refresh_failure(
        self,
        account_id: str,
        *,
        expected_generation: int,
        reason: str,
        retry_at: float,
        now: float,
        answer_lost: bool = False,
        forced: bool = False,
    ) -> int:
        """Fenced REFRESH_FAILED; returns the failure count or 0 when the account moved on.

        ``answer_lost`` marks the account until a refresh succeeds (a later
        ``invalid_grant`` then says why); ``forced`` starts the forced-refresh cool-down.
        """
        result = await self._refresh_failed(
            keys=[self._account_key(account_id), self.events_stream, self.new_operation()],
            args=[
                account_id,
                str(expected_generation),
                reason,
                repr(retry_at),
                self._maxlen,
                int(now * 1000),
                "1" if answer_lost else "0",
                repr(now) if forced else "",
                OPERATION_TTL_MS,
            ],
        )
        return int(result)

    # -- the refresh lock ---------------------------------------------------

    async def try_lock(self, account_id: str, ttl_seconds: float) -> str | None:
        """``SET NX PX`` (safe to re-send); returns the owner token when acquired."""
        owner = secrets.token_hex(16)
        acquired = await self._try_lock(
            keys=[self.lock_key(account_id)], args=[owner, max(1, int(ttl_seconds * 1000))]
        )
        return owner if acquired else None

    async def extend_lock(self, account_id: str, owner: str, ttl_seconds: float) -> bool:
        result = await self._extend(
            keys=[self.lock_key(account_id)], args=[owner, max(1, int(ttl_seconds * 1000))]
        )
        return bool(result)

    async def release_lock(self, account_id: str, owner: str) -> bool:
        return bool(await self._release(keys=[self.lock_key(account_id)], args=[owner]))

    async def lock_held(self, account_id: str) -> bool:
        return bool(await self._redis.exists(self.lock_key(account_id)))

    # -- flows --------------------------------------------------------------

    async def put_flow(self, flow: FlowRecord, ttl_seconds: float) -> None:
        payload = {
            "account_id": flow.account_id,
            "provider": flow.provider,
            "redirect_uri": flow.redirect_uri,
            "state": flow.state,
            "verifier": flow.verifier,
            "expires_at": flow.expires_at,
        }
        blob = self._cipher.encrypt(f"flow:{flow.flow_id}", json.dumps(payload).encode())
        await self._redis.set(self._flow_key(flow.flow_id), blob, px=int(ttl_seconds * 1000))

    def _open_flow(self, flow_id: str, blob: bytes) -> FlowRecord:
        data: Mapping[str, Any] = json.loads(self._cipher.decrypt(f"flow:{flow_id}", blob))
        return FlowRecord(flow_id=flow_id, **data)

    async def get_flow(self, flow_id: str) -> FlowRecord | None:
        blob = cast(bytes | None, await self._redis.get(self._flow_key(flow_id)))
        return None if blob is None else self._open_flow(flow_id, blob)

    async def claim_flow(self, flow_id: str) -> FlowRecord | None:
        """Atomically takes the flow out of the store: only one caller can use it (a
        re-sent claim of the same call gets it again; see TAKE_ONCE)."""
        blob = await take_once(self._take_once, self._flow_key(flow_id))
        return None if blob is None else self._open_flow(flow_id, blob)

    async def delete_flow(self, flow_id: str) -> bool:
        return bool(await self._redis.delete(self._flow_key(flow_id)))

    # -- events -------------------------------------------------------------

    async def last_event_id(self) -> str:
        entries = cast(list[Any], await self._redis.xrevrange(self.events_stream, count=1))
        return entries[0][0].decode() if entries else "0-0"

    async def read_events(
        self, after_id: str, *, block_ms: int = EVENTS_BLOCK_MS, count: int = 100
    ) -> list[StoredEvent]:
        """Up to ``count`` events after ``after_id``, waiting up to ``block_ms`` for one
        (XREAD BLOCK holds its pooled connection meanwhile: only the replica's one
        reader, ``keyrelay.auth.events``, calls this)."""
        reply = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
            await self._redis.xread({self.events_stream: after_id}, count=count, block=block_ms),
        )
        return [_stored_event(i, f) for _stream, entries in reply or () for i, f in entries]

    async def read_history(self, after_id: str, count: int) -> list[StoredEvent]:
        """Up to ``count`` events after ``after_id``, at once (XRANGE with an exclusive
        start: never blocks, so the connection goes back to the pool at once)."""
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self._redis.xrange(self.events_stream, min=f"({after_id}", count=count),
        )
        return [_stored_event(i, f) for i, f in entries]


def _stored_event(entry_id: bytes, fields: dict[bytes, bytes]) -> StoredEvent:
    return StoredEvent(
        event_id=entry_id.decode(),
        account_id=_text(fields.get(b"account_id")),
        kind=_text(fields.get(b"kind")),
        reason=_text(fields.get(b"reason")),
        generation=int(_number(fields.get(b"generation"))),
        at_ms=int(_number(fields.get(b"at"))),
        key_id=_text(fields.get(b"key_id")),
    )


__all__ = [
    "CONNECTED",
    "DISCONNECTED",
    "TAKE_ONCE",
    "AccountRecord",
    "FlowRecord",
    "RedisStore",
    "StoredEvent",
    "StoredTokens",
    "take_once",
]
