"""Server interceptors: caller authentication and the domain-error → status mapping.

Both wrap the method handler that ``continuation`` returns, so the servicer
never sees an unauthenticated call and never formats a status itself. An
exception that is not an ``AuthError`` becomes ``INTERNAL`` with a fixed
message: its text could carry anything and never reaches the caller.

Outermost, ``_observed`` counts every AuthService call by method and status
(``keyrelay.auth.metrics``) and, only when tracing is enabled, runs a unary
call in a server span continuing the caller's ``traceparent``. WatchEvents
lives as long as a gateway does, so it is counted but gets no span.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc
from grpc import aio

from keyrelay.auth import metrics
from keyrelay.auth.config import Caller, Role
from keyrelay.auth.core.errors import (
    AuthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    mapped,
)
from keyrelay.tracing import NOOP_TRACER, Tracer

log = logging.getLogger("keyrelay.auth.rpc")

SERVICE: Final = "/keyrelay.auth.v1.AuthService/"
# ListKeys and GetKey: a gateway loads every gateway key and refetches a changed one.
GATEWAY_METHODS: Final = frozenset(
    SERVICE + m for m in ("GetToken", "GetAccount", "WatchEvents", "ListKeys", "GetKey")
)
# Probes and tooling must work without a service token; neither reveals data.
PUBLIC_PREFIXES: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")

STATUS_OF: Final[dict[type[AuthError], grpc.StatusCode]] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
Behaviour = Callable[[Any, aio.ServicerContext[Any, Any]], Any]


def status_of(error: AuthError) -> grpc.StatusCode:
    return mapped(error, STATUS_OF, grpc.StatusCode.INTERNAL)


class CallsInFlight:
    """How many unary calls are being answered: the event hub paces its deliveries
    while there are any (``EventHub(busy=...)``)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0


def _wrap(
    handler: Handler,
    guard: Callable[[str], None] | None,
    method: str,
    tracer: Tracer,
    calls: CallsInFlight,
) -> Handler:
    """Rebuilds ``handler`` with its behaviour run under ``guard`` and the error
    mapping; its unary calls are counted in ``calls`` while they run."""

    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        calls.count += 1
        try:
            if guard is not None:
                guard_call(guard, context)
            behaviour: Callable[..., Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]
            return await behaviour(request, context)
        except AuthError as exc:
            await context.abort(status_of(exc), str(exc))
        except Exception:
            if context.code() is not None:  # aborted on purpose by the behaviour
                raise
            log.exception("unexpected error", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
        finally:
            calls.count -= 1

    async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            if guard is not None:
                guard_call(guard, context)
            behaviour: Callable[..., AsyncIterator[Any]] = handler.unary_stream  # type: ignore[assignment]
            async for item in behaviour(request, context):
                yield item
        except AuthError as exc:
            await context.abort(status_of(exc), str(exc))
        except Exception:
            if context.code() is not None:
                raise
            log.exception("unexpected error", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _observed(unary, method, tracer),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _observed_stream(stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler  # client-streaming shapes are not used by AuthService


def _code(context: aio.ServicerContext[Any, Any], default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


# Server faults (OpenTelemetry's rule for gRPC server spans); other codes are the caller's.
_SERVER_ERRORS: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _observed(behaviour: Behaviour, method: str, tracer: Tracer) -> Behaviour:
    rpc = metrics.rpc(method.rsplit("/", 1)[-1])

    async def measured(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.CANCELLED  # unless the call ends otherwise
        try:
            result = await behaviour(request, context)
        except Exception:
            code = _code(context, grpc.StatusCode.UNKNOWN)
            raise
        else:
            code = _code(context, grpc.StatusCode.OK)
        finally:
            rpc.observe(code, time.perf_counter() - started)
        return result

    if not tracer.enabled:
        return measured
    name = method.lstrip("/")
    service, _, short = name.rpartition("/")

    async def traced(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": short,
        }
        account = getattr(request, "account_id", "")
        if account:
            attributes["keyrelay.account"] = account
        with tracer.server_span(name, context.invocation_metadata() or (), attributes) as span:
            try:
                return await measured(request, context)
            finally:
                code = _code(context, grpc.StatusCode.OK)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    tracer.fail(span, code.name)

    return traced


def _observed_stream(
    behaviour: Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterator[Any]], method: str
) -> Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    rpc = metrics.rpc(method.rsplit("/", 1)[-1])

    async def measured(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = time.perf_counter()
        code = grpc.StatusCode.CANCELLED
        try:
            async for item in behaviour(request, context):
                yield item
            code = _code(context, grpc.StatusCode.OK)
        except Exception:
            code = _code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            rpc.observe(code, time.perf_counter() - started)

    return measured


def guard_call(guard: Callable[[str], None], context: aio.ServicerContext[Any, Any]) -> None:
    metadata = context.invocation_metadata() or ()
    header = ""
    for key, value in metadata:
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode("latin-1")
            break
    guard(header)


class CallerAuthenticator:
    """Maps ``authorization: Bearer <token>`` to a role, comparing in constant time."""

    def __init__(self, callers: Sequence[Caller]) -> None:
        self._callers = [(c.role, c.token.encode()) for c in callers]

    def role_of(self, header: str) -> Role:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "missing service token: send metadata 'authorization: Bearer <token>'"
            )
        presented = token.strip().encode()
        role: Role | None = None
        for candidate_role, secret in self._callers:
            # Compare against every token so the timing does not reveal which matched.
            if hmac.compare_digest(presented, secret) and role is None:
                role = candidate_role
        if role is None:
            raise Unauthenticated("unknown service token")
        return role

    def guard_for(self, method: str) -> Callable[[str], None]:
        def guard(header: str) -> None:
            role = self.role_of(header)
            if role != "admin" and method not in GATEWAY_METHODS:
                raise PermissionDenied(f"role {role!r} may not call {method.rsplit('/', 1)[-1]}")

        return guard


class AuthInterceptor(aio.ServerInterceptor):
    def __init__(self, authenticator: CallerAuthenticator, tracer: Tracer = NOOP_TRACER) -> None:
        self._auth = authenticator
        self._tracer = tracer
        self.unary_calls = CallsInFlight()
        # method -> (the servicer's handler, its wrapped form): wrapping builds closures
        # and a handler object, work that would otherwise be redone on every call.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(
            handler, self._auth.guard_for(method), method, self._tracer, self.unary_calls
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped
