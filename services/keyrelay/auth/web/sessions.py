"""Browser sessions of the web connect page, kept in Redis so every replica knows them.

Keys (``P`` is the service's key prefix)::

    P web:session:<sha256(session id)>  hash  caller, csrf, flash:<n>, pending:<handle>
                                              (expires with the session: absolute TTL)
    P web:state:<sha256(state)>         string  {"session": ..., "handle": ...}
                                              (expires with its flow)

The session id (the cookie value, 32 random bytes) and the OAuth ``state`` are
stored only as SHA-256 hashes, so a Redis dump gives no usable cookie and no
state. ``caller`` is a fingerprint of the admin token that logged in (a hash,
never the token): a session whose token was removed from the config stops
working. ``pending:<handle>`` is a flow this session started (flow id, account,
provider, authorize URL); the state index finds it again when the provider
redirects to ``/callback``. Writes into a session go through a script that
only writes while the session still exists, so an expired session is never
brought back without its TTL.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as redis

from keyrelay.auth.store.redis_store import TAKE_ONCE, take_once
from keyrelay.auth.web.pages import Flash, PendingView

# KEYS: [1] session hash.  ARGV: [1] field, [2] value.
# Returns 1 when written, 0 when the session no longer exists.
_HSET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def caller_fingerprint(token: str) -> str:
    return hashlib.sha256(b"keyrelay web session caller\0" + token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PendingFlow:
    handle: str
    flow_id: str
    account_id: str
    provider: str
    authorize_url: str
    expires_at: float
    via_callback: bool

    def view(self) -> PendingView:
        return PendingView(
            self.handle,
            self.account_id,
            self.provider,
            self.authorize_url,
            self.expires_at,
            self.via_callback,
        )


@dataclass(frozen=True, slots=True)
class Session:
    key: str  # the Redis key, derived from the session id
    caller: str
    csrf: str
    flashes: tuple[tuple[str, Flash], ...]  # (field, flash), oldest first
    pending: tuple[PendingFlow, ...]


class SessionStore:
    def __init__(self, client: redis.Redis, prefix: str, ttl_seconds: float) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl_ms = int(ttl_seconds * 1000)
        self._hset = client.register_script(_HSET_IF_EXISTS)
        self._take_once = client.register_script(TAKE_ONCE)

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}web:session:{digest(session_id)}"

    def _state_key(self, state: str) -> str:
        return f"{self._prefix}web:state:{digest(state)}"

    async def create(self, caller: str) -> tuple[str, Session]:
        """A new session (a new id on every login: no fixation); returns (cookie value, session)."""
        session_id = secrets.token_urlsafe(32)
        key = self._session_key(session_id)
        csrf = secrets.token_urlsafe(32)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"caller": caller, "csrf": csrf})
            pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()
        return session_id, Session(key, caller, csrf, (), ())

    async def load(self, session_id: str) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        return await self.reload(self._session_key(session_id))

    async def reload(self, key: str) -> Session | None:
        """The session as Redis has it now (after this request changed it)."""
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(key))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if "caller" not in fields or "csrf" not in fields:
            return None
        flashes: list[tuple[int, str, Flash]] = []
        pending: list[PendingFlow] = []
        for name, value in fields.items():
            if name.startswith("flash:"):
                data = json.loads(value)
                flash = Flash("error" if data.get("kind") == "error" else "ok", str(data["text"]))
                flashes.append((int(name[6:]), name, flash))
            elif name.startswith("pending:"):
                pending.append(PendingFlow(**json.loads(value)))
        flashes.sort(key=lambda item: item[0])
        return Session(
            key,
            fields["caller"],
            fields["csrf"],
            tuple((name, flash) for _, name, flash in flashes),
            tuple(sorted(pending, key=lambda p: p.expires_at)),
        )

    async def delete(self, session: Session) -> None:
        await self._redis.delete(session.key)

    async def add_flash(self, session_key: str, flash: Flash) -> None:
        # Ordered by Redis's clock (replicas' clocks may differ); the random tail
        # keeps two flashes of the same millisecond apart.
        field = f"flash:{int(await self._now_ms())}{secrets.randbelow(1000):03d}"
        value = json.dumps({"kind": flash.kind, "text": flash.text})
        await self._hset(keys=[session_key], args=[field, value])

    async def _now_ms(self) -> float:
        seconds, micros = await self._redis.time()
        return seconds * 1000 + micros / 1000

    async def drop_flashes(self, session: Session) -> None:
        if session.flashes:
            await self._redis.hdel(session.key, *(name for name, _ in session.flashes))

    async def add_pending(self, session: Session, flow: PendingFlow, state: str) -> None:
        value: dict[str, Any] = {
            "handle": flow.handle,
            "flow_id": flow.flow_id,
            "account_id": flow.account_id,
            "provider": flow.provider,
            "authorize_url": flow.authorize_url,
            "expires_at": flow.expires_at,
            "via_callback": flow.via_callback,
        }
        await self._hset(keys=[session.key], args=[f"pending:{flow.handle}", json.dumps(value)])
        ttl_ms = max(1000, int((flow.expires_at - await self._now_ms() / 1000) * 1000))
        index = json.dumps({"session": session.key, "handle": flow.handle})
        await self._redis.set(self._state_key(state), index, px=ttl_ms)

    async def remove_pending(self, session_key: str, handle: str) -> None:
        await self._redis.hdel(session_key, f"pending:{handle}")

    async def pending_of(self, session_key: str, handle: str) -> PendingFlow | None:
        raw = cast(bytes | None, await self._redis.hget(session_key, f"pending:{handle}"))
        return None if raw is None else PendingFlow(**json.loads(raw))

    async def take_state(self, state: str) -> tuple[str, PendingFlow] | None:
        """The session and flow a callback's ``state`` belongs to; each state works once."""
        if not state or len(state) > 512:
            return None
        # Not GETDEL: a copy re-sent after a lost reply would find nothing and turn a
        # valid callback into "state mismatch" (DESIGN §1.2.1).
        raw = await take_once(self._take_once, self._state_key(state))
        if raw is None:
            return None
        index = json.loads(raw)
        session_key, handle = str(index["session"]), str(index["handle"])
        flow = await self.pending_of(session_key, handle)
        return None if flow is None else (session_key, flow)
