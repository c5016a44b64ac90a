"""Errors the gateway makes itself, in the Anthropic error shape. No I/O.

Body: ``{"type":"error","error":{"type":TYPE,"message":MESSAGE}}`` (plus a
top-level ``request_id`` when one is given, as the real API does). The SDKs
pick their exception class from the HTTP status, and show ``error.message``.

Statuses and types (DESIGN §2). Where the real API has a type for a status it
is used; for 502/503 the real API has none (it signals overload with 529
``overloaded_error``, which would be a lie here), so they are ``api_error``::

    400 invalid_request_error   invalid JSON, not an object, bad shape, bad content type
    401 authentication_error    unknown gateway key; account disconnected (reconnect)
    404 not_found_error         any path the gateway does not serve
    405 invalid_request_error   wrong method on a served path
    413 request_too_large       body over max_request_bytes
    429 rate_limit_error        a limit or budget of the key or its account (``retry-after``,
                                ``x-keyrelay-ratelimit-*``; a budget: ``x-should-retry: false``)
    500 api_error               a bug in the gateway (never with a traceback)
    502 api_error               upstream unreachable or broken mid-response
    503 api_error               auth service unavailable; the limits store unavailable
                                with ``on_store_error = "deny"`` (with ``retry-after``)
    503 overloaded_error        no pooled upstream connection free in time, or too many
                                requests already waiting for one (with ``retry-after``)
    504 api_error               upstream timed out

The gateway's own overload is honestly ``overloaded_error`` (the type the API
uses for its own overload), with 503 rather than the API's 529: a retry may
well find another gateway worker, or this one, with a free connection.

Inside an SSE stream that already answered 200 the same body travels as an
``error`` event (``error_event``), which the SDKs raise as an API error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "ACCOUNT_DISCONNECTED",
    "AUTH_UNAVAILABLE",
    "INTERNAL_ERROR",
    "INVALID_REQUEST",
    "LIMITS_UNAVAILABLE",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "RATE_LIMITED",
    "REQUEST_TOO_LARGE",
    "UNKNOWN_KEY",
    "UPSTREAM_POOL_EXHAUSTED",
    "UPSTREAM_TIMEOUT",
    "UPSTREAM_UNREACHABLE",
    "ErrorKind",
    "GatewayError",
    "error_body",
    "error_event",
]


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """An HTTP status and the Anthropic error type that goes with it."""

    status: int
    type: str


INVALID_REQUEST = ErrorKind(400, "invalid_request_error")
UNKNOWN_KEY = ErrorKind(401, "authentication_error")
ACCOUNT_DISCONNECTED = ErrorKind(401, "authentication_error")
NOT_FOUND = ErrorKind(404, "not_found_error")
METHOD_NOT_ALLOWED = ErrorKind(405, "invalid_request_error")
REQUEST_TOO_LARGE = ErrorKind(413, "request_too_large")
RATE_LIMITED = ErrorKind(429, "rate_limit_error")
INTERNAL_ERROR = ErrorKind(500, "api_error")
UPSTREAM_UNREACHABLE = ErrorKind(502, "api_error")
AUTH_UNAVAILABLE = ErrorKind(503, "api_error")
LIMITS_UNAVAILABLE = ErrorKind(503, "api_error")
UPSTREAM_POOL_EXHAUSTED = ErrorKind(503, "overloaded_error")
UPSTREAM_TIMEOUT = ErrorKind(504, "api_error")


def _error_object(error_type: str, message: str) -> dict[str, object]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_body(error_type: str, message: str, *, request_id: str | None = None) -> bytes:
    """The JSON body of an error response."""
    obj = _error_object(error_type, message)
    if request_id is not None:
        obj["request_id"] = request_id
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_event(error_type: str, message: str) -> bytes:
    """The same error as an SSE ``error`` event, for a stream already under way."""
    data = json.dumps(_error_object(error_type, message), ensure_ascii=False, separators=(",", ":"))
    return b"event: error\ndata: " + data.encode("utf-8") + b"\n\n"


class GatewayError(Exception):
    """An error the gateway answers itself: a kind (status + type) and a message.

    The message is shown to the client: say what went wrong and what to do,
    never include a token or key. ``retry_after``: whole seconds, sent as the
    ``retry-after`` header (the SDKs wait that long before a retry).
    """

    def __init__(self, kind: ErrorKind, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.kind.status

    def body(self, *, request_id: str | None = None) -> bytes:
        return error_body(self.kind.type, self.message, request_id=request_id)
