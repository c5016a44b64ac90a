"""The gateway's spans, used only when tracing is enabled (``GatewayApp`` and
``TokenClient`` pick these wrappers once, at construction, or their plain
functions when it is off).

- one ``SERVER`` span per proxied request, continuing the client's W3C trace
  context if it sent one; attributes from the request's ``Outcome`` (route,
  account, status, stream, upstream status, billing, model, request id);
- a ``CLIENT`` span around each ``GetToken``, whose ``traceparent`` goes into
  the call's gRPC metadata, so the auth service's spans join the trace;
- a ``CLIENT`` span around each upstream call, up to the response headers.

The gateway's own trace context is sent upstream only with
``propagate_upstream = true``: the upstream is usually a third party. Headers
the client sent (its own ``traceparent`` too) pass through as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from grpc import aio

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.config import UpstreamConfig
from keyrelay.tracing import TRACE_HEADERS, Tracer

if TYPE_CHECKING:
    from keyrelay.gateway.http.app import Outcome
    from keyrelay.gateway.http.upstream import UpstreamResponse

GetToken = Callable[..., Awaitable[auth_pb2.GetTokenResponse]]
Proxy = Callable[[MutableMapping[str, Any], Any, Any, str], Awaitable[None]]
Post = Callable[
    [UpstreamConfig, str, Sequence[tuple[str, str]], Sequence[tuple[str, str]], bytes],
    Awaitable["UpstreamResponse"],
]


def traced_get_token(tracer: Tracer, call: GetToken) -> GetToken:
    async def traced(
        request: auth_pb2.GetTokenRequest,
        *,
        metadata: tuple[tuple[str, str | bytes], ...],
        timeout: float,  # noqa: ASYNC109  # the stub's own parameter, passed through
    ) -> auth_pb2.GetTokenResponse:
        with tracer.client_span(
            "keyrelay.auth.v1.AuthService/GetToken",
            {
                "rpc.system": "grpc",
                "rpc.service": "keyrelay.auth.v1.AuthService",
                "rpc.method": "GetToken",
                "keyrelay.account": request.account_id,
                "keyrelay.stale_generation": request.stale_generation,
            },
        ) as span:
            try:
                reply = await call(request, metadata=metadata + tracer.inject(), timeout=timeout)
            except aio.AioRpcError as exc:
                span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
                raise
            span.set_attribute("rpc.grpc.status_code", 0)
            span.set_attribute("keyrelay.generation", reply.generation)
            return reply

    return traced


def traced_proxy(tracer: Tracer, proxy: Proxy) -> Proxy:
    async def traced(scope: MutableMapping[str, Any], receive: Any, send: Any, path: str) -> None:
        with tracer.server_span(
            f"POST {path}",
            scope["headers"],
            {"http.request.method": "POST", "http.route": path, "url.path": path},
        ):
            await proxy(scope, receive, send, path)

    return traced


def traced_post(tracer: Tracer, post: Post, *, propagate: bool) -> Post:
    async def traced(
        upstream: UpstreamConfig,
        path: str,
        headers: Sequence[tuple[str, str]],
        query: Sequence[tuple[str, str]],
        body: bytes,
    ) -> UpstreamResponse:
        with tracer.client_span(
            f"upstream POST {path}",
            {
                "http.request.method": "POST",
                "url.path": path,
                "server.address": urlsplit(upstream.url).hostname or "",
                "keyrelay.upstream": upstream.name,
            },
        ) as span:
            if propagate:  # ours replaces a traceparent the client sent
                own = [h for h in headers if h[0].lower() not in TRACE_HEADERS]
                headers = [*own, *tracer.inject()]
            response = await post(upstream, path, headers, query, body)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                tracer.fail(span, str(response.status))
            return response

    return traced


def record_outcome(tracer: Tracer, outcome: Outcome, request_id: str) -> None:
    """Called from ``GatewayApp._record``, while the request's span is current."""
    route = outcome.route
    attributes: dict[str, str | int | bool] = {
        "http.response.status_code": outcome.status,
        "keyrelay.request_id": request_id,
        "keyrelay.route": route.name if route else "-",
        "keyrelay.stream": outcome.stream,
        "keyrelay.retried_after_401": outcome.retried,
    }
    if route is not None and route.account:
        attributes["keyrelay.account"] = route.account
    if outcome.billing is not None:
        attributes["keyrelay.billing"] = outcome.billing.value
    if outcome.upstream_status:
        attributes["keyrelay.upstream_status"] = outcome.upstream_status
    if outcome.model:
        attributes["keyrelay.model"] = outcome.model
    tracer.annotate(attributes, error=str(outcome.status) if outcome.status >= 500 else None)
