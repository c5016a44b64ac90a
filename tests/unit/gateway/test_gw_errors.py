"""The gateway's own errors: the Anthropic shape and the statuses of DESIGN §2."""

from __future__ import annotations

import json

import pytest

from keyrelay.gateway.core import errors
from keyrelay.gateway.core.errors import (
    GatewayError,
    error_body,
    error_event,
)
from keyrelay.gateway.core.sse import SSEDecoder


def test_error_body_shape() -> None:
    body = error_body("invalid_request_error", 'bad "json" — é')
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": 'bad "json" — é'},
    }
    with_id = json.loads(error_body("api_error", "x", request_id="req_123"))
    assert with_id["request_id"] == "req_123"
    assert with_id["error"] == {"type": "api_error", "message": "x"}


def test_error_event_is_one_sse_event() -> None:
    raw = error_event("api_error", "line one\nline two")
    decoder = SSEDecoder()
    (event,) = decoder.feed(raw)
    assert decoder.close() == []
    assert event.raw == raw
    assert event.event == "error"
    assert event.data is not None
    assert json.loads(event.data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "line one\nline two"},
    }


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        (errors.INVALID_REQUEST, 400, "invalid_request_error"),
        (errors.UNKNOWN_KEY, 401, "authentication_error"),
        (errors.ACCOUNT_DISCONNECTED, 401, "authentication_error"),
        (errors.NOT_FOUND, 404, "not_found_error"),
        (errors.METHOD_NOT_ALLOWED, 405, "invalid_request_error"),
        (errors.REQUEST_TOO_LARGE, 413, "request_too_large"),
        (errors.INTERNAL_ERROR, 500, "api_error"),
        (errors.UPSTREAM_UNREACHABLE, 502, "api_error"),
        (errors.AUTH_UNAVAILABLE, 503, "api_error"),
        (errors.UPSTREAM_TIMEOUT, 504, "api_error"),
    ],
)
def test_status_table(kind: errors.ErrorKind, status: int, error_type: str) -> None:
    assert (kind.status, kind.type) == (status, error_type)


def test_gateway_error() -> None:
    exc = GatewayError(errors.ACCOUNT_DISCONNECTED, "account 'acme' is disconnected; reconnect it")
    assert exc.status == 401
    assert str(exc) == exc.message
    assert json.loads(exc.body(request_id="req_1")) == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": "account 'acme' is disconnected; reconnect it",
        },
        "request_id": "req_1",
    }
