"""The front door's pure parts: its config keys, the descriptor budget, the
drain-or-close rule, the answers written as bytes, and its metrics."""

from __future__ import annotations

import json
from typing import Any

import h11
import pytest
from prometheus_client import generate_latest

from keyrelay.configfile import ConfigError
from keyrelay.gateway.config import FrontDoorConfig, parse_gateway_config
from keyrelay.gateway.core.limits import (
    FD_RESERVE,
    REFUSING_MAX,
    DescriptorBudgetError,
    declared_length,
    descriptors_needed,
    drain_rest,
    error_response,
    nofile_soft_limit,
)
from keyrelay.gateway.http.front_door import FrontDoor
from keyrelay.gateway.http.metrics import CLOSE_REASONS, REJECT_REASONS, GatewayMetrics

ENV = {"UPSTREAM_KEY": "sk-upstream-0123456789"}


def config_data(**gateway: Any) -> dict[str, Any]:
    return {
        "gateway": gateway,
        "upstreams": {"default": {"url": "http://127.0.0.1:9"}},
        "keys": [
            {"hash": "sha256:" + "ab" * 32, "mode": "api_key", "api_key": {"env": "UPSTREAM_KEY"}}
        ],
    }


def test_defaults() -> None:
    limits = parse_gateway_config(config_data(), ENV).front_door
    assert limits == FrontDoorConfig()
    assert (limits.max_connections, limits.listen_backlog) == (1000, 1024)
    assert (limits.max_header_bytes, limits.max_header_count) == (32768, 100)
    assert (limits.header_timeout_seconds, limits.first_byte_timeout_seconds) == (10.0, 10.0)
    assert limits.body_timeout_seconds == 60.0


def test_every_key_is_read() -> None:
    values: dict[str, Any] = {
        "max_connections": 7,
        "listen_backlog": 9,
        "max_header_bytes": 4096,
        "max_header_count": 12,
        "header_timeout_seconds": 1.5,
        "body_timeout_seconds": 0.5,
        "first_byte_timeout_seconds": 2.5,
    }
    limits = parse_gateway_config(config_data(**values), ENV).front_door
    assert limits == FrontDoorConfig(**values)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_connections", 0),
        ("listen_backlog", 0),
        ("max_header_bytes", 1023),
        ("max_header_count", 7),
        ("header_timeout_seconds", 0.0),
        ("first_byte_timeout_seconds", -1),
        ("max_connections", "many"),
        ("body_timeout_seconds", 0),
        ("body_timeout_seconds", -5.0),
        ("body_timeout_seconds", "60s"),
        ("body_timeout_seconds", True),
    ],
)
def test_out_of_range_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^gateway\.{key}: must be"):
        parse_gateway_config(config_data(**{key: value}), ENV)


def test_descriptors_needed() -> None:
    assert descriptors_needed(1000, 256) == 1000 + REFUSING_MAX + 256 + FD_RESERVE


@pytest.mark.parametrize(
    ("soft", "hard", "needed", "expected"),
    [
        (4096, 4096, 1384, 4096),  # enough: unchanged
        (1024, 524288, 1384, 1384),  # raised to what is needed, not to the hard limit
        (1024, -1, 1384, 1384),  # hard unlimited
        (-1, -1, 1384, -1),  # soft unlimited
        (1384, 1384, 1384, 1384),
    ],
)
def test_nofile_soft_limit(soft: int, hard: int, needed: int, expected: int) -> None:
    assert nofile_soft_limit(soft, hard, needed) == expected


def test_a_hard_limit_below_the_budget_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(DescriptorBudgetError, match=r"need 1384 file descriptors.*may open 1024"):
        nofile_soft_limit(1024, 1024, 1384)


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([(b"content-length", b"42")], 42),
        ([(b"host", b"x"), (b"content-length", b"0")], 0),
        ([(b"transfer-encoding", b"chunked")], None),
        ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], None),
        ([(b"content-length", b"-1")], None),
        ([(b"content-length", b"1e9")], None),
        ([(b"host", b"x")], None),
    ],
)
def test_declared_length(headers: list[tuple[bytes, bytes]], length: int | None) -> None:
    assert declared_length(headers) == length


def test_drain_rest_only_a_declared_body_of_at_most_twice_the_limit() -> None:
    assert drain_rest(2000, 1000)
    assert drain_rest(0, 1000)
    assert not drain_rest(2001, 1000)
    assert not drain_rest(None, 1000)  # chunked: how long is unknown


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, b"Bad Request"), (408, b"Request Timeout"),
     (431, b"Request Header Fields Too Large"), (503, b"Service Unavailable")],
)  # fmt: skip
def test_error_response_is_one_well_formed_closing_answer(status: int, reason: bytes) -> None:
    data = error_response(status, "api_error", "what went wrong ✓", [("retry-after", "1")])
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "gw")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert (response.status_code, response.reason) == (status, reason)
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"retry-after"] == b"1"
    body = client.next_event()
    assert isinstance(body, h11.Data)
    assert json.loads(body.data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "what went wrong ✓"},
    }
    assert isinstance(client.next_event(), h11.EndOfMessage)


def test_front_door_counts_are_exported_at_scrape_time() -> None:
    metrics = GatewayMetrics()
    counts = metrics.front_door
    counts.open = 3
    counts.refused = 4
    counts.rejected["header_bytes"] = 5
    counts.closed["idle"] = 6
    text = generate_latest(metrics.registry).decode()
    assert "keyrelay_gateway_open_connections 3.0" in text
    assert "keyrelay_gateway_refused_connections_total 4.0" in text
    assert 'keyrelay_gateway_rejected_requests_total{reason="header_bytes"} 5.0' in text
    assert 'keyrelay_gateway_closed_connections_total{reason="idle"} 6.0' in text
    for reason in REJECT_REASONS:
        assert f'keyrelay_gateway_rejected_requests_total{{reason="{reason}"}}' in text
    for reason in CLOSE_REASONS:
        assert f'keyrelay_gateway_closed_connections_total{{reason="{reason}"}}' in text


def test_a_worker_answers_and_counts_body_timeouts_from_its_start() -> None:
    metrics = GatewayMetrics()
    config = parse_gateway_config(config_data(body_timeout_seconds=2.5), ENV)
    door = FrontDoor(config, metrics.front_door)
    text = generate_latest(metrics.registry).decode()
    assert 'keyrelay_gateway_rejected_requests_total{reason="body_timeout"} 0.0' in text
    answer = door.answers["body_timeout"]
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "the request body did not arrive within 2.5 s of its headers",
    }
    assert door.limit_of["body_timeout"] == {"body_timeout_seconds": 2.5}
