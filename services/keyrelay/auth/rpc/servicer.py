"""``keyrelay.auth.v1.AuthService``: protobuf in, ``AuthService`` call, protobuf out.

Authentication and error statuses are handled by the interceptor; nothing
here decides anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from keyrelay.auth.service import AuthService
from keyrelay.auth.store.redis_store import AccountRecord, StoredEvent
from keyrelay.auth.v1 import EVENTS_CURSOR_METADATA, auth_pb2, auth_pb2_grpc

Context = aio.ServicerContext[Any, Any]

_STATUS = {
    "connected": auth_pb2.Account.CONNECTED,
    "disconnected": auth_pb2.Account.DISCONNECTED,
}
_KIND = {
    "CONNECTED": auth_pb2.AccountEvent.CONNECTED,
    "REFRESHED": auth_pb2.AccountEvent.REFRESHED,
    "DISCONNECTED": auth_pb2.AccountEvent.DISCONNECTED,
    "REFRESH_FAILED": auth_pb2.AccountEvent.REFRESH_FAILED,
}


def account_message(record: AccountRecord) -> auth_pb2.Account:
    return auth_pb2.Account(
        account_id=record.account_id,
        status=_STATUS.get(record.status, auth_pb2.Account.STATUS_UNSPECIFIED),
        provider=record.provider,
        scopes=record.scopes,
        connected_at=int(record.connected_at),
        access_token_expires_at=int(record.expires_at) if record.connected else 0,
        disconnect_reason=record.disconnect_reason,
        generation=record.generation,
        last_error=record.last_error,
    )


def event_message(event: StoredEvent) -> auth_pb2.AccountEvent:
    return auth_pb2.AccountEvent(
        event_id=event.event_id,
        account_id=event.account_id,
        kind=_KIND.get(event.kind, auth_pb2.AccountEvent.KIND_UNSPECIFIED),
        reason=event.reason,
        generation=event.generation,
        at=event.at_ms,
    )


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, service: AuthService) -> None:
        self._service = service

    async def StartFlow(
        self, request: auth_pb2.StartFlowRequest, context: Context
    ) -> auth_pb2.StartFlowResponse:
        flow = await self._service.start_flow(
            request.account_id, request.provider, request.redirect_uri
        )
        return auth_pb2.StartFlowResponse(
            flow_id=flow.flow_id, authorize_url=flow.authorize_url, expires_at=int(flow.expires_at)
        )

    async def SubmitCode(
        self, request: auth_pb2.SubmitCodeRequest, context: Context
    ) -> auth_pb2.Account:
        record = await self._service.submit_code(request.flow_id, request.code, request.state)
        return account_message(record)

    async def CancelFlow(
        self, request: auth_pb2.CancelFlowRequest, context: Context
    ) -> auth_pb2.CancelFlowResponse:
        await self._service.cancel_flow(request.flow_id)
        return auth_pb2.CancelFlowResponse()

    async def Disconnect(
        self, request: auth_pb2.DisconnectRequest, context: Context
    ) -> auth_pb2.Account:
        return account_message(await self._service.disconnect(request.account_id))

    async def GetToken(
        self, request: auth_pb2.GetTokenRequest, context: Context
    ) -> auth_pb2.GetTokenResponse:
        token = await self._service.get_token(
            request.account_id, float(request.min_ttl_seconds), request.stale_generation
        )
        return auth_pb2.GetTokenResponse(
            access_token=token.access_token,
            token_type=token.token_type,
            expires_at=int(token.expires_at),
            generation=token.generation,
        )

    async def GetAccount(
        self, request: auth_pb2.GetAccountRequest, context: Context
    ) -> auth_pb2.Account:
        return account_message(await self._service.get_account(request.account_id))

    async def ListAccounts(
        self, request: auth_pb2.ListAccountsRequest, context: Context
    ) -> auth_pb2.ListAccountsResponse:
        records = await self._service.list_accounts()
        return auth_pb2.ListAccountsResponse(accounts=[account_message(r) for r in records])

    async def WatchEvents(
        self, request: auth_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[auth_pb2.AccountEvent]:
        cursor = await self._service.events_cursor(request.after_event_id)
        await context.send_initial_metadata(((EVENTS_CURSOR_METADATA, cursor),))
        async for event in self._service.watch_events(cursor):
            yield event_message(event)
