"""Optional OpenTelemetry tracing behind a small facade whose disabled form costs nothing.

``create_tracer`` runs once at startup. With tracing off (the default) it
returns ``NOOP_TRACER``: OpenTelemetry is not even imported, every method
returns a shared object, and the hot paths (``GatewayApp``, ``TokenClient``,
the auth interceptor) pick their untraced functions once, at construction,
so a request does no tracing or propagation work at all. With tracing on,
``keyrelay.otel`` (the only module importing the SDK) provides the real one.

Span attributes name routes, accounts, providers, statuses and request ids —
never a token, code or key (the same rule as the logs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

from keyrelay.configfile import ConfigError, TracingConfig

AttributeValue = str | bool | int | float
Attributes = Mapping[str, AttributeValue]
# ASGI headers (bytes) or gRPC invocation metadata (str, or bytes for -bin keys).
Carrier = Iterable[tuple[str | bytes, str | bytes]]
TRACE_HEADERS: Final = frozenset({"traceparent", "tracestate"})


class Span(Protocol):
    def set_attribute(self, key: str, value: AttributeValue) -> None: ...


class _NoSpan:
    """The span and context manager of the disabled tracer: one shared, stateless object."""

    __slots__ = ()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


NO_SPAN: Final = _NoSpan()


class Tracer:
    """The disabled tracer. ``keyrelay.otel.OtelTracer`` overrides every method."""

    enabled: bool = False

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[Span]:
        """An internal child span of the current one, current while the block runs."""
        return NO_SPAN

    def client_span(
        self, name: str, attributes: Attributes | None = None
    ) -> AbstractContextManager[Span]:
        """A ``CLIENT`` span for an outgoing call (an exception escaping it marks an error)."""
        return NO_SPAN

    def server_span(
        self, name: str, carrier: Carrier, attributes: Attributes | None = None
    ) -> AbstractContextManager[Span]:
        """A ``SERVER`` span continuing the W3C trace context found in ``carrier``."""
        return NO_SPAN

    def inject(self) -> tuple[tuple[str, str], ...]:
        """``traceparent`` (and ``tracestate``) of the current span, as header pairs."""
        return ()

    def annotate(self, attributes: Attributes, *, error: str | None = None) -> None:
        """Sets attributes on the current span; ``error`` (a short code) marks it failed."""

    def fail(self, span: Span, reason: str) -> None:
        """Marks ``span`` as failed; ``reason`` is a short code, never free text."""

    def shutdown(self) -> None:
        """Flushes and stops the exporters."""


NOOP_TRACER: Final = Tracer()


def create_tracer(
    config: TracingConfig,
    *,
    default_service_name: str,
    config_key: str,
    exporters: Sequence[Any] | None = None,
) -> Tracer:
    """The tracer a service runs with, chosen once at startup.

    ``exporters`` (OpenTelemetry ``SpanExporter`` objects) replace the configured
    ones and export synchronously: tests pass an ``InMemorySpanExporter``.
    """
    if not config.enabled:
        return NOOP_TRACER
    try:
        # Only now: the OpenTelemetry packages are an optional extra.
        from keyrelay import otel  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"{config_key}.enabled: tracing needs the OpenTelemetry packages "
            f"(pip install 'keyrelay[tracing]'); cannot import {exc.name}"
        ) from None
    return otel.OtelTracer.create(config, default_service_name, exporters=exporters)
