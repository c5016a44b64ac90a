"""Browser sessions of the web connect page, kept in Redis so every replica knows them.

Keys (``P`` is the service's key prefix)::

    P web:session:<sha256(session id)>  hash  caller, csrf, flash:<n>, pending:<handle>
                                              (expires with the session: absolute TTL)
    P web:state:<sha256(state)>         string  {"session": ..., "handle": ...}
                                              (expires with its flow)
    P web:form:<sha256(session, form)>  string  a create-key form's first submission:
                                              "pending:<random>", then
                                              {"key_id": ..., "name": ...}
                                              (the session's TTL)
    P web:reveal:<sha256(session, form)>  string  the new key, sealed (REVEAL_TTL_SECONDS;
                                              taken by its first view)

The session id (the cookie value, 32 random bytes) and the OAuth ``state`` are
stored only as SHA-256 hashes, so a Redis dump gives no usable cookie and no
state. ``caller`` is a fingerprint of the admin token that logged in (a hash,
never the token): a session whose token was removed from the config stops
working. ``pending:<handle>`` is a flow this session started (flow id, account,
provider, authorize URL); the state index finds it again when the provider
redirects to ``/callback``. Writes into a session go through a script that
only writes while the session still exists, so an expired session is never
brought back without its TTL.

A new gateway key goes from the create POST to the one page that shows it
(POST, 303, GET) through ``web:reveal``: each create form carries a random
``form_id`` (24 bytes, in the page's HTML only), which names the form's claim and
reveal together with the session (another session finds neither) and is the
AES-256-GCM key material of the sealed key (SHA-256 of it, with its own label;
the key id as associated data). Redis holds neither the form id nor the key: a
dump of it shows no usable key. The first view takes the reveal (``TAKE_ONCE``),
so a reload finds nothing; the claim makes a second submission of the same form
create nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final, cast

import redis.asyncio as redis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrelay.auth.store.redis_store import TAKE_ONCE, take_once
from keyrelay.auth.web.pages import Flash, PendingView

REVEAL_TTL_SECONDS: Final = 300  # the 303 is followed at once; room for a retried load
FORM_SETTLE_SECONDS: Final = 5.0  # a second submission waits this long for the first
_NONCE_LEN: Final = 12

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


def _reveal_cipher(form_id: str) -> AESGCM:
    return AESGCM(hashlib.sha256(b"keyrelay web reveal cipher\0" + form_id.encode()).digest())


def seal_key(form_id: str, key_id: str, secret: str) -> bytes:
    nonce = os.urandom(_NONCE_LEN)
    return nonce + _reveal_cipher(form_id).encrypt(nonce, secret.encode(), key_id.encode())


def open_key(form_id: str, key_id: str, sealed: bytes) -> str:
    """The key ``seal_key`` sealed; ``cryptography.exceptions.InvalidTag`` if it was not
    sealed for this form and key."""
    nonce, body = sealed[:_NONCE_LEN], sealed[_NONCE_LEN:]
    return _reveal_cipher(form_id).decrypt(nonce, body, key_id.encode()).decode()


@dataclass(frozen=True, slots=True)
class FormResult:
    """What a create form's first submission made."""

    key_id: str
    name: str


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

    def _form_key(self, session_key: str, form_id: str, kind: str) -> str:
        name = digest("\0".join((kind, session_key, form_id)))
        return f"{self._prefix}web:{kind}:{name}"

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

    # -- the create-key form: one key per form, shown once (module docstring) ---------

    async def claim_form(self, session: Session, form_id: str) -> bool:
        """True for the form's first submission (it may create the key), else False."""
        key = self._form_key(session.key, form_id, "form")
        mine = "pending:" + secrets.token_urlsafe(12)
        if await self._redis.set(key, mine, nx=True, px=self._ttl_ms):
            return True
        # A SET re-sent after a lost reply finds the value it wrote.
        return cast(bytes | None, await self._redis.get(key)) == mine.encode()

    async def release_form(self, session: Session, form_id: str) -> None:
        """The submission created nothing: the form may be sent again."""
        await self._redis.delete(self._form_key(session.key, form_id, "form"))

    async def settle_form(
        self, session: Session, form_id: str, result: FormResult, secret: str
    ) -> None:
        """The form made ``result``: its key held (sealed) for its first view, and the
        claim naming it for any later submission or view."""
        await self._redis.set(
            self._form_key(session.key, form_id, "reveal"),
            seal_key(form_id, result.key_id, secret),
            px=REVEAL_TTL_SECONDS * 1000,
        )
        claim = json.dumps({"key_id": result.key_id, "name": result.name})
        await self._redis.set(
            self._form_key(session.key, form_id, "form"), claim, xx=True, keepttl=True
        )

    async def form_result(
        self, session: Session, form_id: str, *, wait: float = FORM_SETTLE_SECONDS
    ) -> FormResult | None:
        """What the form made; None if nothing, or if its first submission has not
        finished within ``wait`` seconds."""
        key = self._form_key(session.key, form_id, "form")
        deadline = time.monotonic() + wait
        while True:
            raw = cast(bytes | None, await self._redis.get(key))
            if raw is None:
                return None
            if not raw.startswith(b"pending:"):
                data = json.loads(raw)
                return FormResult(str(data["key_id"]), str(data["name"]))
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def take_key(self, session: Session, form_id: str, key_id: str) -> str | None:
        """The new key, the first time only (None after, or once REVEAL_TTL_SECONDS passed)."""
        sealed = await take_once(self._take_once, self._form_key(session.key, form_id, "reveal"))
        return None if sealed is None else open_key(form_id, key_id, sealed)
