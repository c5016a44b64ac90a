"""``keyrelay.auth.v1.AuthService``: protobuf in, ``AuthService`` call, protobuf out.

Authentication and error statuses are handled by the interceptor; nothing
here decides anything. Two exceptions, both gRPC's business: how a ``WatchEvents``
call ends when the event hub cuts it or refuses it (``RESOURCE_EXHAUSTED``,
``_CallCut``), and a key request carrying fields this server does not know
(``_known_fields_only``): protobuf parses a field of the wrong wire type (a
string where a limit's integer belongs) as an unknown field, and a limit read as
unset would be no limit at all, so such a request is refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final, Literal

import grpc
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc import aio

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.gateway_keys import KeyChanges, KeyRecord, Route, limits_from
from keyrelay.auth.core.usage import UsageRow
from keyrelay.auth.events import FellBehind, TooManySubscribers
from keyrelay.auth.service import AuthService
from keyrelay.auth.store.redis_store import AccountRecord, StoredEvent
from keyrelay.auth.v1 import EVENTS_CURSOR_METADATA, auth_pb2, auth_pb2_grpc
from keyrelay.limit_rules import Limits

Context = aio.ServicerContext[Any, Any]
log = logging.getLogger("keyrelay.auth.rpc")

# A cut subscriber's status goes out behind the events already handed to gRPC: a
# client that reads gets it at once. One that does not read never would, so after
# this the call's task is cancelled and nothing of ours waits on that client.
CUT_GRACE_SECONDS: Final = 2.0
_ENDING: set[asyncio.Task[None]] = set()  # calls being ended (a task needs a reference)

_STATUS = {
    "connected": auth_pb2.Account.CONNECTED,
    "disconnected": auth_pb2.Account.DISCONNECTED,
}
_KIND = {
    "CONNECTED": auth_pb2.AccountEvent.CONNECTED,
    "REFRESHED": auth_pb2.AccountEvent.REFRESHED,
    "DISCONNECTED": auth_pb2.AccountEvent.DISCONNECTED,
    "REFRESH_FAILED": auth_pb2.AccountEvent.REFRESH_FAILED,
    "KEY_CHANGED": auth_pb2.AccountEvent.KEY_CHANGED,
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
        key_id=event.key_id,
    )


def _known_fields_only(message: Message, path: str = "") -> None:
    """``InvalidArgument`` naming the first message (``limits``, ``route``, ...) that
    carries a field this server does not know, or one of the wrong type."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({unknown[i].field_number for i in range(len(unknown))})
        raise InvalidArgument(
            f"{path or 'the request'} has a field of the wrong type or one this server does "
            f"not know (field numbers {', '.join(map(str, numbers))})"
        )
    for descriptor, value in message.ListFields():
        if isinstance(value, Message):
            _known_fields_only(value, f"{path}.{descriptor.name}" if path else descriptor.name)


def route_of(message: auth_pb2.KeyRoute) -> Route:
    return Route(message.account_id, message.mode, message.profile, message.upstream, message.pool)


def limits_of(message: auth_pb2.KeyLimits) -> Limits:
    """The limits a request states (unset: none); ``InvalidArgument`` naming the field
    if a gateway could not enforce them (``limits_from``)."""
    data: dict[str, object] = {
        "requests_per_minute": _optional(message, "requests_per_minute"),
        "tokens_per_minute": _optional(message, "tokens_per_minute"),
        "concurrent_requests": _optional(message, "concurrent_requests"),
    }
    if message.HasField("budget"):
        budget = message.budget
        data["budget"] = {"amount": budget.amount, "unit": budget.unit, "period": budget.period}
    return limits_from(data)


def _optional(
    message: auth_pb2.KeyLimits,
    name: Literal["requests_per_minute", "tokens_per_minute", "concurrent_requests"],
) -> int | None:
    return getattr(message, name) if message.HasField(name) else None


def key_message(record: KeyRecord) -> auth_pb2.GatewayKey:
    route, limits = record.route, record.limits
    message = auth_pb2.GatewayKey(
        key_id=record.key_id,
        name=record.name,
        key_sha256=record.key_sha256,
        route=auth_pb2.KeyRoute(
            account_id=route.account_id,
            mode=route.mode,
            profile=route.profile,
            upstream=route.upstream,
            pool=route.pool,
        ),
        limits=auth_pb2.KeyLimits(
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
            concurrent_requests=limits.concurrent_requests,
        ),
        created_at=record.created_at,
        updated_at=record.updated_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        version=record.version,
    )
    if limits.budget is not None:
        budget = limits.budget
        message.limits.budget.CopyFrom(
            auth_pb2.KeyBudget(
                amount=budget.plain_amount, unit=budget.unit.value, period=budget.period.value
            )
        )
    return message


