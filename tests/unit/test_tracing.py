"""The tracing facade: a disabled tracer that does nothing, the SDK loaded only when enabled,
``OTEL_*`` variables, and trace ids on log lines."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from grpc import aio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import keyrelay
from keyrelay import logs
from keyrelay.configfile import ConfigError, TracingConfig
from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.server import build_app
from keyrelay.gateway.tokens import TokenClient
from keyrelay.logs import JsonFormatter
from keyrelay.otel import current_ids
from keyrelay.tracing import NO_SPAN, NOOP_TRACER, Tracer, create_tracer

ENABLED = TracingConfig(enabled=True)


@pytest.fixture(autouse=True)
def no_trace_ids_after() -> Iterator[None]:
    yield
    logs.set_trace_ids(None)


def memory(config: TracingConfig = ENABLED) -> tuple[Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = create_tracer(
        config, default_service_name="keyrelay-test", config_key="t", exporters=[exporter]
    )
    return tracer, exporter


def test_disabled_tracer_hands_out_one_shared_object() -> None:
    tracer = create_tracer(TracingConfig(), default_service_name="x", config_key="t")
    assert tracer is NOOP_TRACER
    assert not tracer.enabled
    assert tracer.span("a") is NO_SPAN
    assert tracer.client_span("b", {"k": 1}) is NO_SPAN
    assert tracer.server_span("c", [(b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16)]) is (
        NO_SPAN
    )
    assert tracer.inject() == ()
    with tracer.span("d") as span:
        span.set_attribute("k", "v")
    assert span is NO_SPAN


def test_enabling_without_the_packages_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # The import fails as if the packages were not installed.
    monkeypatch.setitem(sys.modules, "keyrelay.otel", None)
    monkeypatch.delattr(keyrelay, "otel", raising=False)
    with pytest.raises(ConfigError) as info:
        create_tracer(ENABLED, default_service_name="x", config_key="gateway.tracing")
    assert str(info.value).startswith("gateway.tracing.enabled: tracing needs the OpenTelemetry")
    assert "keyrelay[tracing]" in str(info.value)


def test_disabled_services_never_load_the_tracing_sdk() -> None:
    # redis-py imports the OpenTelemetry API (and metrics SDK) by itself when they are
    # installed; keyrelay's tracing code and the SDK's tracer and exporters stay unloaded.
    script = textwrap.dedent(
        """
        import sys
        from keyrelay.gateway.config import parse_gateway_config
        from keyrelay.gateway.server import build_app
        import keyrelay.auth.rpc.server
        config = parse_gateway_config(
            {"gateway": {"auth": {"target": "ipv4:127.0.0.1:9", "token": {"env": "T"}}},
             "upstreams": {"default": {"url": "http://127.0.0.1:9"}}},
            {"T": "gateway-token-0123456789"},
        )
        build_app(config)
        ours = ("keyrelay.otel", "opentelemetry.sdk.trace", "opentelemetry.exporter")
        print(",".join(sorted(m for m in sys.modules if m.startswith(ours))))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


async def test_hot_paths_keep_their_plain_functions_when_disabled() -> None:
    config = parse_gateway_config(
        {
            "gateway": {"auth": {"target": "ipv4:127.0.0.1:9", "token": {"env": "T"}}},
            "upstreams": {"default": {"url": "http://127.0.0.1:9"}},
        },
        {"T": "gateway-token-0123456789"},
    )
    app = build_app(config)
    assert app.tracer is NOOP_TRACER
    assert app._proxy_entry == app._proxy
    assert app._post == app.upstreams.post
    async with aio.insecure_channel("127.0.0.1:9") as channel:
        client = TokenClient(channel, "gateway-token-0123456789")
        assert client._get_token is client._stub.GetToken


def test_service_name_from_config_env_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def service_name(config: TracingConfig) -> object:
        tracer, exporter = memory(config)
        with tracer.span("x"):
            pass
        (span,) = exporter.get_finished_spans()
        return span.resource.attributes["service.name"]

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert service_name(ENABLED) == "keyrelay-test"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert service_name(ENABLED) == "from-env"
    assert service_name(TracingConfig(enabled=True, service_name="configured")) == "configured"


def test_sample_ratio_zero_records_nothing_and_sampler_env_applies_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracer, exporter = memory(TracingConfig(enabled=True, sample_ratio=0.0))
    with tracer.span("dropped"):
        pass
    assert exporter.get_finished_spans() == ()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracer, exporter = memory()
    with tracer.span("dropped"):
        pass
    assert exporter.get_finished_spans() == ()


def test_an_exception_marks_the_span_without_recording_its_text() -> None:
    tracer, exporter = memory()
    with pytest.raises(KeyError), tracer.client_span("call"):
        raise KeyError("secret-looking text")
    (span,) = exporter.get_finished_spans()
    assert (span.attributes or {})["error.type"] == "KeyError"
    assert not span.status.is_ok
    assert span.status.description == "KeyError"
    assert span.events == ()


def test_server_span_continues_a_traceparent_and_inject_sends_the_current_one() -> None:
    tracer, exporter = memory()
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    carrier = [(b"TraceParent", f"00-{trace_id}-{parent}-01".encode())]
    with tracer.server_span("rpc", carrier):
        (header,) = tracer.inject()
        ids = current_ids()
    assert ids is not None
    assert ids[0] == trace_id
    assert header == ("traceparent", f"00-{trace_id}-{ids[1]}-01")
    (finished,) = exporter.get_finished_spans()
    assert finished.parent is not None
    assert finished.parent.span_id == int(parent, 16)


def test_log_lines_carry_the_trace_and_span_id_while_a_span_is_current() -> None:
    tracer, exporter = memory()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("keyrelay.test.tracing")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with tracer.span("work"):
            log.info("inside")
        log.info("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    (span,) = exporter.get_finished_spans()
    assert span.context is not None
    assert inside["trace_id"] == f"{span.context.trace_id:032x}"
    assert inside["span_id"] == f"{span.context.span_id:016x}"
    assert "trace_id" not in outside
    assert "span_id" not in outside


def test_without_tracing_log_lines_have_no_trace_fields() -> None:
    logs.set_trace_ids(None)
    record = logging.getLogger("keyrelay.test").makeRecord(
        "keyrelay.test", logging.INFO, __file__, 1, "plain", (), None
    )
    assert set(json.loads(JsonFormatter().format(record))) == {"ts", "level", "logger", "msg"}
