"""The OpenTelemetry side of ``keyrelay.tracing``: imported only when tracing is enabled.

Each service gets its own ``TracerProvider`` (the global one is left alone, so
a library's spans never mix in and tests can run several services in one
process). The SDK's environment variables keep working: ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES`` (when ``service_name`` is not configured),
``OTEL_TRACES_SAMPLER``/``_ARG`` (when ``sample_ratio`` is not),
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``/``HEADERS``/``TIMEOUT``/``COMPRESSION``/
``CERTIFICATE`` (when ``endpoint`` is not), ``OTEL_BSP_*`` and ``OTEL_SDK_DISABLED``.

Exceptions are never recorded as span events: their text could carry anything.
A failed span gets status ``ERROR`` and ``error.type`` (the exception's class).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from keyrelay import logs
from keyrelay.configfile import TracingConfig
from keyrelay.tracing import TRACE_HEADERS, Attributes, Carrier, Span, Tracer

_PROPAGATOR = TraceContextTextMapPropagator()


def _exporter(name: str, endpoint: str | None) -> Any:
    if name == "console":
        return ConsoleSpanExporter()
    # OTLP over HTTP/protobuf (a collector's port 4318).
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    return OTLPSpanExporter(endpoint=endpoint)


def _carrier_dict(carrier: Carrier) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in carrier:
        name = key.decode("latin-1") if isinstance(key, bytes) else key
        name = name.lower()
        if name in TRACE_HEADERS:
            found[name] = value.decode("latin-1") if isinstance(value, bytes) else value
    return found


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span id in W3C hex, for log lines."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class OtelTracer(Tracer):
    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("keyrelay")

    @classmethod
    def create(
        cls,
        config: TracingConfig,
        default_service_name: str,
        *,
        exporters: Sequence[Any] | None = None,
    ) -> OtelTracer:
        attributes: dict[str, str] = {}
        if config.service_name is not None:
            attributes[SERVICE_NAME] = config.service_name
        elif not os.environ.get("OTEL_SERVICE_NAME"):
            attributes[SERVICE_NAME] = default_service_name
        sampler = None  # the SDK's: OTEL_TRACES_SAMPLER, default parentbased_always_on
        if config.sample_ratio is not None:
            sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
        provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        if exporters is not None:
            for exporter in exporters:
                provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            for name in config.exporters:
                provider.add_span_processor(BatchSpanProcessor(_exporter(name, config.endpoint)))
        logs.set_trace_ids(current_ids)
        return cls(provider)

    @contextmanager
    def _start(
        self,
        name: str,
        kind: SpanKind,
        attributes: Attributes | None,
        context: Context | None = None,
        *,
        mark_errors: bool = True,
    ) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except Exception as exc:
                if mark_errors:
                    self.fail(span, type(exc).__name__)
                raise

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[Span]:
        return self._start(name, SpanKind.INTERNAL, attributes)

    def client_span(
        self, name: str, attributes: Attributes | None = None
    ) -> AbstractContextManager[Span]:
        return self._start(name, SpanKind.CLIENT, attributes)

    def server_span(
        self, name: str, carrier: Carrier, attributes: Attributes | None = None
    ) -> AbstractContextManager[Span]:
        # A server span's status comes from the answer it gave, not from how the
        # handler ended (an aborted gRPC call raises, yet NOT_FOUND is no fault).
        context = _PROPAGATOR.extract(_carrier_dict(carrier))
        return self._start(name, SpanKind.SERVER, attributes, context, mark_errors=False)

    def inject(self) -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return tuple(carrier.items())

    def annotate(self, attributes: Attributes, *, error: str | None = None) -> None:
        span = trace.get_current_span()
        span.set_attributes(attributes)
        if error is not None:
            self.fail(span, error)

    def fail(self, span: Span, reason: str) -> None:
        span.set_attribute("error.type", reason)
        if isinstance(span, trace.Span):
            span.set_status(Status(StatusCode.ERROR, reason))

    def shutdown(self) -> None:
        self.provider.shutdown()