def usage_row_message(row: UsageRow) -> auth_pb2.UsageRow:
    usage = row.usage
    return auth_pb2.UsageRow(
        day=row.day,
        kind=row.kind,
        id=row.id,
        key_id=row.key_id,
        name=row.name,
        requests=usage.requests,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        tokens=usage.tokens,
        cost_usd=usage.cost_usd,
        unpriced=usage.unpriced,
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

    async def CreateKey(
        self, request: auth_pb2.CreateKeyRequest, context: Context
    ) -> auth_pb2.CreateKeyResponse:
        _known_fields_only(request)
        created = await self._service.create_key(
            request.name, route_of(request.route), limits_of(request.limits), request.expires_at
        )
        return auth_pb2.CreateKeyResponse(key=key_message(created.key), secret=created.secret)

    async def UpdateKey(
        self, request: auth_pb2.UpdateKeyRequest, context: Context
    ) -> auth_pb2.GatewayKey:
        _known_fields_only(request)
        changes = KeyChanges(
            name=request.name if request.HasField("name") else None,
            route=route_of(request.route) if request.HasField("route") else None,
            limits=limits_of(request.limits) if request.HasField("limits") else None,
            expires_at=request.expires_at if request.HasField("expires_at") else None,
        )
        record = await self._service.update_key(request.key_id, changes, request.expected_version)
        return key_message(record)

    async def RevokeKey(
        self, request: auth_pb2.RevokeKeyRequest, context: Context
    ) -> auth_pb2.GatewayKey:
        record = await self._service.revoke_key(request.key_id, request.expected_version)
        return key_message(record)

    async def GetKey(
        self, request: auth_pb2.GetKeyRequest, context: Context
    ) -> auth_pb2.GatewayKey:
        return key_message(await self._service.get_key(request.key_id))

    async def ListKeys(
        self, request: auth_pb2.ListKeysRequest, context: Context
    ) -> auth_pb2.ListKeysResponse:
        records, cursor = await self._service.list_keys(include_revoked=request.include_revoked)
        return auth_pb2.ListKeysResponse(
            keys=[key_message(r) for r in records], events_cursor=cursor
        )

    async def GetUsage(
        self, request: auth_pb2.GetUsageRequest, context: Context
    ) -> auth_pb2.GetUsageResponse:
        report = await self._service.get_usage(
            key_id=request.key_id,
            key_sha256=request.key_sha256,
            account_id=request.account_id,
            days=request.days if request.HasField("days") else None,
        )
        return auth_pb2.GetUsageResponse(
            since=report.since,
            until=report.until,
            rows=[usage_row_message(r) for r in report.rows],
            totals=[usage_row_message(r) for r in report.totals],
        )

    async def WatchEvents(
        self, request: auth_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[auth_pb2.AccountEvent]:
        try:
            watch = self._service.watch_events(request.after_event_id, peer=context.peer())
        except TooManySubscribers as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        with watch:
            await context.send_initial_metadata(((EVENTS_CURSOR_METADATA, watch.starting_point),))
            cut = _CallCut(context)
            watch.on_cut = cut.start
            try:
                async for event in watch:
                    yield event_message(event)
            except FellBehind:
                await cut.wait()  # it ends this call


class _CallCut:
    """Ends a cut subscriber's call: ``RESOURCE_EXHAUSTED`` with the hub's message, then
    the call's task is cancelled (``CUT_GRACE_SECONDS``).

    The hub calls ``start`` when it cuts, from its reader: the call's own task is
    then usually waiting in a write that flow control holds (the client reads too
    slowly, or not at all), where nothing inside the call could end it.
    """

    __slots__ = ("_call", "_context", "_task")

    def __init__(self, context: Context) -> None:
        self._context = context
        self._call = asyncio.current_task()
        self._task: asyncio.Task[None] | None = None

    def start(self, message: str) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._end(message))
            _ENDING.add(self._task)
            self._task.add_done_callback(_ENDING.discard)

    async def wait(self) -> None:
        assert self._task is not None, "the hub starts the cut before the watch reports it"
        await asyncio.shield(self._task)

    async def _end(self, message: str) -> None:
        try:
            await asyncio.wait_for(
                self._context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message),
                CUT_GRACE_SECONDS,
            )
        except (aio.AbortError, TimeoutError):
            pass  # sent (abort raises once done), or queued behind what the client has not read
        except Exception:  # the call ended meanwhile (the client went away): nothing to send
            log.debug("a cut WatchEvents call could not be aborted", exc_info=True)
        finally:
            if self._call is not None:
                self._call.cancel()
