"""``[auth.tracing]`` and ``[gateway.tracing]``: defaults, every key, malformed values."""

from __future__ import annotations

from typing import Any

import pytest

from keyrelay.configfile import ConfigError, TracingConfig
from keyrelay.gateway.config import GatewayConfig, parse_gateway_config
from tests.unit.test_config import assert_error, error_of, minimal, parse

GATEWAY_ENV = {"GW_TOKEN": "gateway-token-0123456789"}


def auth_with(**tracing: Any) -> dict[str, Any]:
    data = minimal()
    data["auth"]["tracing"] = tracing
    return data


def gateway_with(**tracing: Any) -> dict[str, Any]:
    return {
        "gateway": {
            "auth": {"target": "ipv4:127.0.0.1:50051", "token": {"env": "GW_TOKEN"}},
            "tracing": tracing,
        },
        "upstreams": {"default": {"url": "http://127.0.0.1:9"}},
    }


def parse_gateway(data: dict[str, Any]) -> GatewayConfig:
    return parse_gateway_config(data, GATEWAY_ENV)


def gateway_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_gateway(data)
    return str(info.value)


def test_tracing_is_off_by_default_in_both_services() -> None:
    default = TracingConfig()
    assert not default.enabled
    assert default.exporters == ("otlp",)
    assert default.endpoint is None
    assert default.service_name is None
    assert default.sample_ratio is None  # the SDK's OTEL_TRACES_SAMPLER then
    assert not default.propagate_upstream
    assert parse(minimal()).tracing == default
    no_tracing = gateway_with()
    del no_tracing["gateway"]["tracing"]
    assert parse_gateway(no_tracing).tracing == default
    assert parse(auth_with()).tracing == default  # an empty table too


def test_every_auth_tracing_key() -> None:
    tracing = parse(
        auth_with(
            enabled=True,
            exporter="console",
            endpoint="http://collector.internal:4318/v1/traces",
            service_name="auth-eu",
            sample_ratio=0.25,
        )
    ).tracing
    assert tracing == TracingConfig(
        enabled=True,
        exporters=("console",),
        endpoint="http://collector.internal:4318/v1/traces",
        service_name="auth-eu",
        sample_ratio=0.25,
    )


def test_every_gateway_tracing_key() -> None:
    tracing = parse_gateway(
        gateway_with(
            enabled=True,
            exporter=["otlp", "console", "otlp"],
            endpoint="https://collector.internal/v1/traces",
            service_name="gw",
            sample_ratio=1,
            propagate_upstream=True,
        )
    ).tracing
    assert tracing.enabled
    assert tracing.exporters == ("otlp", "console")  # de-duplicated, in order
    assert tracing.endpoint == "https://collector.internal/v1/traces"
    assert tracing.sample_ratio == 1.0
    assert isinstance(tracing.sample_ratio, float)
    assert tracing.propagate_upstream


@pytest.mark.parametrize("ratio", [0, 0.0, 0.5, 1])
def test_sample_ratio_bounds_are_inclusive(ratio: float) -> None:
    assert parse(auth_with(sample_ratio=ratio)).tracing.sample_ratio == float(ratio)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("enabled", "yes", "must be true or false, got 'yes'"),
        ("enabled", 1, "must be true or false, got 1"),
        ("exporter", "jaeger", 'must be "otlp", "console" or a list of them'),
        ("exporter", [], 'must be "otlp", "console" or a list of them'),
        ("exporter", ["otlp", 3], 'must be "otlp", "console" or a list of them'),
        ("exporter", {"otlp": True}, 'must be "otlp", "console" or a list of them'),
        ("endpoint", "collector:4318", "must be an http(s) URL"),
        ("endpoint", "grpc://collector:4317", "must be an http(s) URL"),
        ("endpoint", "", "must be a non-empty string"),
        ("service_name", "", "must be a non-empty string"),
        ("service_name", 7, "must be a non-empty string"),
        ("sample_ratio", 1.5, "must be a number from 0 to 1, got 1.5"),
        ("sample_ratio", -0.1, "must be a number >= 0"),
        ("sample_ratio", "half", "must be a number >= 0"),
        ("sample_ratio", True, "must be a number >= 0"),
        ("sample_ratio", float("nan"), "must be a number >= 0"),
    ],
)
def test_malformed_tracing_values_name_the_key(key: str, value: Any, problem: str) -> None:
    assert_error(error_of(auth_with(**{key: value})), f"auth.tracing.{key}", problem)
    assert_error(gateway_error(gateway_with(**{key: value})), f"gateway.tracing.{key}", problem)


def test_malformed_values_are_errors_while_tracing_is_off() -> None:
    message = error_of(auth_with(enabled=False, exporter="zipkin"))
    assert_error(message, "auth.tracing.exporter", "must be")


def test_unknown_tracing_keys_are_rejected() -> None:
    assert_error(error_of(auth_with(enable=True)), "auth.tracing.enable", "unknown key")
    assert_error(
        gateway_error(gateway_with(sampling=0.5)), "gateway.tracing.sampling", "unknown key"
    )


def test_propagate_upstream_is_a_gateway_key_only() -> None:
    message = error_of(auth_with(propagate_upstream=True))
    assert_error(message, "auth.tracing.propagate_upstream", "unknown key")
    assert_error(
        gateway_error(gateway_with(propagate_upstream="no")),
        "gateway.tracing.propagate_upstream",
        "must be true or false",
    )


def test_tracing_must_be_a_table() -> None:
    data = minimal()
    data["auth"]["tracing"] = True
    assert_error(error_of(data), "auth.tracing", "must be a table")
    gateway = gateway_with()
    gateway["gateway"]["tracing"] = "on"
    assert_error(gateway_error(gateway), "gateway.tracing", "must be a table")
