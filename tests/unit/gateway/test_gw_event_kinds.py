"""A gateway ignores event kinds it does not act on (KEY_CHANGED today, any newer
kind tomorrow): its cached tokens stay, and its resume point still moves on, so an
auth service that adds a kind never breaks the gateways already running."""

from __future__ import annotations

import time

import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.tokens import CachedToken, TokenClient

NOT_YET_INVENTED = 99  # an enum value this code was generated without (proto3 keeps it)


@pytest.mark.parametrize("kind", [auth_pb2.AccountEvent.KEY_CHANGED, NOT_YET_INVENTED])
async def test_an_unknown_kind_keeps_the_cache_and_moves_the_resume_point(kind: int) -> None:
    async with aio.insecure_channel("127.0.0.1:9") as channel:
        client = TokenClient(channel, "gateway-token-0123456789")
        token = CachedToken("access", "Bearer", time.time() + 3600, generation=4)
        client._cache["acct"] = token
        event = auth_pb2.AccountEvent(
            event_id="1700000000000-1",
            account_id="acct",
            kind=kind,  # type: ignore[arg-type]  # NOT_YET_INVENTED is no Kind, on purpose
            reason="created",
            generation=9,
            key_id="gk-0123456789abcdef",
        )
        client.apply_event(event)
        assert client._cache == {"acct": token}
        assert client._last_event_id == "1700000000000-1"
        assert await client.get("acct") is token  # served from the cache: no RPC

        client.apply_event(
            auth_pb2.AccountEvent(
                event_id="1700000000000-2",
                account_id="acct",
                kind=auth_pb2.AccountEvent.REFRESHED,
                generation=5,
            )
        )
        assert client._cache == {}  # the kinds it knows still work after one it does not
