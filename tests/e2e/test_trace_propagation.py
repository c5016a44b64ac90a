"""OpenTelemetry: one trace from a gateway request through GetToken into the auth service.

Real parts: the auth service on the session's Redis and OAuth server, a
gateway worker, the fake upstream; each service with its own SDK tracer
provider exporting to an ``InMemorySpanExporter``. The trace context crosses
between them only in the GetToken call's gRPC metadata.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from grpc import aio
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from keyrelay.auth.rpc.server import RunningServer, start_server
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.configfile import TracingConfig
from keyrelay.logs import JsonFormatter
from keyrelay.tracing import NOOP_TRACER, Tracer, create_tracer
from tests.conftest import AuthFactory
from tests.integration.test_auth_flow import connect
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import (
    PLAIN_KEY,
    RunningGateway,
    gateway_config,
    start_gateway,
)
from tests.support.stack import ADMIN_TOKEN, GATEWAY_TOKEN, auth_config, gateway_md

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
GET_TOKEN = "keyrelay.auth.v1.AuthService/GetToken"


def memory_tracer(service: str) -> tuple[Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = create_tracer(
        TracingConfig(enabled=True),
        default_service_name=service,
        config_key="test.tracing",
        exporters=[exporter],
    )
    return tracer, exporter


@dataclass
class TracedStack:
    auth: RunningServer
    gateway: RunningGateway
    upstream: FakeUpstream
    auth_spans: InMemorySpanExporter | None
    gateway_spans: InMemorySpanExporter | None

    async def post(self, *, stream: bool = False, **headers: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=20) as http:
            response = await http.post(
                "/v1/messages",
                json={**SIMPLE, "stream": stream},
                headers={"x-api-key": PLAIN_KEY, **headers},
            )
        assert response.status_code == 200, response.text
        return response

    def all_spans(self) -> list[ReadableSpan]:
        return [
            span
            for exporter in (self.auth_spans, self.gateway_spans)
            if exporter is not None
            for span in exporter.get_finished_spans()
        ]


async def start_stack(
    factory: AuthFactory, upstream: FakeUpstream, *, traced: bool, **gateway_options: Any
) -> TracedStack:
    auth_tracer, auth_spans = memory_tracer("keyrelay-auth") if traced else (None, None)
    gw_tracer, gateway_spans = memory_tracer("keyrelay-gateway") if traced else (None, None)
    config = auth_config(
        factory.redis_url, factory.oidc, prefix=factory.prefix, refresh_backoff_base_seconds=0.05
    )
    auth = await start_server(config, tracer=auth_tracer)
    factory.running.append(auth)  # stopped at teardown
    _, stub = await factory.start()  # an untraced admin replica to connect the account
    await connect(stub, "acct", login="trace-user")
    gateway = await start_gateway(
        gateway_config(upstream.url, auth.port, **gateway_options), tracer=gw_tracer
    )
    return TracedStack(auth, gateway, upstream, auth_spans, gateway_spans)


@pytest.fixture
async def traced(make_auth: AuthFactory, upstream: FakeUpstream) -> AsyncIterator[TracedStack]:
    stack = await start_stack(make_auth, upstream, traced=True)
    yield stack
    await stack.gateway.stop()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts every SDK span started and every traceparent injected or extracted."""
    counts = {"spans": 0, "inject": 0, "extract": 0}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        sdk_trace.Tracer, "start_span", counting("spans", sdk_trace.Tracer.start_span)
    )
    for name in ("inject", "extract"):
        original = getattr(TraceContextTextMapPropagator, name)
        monkeypatch.setattr(TraceContextTextMapPropagator, name, counting(name, original))
    return counts


