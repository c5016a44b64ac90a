"""Caller authentication, role checks and the domain-error -> gRPC status mapping.

The end-to-end auth checks against the real servicer live in
tests/integration/test_auth_bad_input.py; here the interceptor runs in a real
in-process server in front of tiny generic handlers, so what is tested is the
wrapping itself (unexpected exceptions, deliberate aborts, public services).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from keyrelay.auth.config import Caller
from keyrelay.auth.core import errors
from keyrelay.auth.core.errors import (
    AuthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from keyrelay.auth.rpc.interceptors import (
    GATEWAY_METHODS,
    SERVICE,
    AuthInterceptor,
    CallerAuthenticator,
    status_of,
)
from keyrelay.auth.v1 import auth_pb2

ADMIN_TOKEN = "admin-token-0123456789abcdef"
GATEWAY_TOKEN = "gateway-token-0123456789abcdef"
ALL_METHODS = (
    "StartFlow",
    "SubmitCode",
    "CancelFlow",
    "Disconnect",
    "GetToken",
    "GetAccount",
    "ListAccounts",
    "WatchEvents",
    "CreateKey",
    "UpdateKey",
    "RevokeKey",
    "GetKey",
    "ListKeys",
    "GetUsage",
)
GATEWAY_ALLOWED = ("GetToken", "GetAccount", "WatchEvents", "ListKeys", "GetKey")
INTERNAL_MESSAGE = "internal error; see the service log"
LEAK = "leaky-detail-rt-SECRET-42"


@pytest.fixture
def authenticator() -> CallerAuthenticator:
    return CallerAuthenticator([Caller("admin", ADMIN_TOKEN), Caller("gateway", GATEWAY_TOKEN)])


# --- role_of ---------------------------------------------------------------------------


def test_role_of_known_tokens(authenticator: CallerAuthenticator) -> None:
    assert authenticator.role_of(f"Bearer {ADMIN_TOKEN}") == "admin"
    assert authenticator.role_of(f"Bearer {GATEWAY_TOKEN}") == "gateway"


def test_scheme_is_case_insensitive_and_token_is_trimmed(
    authenticator: CallerAuthenticator,
) -> None:
    assert authenticator.role_of(f"bearer {ADMIN_TOKEN}") == "admin"
    assert authenticator.role_of(f"BEARER  {GATEWAY_TOKEN} ") == "gateway"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        f"Basic {ADMIN_TOKEN}",
        f"Token {ADMIN_TOKEN}",
        ADMIN_TOKEN,
        f"Bearer{ADMIN_TOKEN}",
    ],
)
def test_missing_or_malformed_header_is_unauthenticated(
    authenticator: CallerAuthenticator, header: str
) -> None:
    with pytest.raises(Unauthenticated, match="authorization: Bearer <token>") as info:
        authenticator.role_of(header)
    assert ADMIN_TOKEN not in str(info.value)


@pytest.mark.parametrize(
    "token",
    [
        "not-a-known-token-at-all",
        ADMIN_TOKEN[:-1],
        ADMIN_TOKEN + "x",
        ADMIN_TOKEN.upper(),
        f"{ADMIN_TOKEN} {GATEWAY_TOKEN}",
        "x",
    ],
)
def test_unknown_token_is_unauthenticated_and_never_echoed(
    authenticator: CallerAuthenticator, token: str
) -> None:
    with pytest.raises(Unauthenticated, match="unknown service token") as info:
        authenticator.role_of(f"Bearer {token}")
    assert token not in str(info.value)


def test_no_callers_means_nobody_gets_in() -> None:
    with pytest.raises(Unauthenticated):
        CallerAuthenticator([]).role_of(f"Bearer {ADMIN_TOKEN}")


def test_duplicate_tokens_resolve_to_the_first_role() -> None:
    auth = CallerAuthenticator([Caller("gateway", ADMIN_TOKEN), Caller("admin", ADMIN_TOKEN)])
    assert auth.role_of(f"Bearer {ADMIN_TOKEN}") == "gateway"


# --- guard_for -------------------------------------------------------------------------


def test_gateway_methods_are_exactly_the_documented_ones() -> None:
    assert {SERVICE + m for m in GATEWAY_ALLOWED} == GATEWAY_METHODS


def test_every_rpc_of_the_service_is_listed() -> None:
    methods = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].methods_by_name
    assert set(methods) == set(ALL_METHODS)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_admin_may_call_every_method(authenticator: CallerAuthenticator, method: str) -> None:
    authenticator.guard_for(SERVICE + method)(f"Bearer {ADMIN_TOKEN}")


@pytest.mark.parametrize("method", GATEWAY_ALLOWED)
def test_gateway_may_call_its_methods(authenticator: CallerAuthenticator, method: str) -> None:
    authenticator.guard_for(SERVICE + method)(f"Bearer {GATEWAY_TOKEN}")


@pytest.mark.parametrize("method", sorted(set(ALL_METHODS) - set(GATEWAY_ALLOWED)))
def test_gateway_is_denied_other_methods(authenticator: CallerAuthenticator, method: str) -> None:
    with pytest.raises(PermissionDenied) as info:
        authenticator.guard_for(SERVICE + method)(f"Bearer {GATEWAY_TOKEN}")
    message = str(info.value)
    assert method in message
    assert "gateway" in message
    assert GATEWAY_TOKEN not in message


def test_gateway_is_denied_a_same_named_method_of_another_service(
    authenticator: CallerAuthenticator,
) -> None:
    with pytest.raises(PermissionDenied):
        authenticator.guard_for("/other.v1.Service/GetToken")(f"Bearer {GATEWAY_TOKEN}")


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("header", ["", "Bearer ", "Basic abc", "Bearer wrong-token-1234567890"])
def test_every_method_needs_a_valid_token(
    authenticator: CallerAuthenticator, method: str, header: str
) -> None:
    with pytest.raises(Unauthenticated) as info:
        authenticator.guard_for(SERVICE + method)(header)
    assert "wrong-token" not in str(info.value)


# --- status_of -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (AuthError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_of_each_domain_error(error: AuthError, code: grpc.StatusCode) -> None:
    assert status_of(error) == code


def test_status_of_a_subclass_follows_its_parent() -> None:
    class FlowExpired(NotFound):
        pass

    class DeeperStill(FlowExpired):
        pass

    assert status_of(FlowExpired("gone")) == grpc.StatusCode.NOT_FOUND
    assert status_of(DeeperStill("gone")) == grpc.StatusCode.NOT_FOUND


def test_every_domain_error_class_has_a_distinct_status() -> None:
    classes = [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, AuthError) and obj is not AuthError
    ]
    assert len(classes) == 6
    codes = {status_of(cls("x")) for cls in classes}
    assert len(codes) == len(classes)
    assert grpc.StatusCode.INTERNAL not in codes


# --- a real in-process server ----------------------------------------------------------

FAKE_SERVICE = "keyrelay.auth.v1.AuthService"


async def _boom(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError(LEAK)


async def _echo(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    return b"echo:" + request


async def _not_found(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    raise NotFound("no account 'alice'")


async def _aborts(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")


async def _stream_boom(
    request: bytes, context: aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield b"first"
    raise ValueError(LEAK)


async def _stream_unavailable(
    request: bytes, context: aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield b"first"
    raise Unavailable("redis is unreachable")


def _identity(value: bytes) -> bytes:
    return value


@pytest.fixture
async def server_port() -> AsyncIterator[int]:
    authenticator = CallerAuthenticator(
        [Caller("admin", ADMIN_TOKEN), Caller("gateway", GATEWAY_TOKEN)]
    )
    server = aio.server(interceptors=[AuthInterceptor(authenticator)])
    unary: dict[str, Callable[..., Awaitable[bytes]]] = {
        "Boom": _boom,
        "Echo": _echo,
        "NotFoundy": _not_found,
        "Aborts": _aborts,
        # A method the gateway role may call, here misbehaving.
        "GetToken": _boom,
    }
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_identity, response_serializer=_identity
        )
        for name, fn in unary.items()
    }
    handlers["StreamBoom"] = grpc.unary_stream_rpc_method_handler(
        _stream_boom, request_deserializer=_identity, response_serializer=_identity
    )
    handlers["StreamUnavailable"] = grpc.unary_stream_rpc_method_handler(
        _stream_unavailable, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FAKE_SERVICE, handlers),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port
    finally:
        await server.stop(0)


@pytest.fixture
async def channel(server_port: int) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        yield channel


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _unary(
    channel: aio.Channel, method: str, token: str | None = ADMIN_TOKEN
) -> aio.AioRpcError | bytes:
    call = channel.unary_unary(
        f"/{FAKE_SERVICE}/{method}",
        request_serializer=_identity,
        response_deserializer=_identity,
    )
    try:
        response: bytes = await call(b"ping", metadata=_md(token) if token else None, timeout=5)
    except aio.AioRpcError as exc:
        return exc
    return response


async def _stream(
    channel: aio.Channel, method: str, token: str = ADMIN_TOKEN
) -> tuple[list[bytes], aio.AioRpcError | None]:
    call = channel.unary_stream(
        f"/{FAKE_SERVICE}/{method}",
        request_serializer=_identity,
        response_deserializer=_identity,
    )
    received: list[bytes] = []
    try:
        async for item in call(b"ping", metadata=_md(token), timeout=5):
            received.append(item)
    except aio.AioRpcError as exc:
        return received, exc
    return received, None


async def test_wrapped_behaviour_runs_for_a_valid_token(channel: aio.Channel) -> None:
    assert await _unary(channel, "Echo") == b"echo:ping"


async def test_unexpected_exception_becomes_internal_without_its_text(
    channel: aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="keyrelay.auth.rpc"):
        result = await _unary(channel, "Boom")
    assert isinstance(result, aio.AioRpcError)
    assert result.code() == grpc.StatusCode.INTERNAL
    assert result.details() == INTERNAL_MESSAGE
    assert LEAK not in str(result.debug_error_string())
    assert all(LEAK not in str(v) for _, v in result.trailing_metadata() or ())
    # The operator still gets it, in the service log, with the method.
    records = [r for r in caplog.records if r.name == "keyrelay.auth.rpc"]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert getattr(records[0], "method", None) == f"/{FAKE_SERVICE}/Boom"


async def test_unexpected_exception_for_the_gateway_role_is_internal_too(
    channel: aio.Channel,
) -> None:
    result = await _unary(channel, "GetToken", GATEWAY_TOKEN)
    assert isinstance(result, aio.AioRpcError)
    assert (result.code(), result.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


async def test_domain_error_maps_to_its_status_with_its_message(channel: aio.Channel) -> None:
    result = await _unary(channel, "NotFoundy")
    assert isinstance(result, aio.AioRpcError)
    assert (result.code(), result.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "no account 'alice'",
    )


async def test_deliberate_abort_in_the_behaviour_passes_through(channel: aio.Channel) -> None:
    result = await _unary(channel, "Aborts")
    assert isinstance(result, aio.AioRpcError)
    assert (result.code(), result.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")


async def test_guard_runs_before_the_behaviour(channel: aio.Channel) -> None:
    # Without a token the failing behaviour is never reached: UNAUTHENTICATED, not INTERNAL.
    result = await _unary(channel, "Boom", token=None)
    assert isinstance(result, aio.AioRpcError)
    assert result.code() == grpc.StatusCode.UNAUTHENTICATED
    result = await _unary(channel, "Boom", GATEWAY_TOKEN)
    assert isinstance(result, aio.AioRpcError)
    assert result.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_stream_unexpected_exception_becomes_internal(
    channel: aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.CRITICAL, logger="keyrelay.auth.rpc"):
        received, error = await _stream(channel, "StreamBoom")
    assert received == [b"first"]
    assert error is not None
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert LEAK not in str(error.debug_error_string())


async def test_stream_domain_error_maps_to_its_status(channel: aio.Channel) -> None:
    received, error = await _stream(channel, "StreamUnavailable")
    assert received == [b"first"]
    assert error is not None
    assert (error.code(), error.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "redis is unreachable",
    )


async def test_health_check_needs_no_token(channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_check_ignores_a_bad_token(channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(
        health_pb2.HealthCheckRequest(service=""), metadata=_md("garbage-token"), timeout=5
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_unknown_method_is_unimplemented(channel: aio.Channel) -> None:
    result = await _unary(channel, "NoSuchMethod")
    assert isinstance(result, aio.AioRpcError)
    assert result.code() == grpc.StatusCode.UNIMPLEMENTED


@dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...] = ()


async def test_each_method_is_wrapped_once_and_rewrapped_when_its_handler_changes() -> None:
    interceptor = AuthInterceptor(CallerAuthenticator([Caller("admin", ADMIN_TOKEN)]))
    echo: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_echo)
    boom: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_boom)
    serving = {"/svc/Echo": echo, "/svc/Boom": boom, "/grpc.health.v1.Health/Check": echo}

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return serving.get(details.method)

    first = await interceptor.intercept_service(continuation, _Details("/svc/Echo"))
    again = await interceptor.intercept_service(continuation, _Details("/svc/Echo"))
    other = await interceptor.intercept_service(continuation, _Details("/svc/Boom"))
    assert first is again
    assert first is not echo
    assert other is not first
    assert (
        await interceptor.intercept_service(continuation, _Details("/grpc.health.v1.Health/Check"))
        is echo
    )
    assert await interceptor.intercept_service(continuation, _Details("/svc/Nope")) is None
    serving["/svc/Echo"] = boom  # a new handler object for the method: wrapped anew
    assert await interceptor.intercept_service(continuation, _Details("/svc/Echo")) is not first


# --- unary calls in flight (the event hub paces its deliveries while there are any) ------


async def test_unary_calls_in_flight_are_counted_until_they_end_however_they_end() -> None:
    interceptor = AuthInterceptor(CallerAuthenticator([Caller("admin", ADMIN_TOKEN)]))
    calls = interceptor.unary_calls
    seen: list[int] = []
    both_in = asyncio.Event()
    release = asyncio.Event()

    async def held(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        seen.append(calls.count)
        if len(seen) == 2:
            both_in.set()
        await release.wait()
        if request == b"fail":
            raise RuntimeError(LEAK)
        return request

    async def stream(
        request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        seen.append(calls.count)
        yield request

    server = aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                FAKE_SERVICE,
                {
                    "Held": grpc.unary_unary_rpc_method_handler(
                        held, request_deserializer=_identity, response_serializer=_identity
                    ),
                    "Stream": grpc.unary_stream_rpc_method_handler(
                        stream, request_deserializer=_identity, response_serializer=_identity
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                f"/{FAKE_SERVICE}/Held",
                request_serializer=_identity,
                response_deserializer=_identity,
            )
            ok = asyncio.ensure_future(call(b"ok", metadata=_md(ADMIN_TOKEN), timeout=5))
            failing = asyncio.ensure_future(call(b"fail", metadata=_md(ADMIN_TOKEN), timeout=5))
            await asyncio.wait_for(both_in.wait(), 5)
            assert sorted(seen) == [1, 2]
            assert calls
            assert calls.count == 2
            release.set()
            assert await ok == b"ok"
            with pytest.raises(aio.AioRpcError):
                await failing
            assert calls.count == 0
            assert not calls
            # A stream (WatchEvents) is not a unary call: it does not count.
            received, error = await _stream(channel, "Stream")
            assert error is None
            assert received == [b"ping"]
            assert seen[-1] == 0
    finally:
        await server.stop(0)