async def until(condition: Callable[[], bool]) -> None:
    """Spans end just after the last byte went out: wait (bounded) until they are exported."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def trace_of(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


async def secrets_of(stack: TracedStack) -> list[str]:
    """Every credential that took part: keys, service tokens, both OAuth tokens."""
    record = await stack.auth.store.get_account("acct")
    assert record is not None
    tokens = stack.auth.store.decrypt_tokens(record)
    sent = {r.header("authorization") or "" for r in stack.upstream.requests}
    access = [a.removeprefix("Bearer ") for a in sent if a]
    assert tokens.refresh_token
    return [PLAIN_KEY, GATEWAY_TOKEN, ADMIN_TOKEN, tokens.refresh_token, *access]


def assert_no_secret_in(spans: list[ReadableSpan], secrets: list[str]) -> None:
    for span in spans:
        values = [span.name, *map(str, (span.attributes or {}).values())]
        for event in span.events:
            values += [event.name, *map(str, (event.attributes or {}).values())]
        for secret in secrets:
            assert all(secret not in value for value in values), (span.name, secret)


@pytest.mark.parametrize("stream", [False, True])
async def test_gateway_request_and_auth_rpc_share_one_trace(
    traced: TracedStack, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyrelay.gateway.access")
    access = logging.getLogger("keyrelay.gateway.access")
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    access.addHandler(handler)
    assert traced.gateway_spans is not None
    assert traced.auth_spans is not None
    gateway_spans = traced.gateway_spans
    try:
        response = await traced.post(stream=stream)
        # The span ends (and the log line is written) just after the last byte went out.
        await until(lambda: bool(named(gateway_spans.get_finished_spans(), "POST /v1/messages")))
    finally:
        access.removeHandler(handler)
    spans = gateway_spans.get_finished_spans()
    (request,) = named(list(spans), "POST /v1/messages")
    (get_token,) = named(list(spans), GET_TOKEN)
    (upstream_call,) = named(list(spans), "upstream POST /v1/messages")
    (served,) = named(list(traced.auth_spans.get_finished_spans()), GET_TOKEN)

    assert request.kind is SpanKind.SERVER
    assert request.parent is None  # the client sent no traceparent
    attributes = dict(request.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["keyrelay.route"] == "plain"
    assert attributes["keyrelay.account"] == "acct"
    assert attributes["keyrelay.stream"] is stream
    assert attributes["keyrelay.upstream_status"] == 200
    assert attributes["keyrelay.billing"] == "included"
    assert attributes["keyrelay.request_id"] == response.headers["x-keyrelay-request-id"]

    trace_id = trace_of(request)
    assert get_token.kind is SpanKind.CLIENT
    assert upstream_call.kind is SpanKind.CLIENT
    assert parent_id(get_token) == span_id(request)
    assert parent_id(upstream_call) == span_id(request)
    assert (upstream_call.attributes or {})["http.response.status_code"] == 200
    # Propagation: the auth service's server span continues the gateway's GetToken span.
    assert served.kind is SpanKind.SERVER
    assert trace_of(get_token) == trace_of(served) == trace_id
    assert parent_id(served) == span_id(get_token)
    assert served.parent is not None
    assert served.parent.is_remote
    assert (served.attributes or {})["rpc.grpc.status_code"] == 0
    assert (served.resource.attributes or {})["service.name"] == "keyrelay-auth"
    assert (request.resource.attributes or {})["service.name"] == "keyrelay-gateway"

    # The gateway's context is not sent upstream unless propagate_upstream is set.
    assert traced.upstream.last().header("traceparent") is None
    # The access-log line names the request's trace.
    (line,) = [json.loads(raw) for raw in lines.getvalue().splitlines()]
    assert line["trace_id"] == format(trace_id, "032x")
    assert line["span_id"] == format(span_id(request), "016x")
    assert_no_secret_in(traced.all_spans(), await secrets_of(traced))


async def test_refresh_after_an_upstream_401_is_traced_to_the_token_endpoint(
    traced: TracedStack, spy: dict[str, int]
) -> None:
    await traced.post()  # warm: the token is cached
    first = traced.upstream.last().header("authorization") or ""
    traced.upstream.refused_tokens.add(first.removeprefix("Bearer "))
    assert traced.gateway_spans is not None
    assert traced.auth_spans is not None
    traced.gateway_spans.clear()
    traced.auth_spans.clear()

    response = await traced.post()
    gateway_spans = traced.gateway_spans
    await until(lambda: bool(named(gateway_spans.get_finished_spans(), "POST /v1/messages")))
    gateway = list(gateway_spans.get_finished_spans())
    auth = list(traced.auth_spans.get_finished_spans())
    (request,) = named(gateway, "POST /v1/messages")
    trace_id = trace_of(request)
    assert (request.attributes or {})["keyrelay.retried_after_401"] is True
    refused, retried = sorted(
        named(gateway, "upstream POST /v1/messages"), key=lambda s: s.start_time or 0
    )
    assert (refused.attributes or {})["http.response.status_code"] == 401
    assert (retried.attributes or {})["http.response.status_code"] == 200
    (get_token,) = named(gateway, GET_TOKEN)  # GetToken(stale_generation=…)
    stale = (get_token.attributes or {})["keyrelay.stale_generation"]
    assert isinstance(stale, int)
    assert stale > 0
    (served,) = named(auth, GET_TOKEN)
    (refresh,) = named(auth, "keyrelay.refresh")
    (endpoint,) = named(auth, "keyrelay.token_endpoint.refresh")
    assert {trace_of(s) for s in (get_token, served, refresh, endpoint)} == {trace_id}
    assert parent_id(served) == span_id(get_token)
    assert parent_id(refresh) == span_id(served)
    assert parent_id(endpoint) == span_id(refresh)
    assert endpoint.kind is SpanKind.CLIENT
    assert (endpoint.attributes or {})["keyrelay.provider"] == "testidp"
    refresh_attributes = dict(refresh.attributes or {})
    assert refresh_attributes["keyrelay.lock"] == "acquired"
    assert refresh_attributes["keyrelay.refresh.outcome"] == "refreshed"
    assert refresh_attributes["keyrelay.account"] == "acct"
    assert response.status_code == 200
    assert spy["spans"] >= 7
    assert spy["inject"] >= 1
    assert spy["extract"] >= 2
    assert_no_secret_in(gateway + auth, await secrets_of(traced))


async def test_auth_service_continues_a_callers_traceparent(traced: TracedStack) -> None:
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    metadata = (*gateway_md(), ("traceparent", f"00-{trace_id}-{parent}-01"))
    async with aio.insecure_channel(f"127.0.0.1:{traced.auth.port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(aio.AioRpcError):
            await stub.GetToken(auth_pb2.GetTokenRequest(account_id="nobody"), metadata=metadata)
    auth_spans = traced.auth_spans
    assert auth_spans is not None
    await until(lambda: bool(named(list(auth_spans.get_finished_spans()), GET_TOKEN)))
    (served,) = named(list(auth_spans.get_finished_spans()), GET_TOKEN)
    assert format(trace_of(served), "032x") == trace_id
    assert parent_id(served) == int(parent, 16)
    attributes = dict(served.attributes or {})
    assert attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND: the caller's problem,
    assert served.status.is_unset  # not a server fault


async def test_disabled_tracing_makes_no_spans_and_sends_no_traceparent(
    make_auth: AuthFactory, upstream: FakeUpstream, spy: dict[str, int]
) -> None:
    stack = await start_stack(make_auth, upstream, traced=False)
    try:
        assert stack.auth.tracer is NOOP_TRACER
        assert stack.gateway.app.tracer is NOOP_TRACER
        await stack.post()
        first = stack.upstream.last().header("authorization") or ""
        stack.upstream.refused_tokens.add(first.removeprefix("Bearer "))
        await stack.post()  # 401, GetToken(stale), a refresh at the provider, the retry
        await stack.post(stream=True)
    finally:
        await stack.gateway.stop()
    assert len(stack.upstream.requests) == 4
    assert all(r.header("traceparent") is None for r in stack.upstream.requests)
    assert spy == {"spans": 0, "inject": 0, "extract": 0}


async def test_propagate_upstream_continues_the_clients_trace_to_the_upstream(
    make_auth: AuthFactory, upstream: FakeUpstream
) -> None:
    stack = await start_stack(
        make_auth,
        upstream,
        traced=True,
        tracing={"enabled": True, "propagate_upstream": True},
    )
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        await stack.post(traceparent=f"00-{client_trace}-{client_span}-01")
        gateway_spans = stack.gateway_spans
        assert gateway_spans is not None
        await until(lambda: bool(named(gateway_spans.get_finished_spans(), "POST /v1/messages")))
    finally:
        await stack.gateway.stop()
    spans = list(gateway_spans.get_finished_spans())
    (request,) = named(spans, "POST /v1/messages")
    (upstream_call,) = named(spans, "upstream POST /v1/messages")
    assert format(trace_of(request), "032x") == client_trace
    assert parent_id(request) == int(client_span, 16)
    # One traceparent upstream: the gateway's upstream span replaced the client's.
    sent = [v for k, v in stack.upstream.last().headers if k.lower() == "traceparent"]
    assert sent == [f"00-{client_trace}-{format(span_id(upstream_call), '016x')}-01"]
