"""Token-endpoint answers: what becomes a TokenSet and what each failure means."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from keyrelay.auth.core.tokens import (
    MAX_BODY_BYTES,
    MAX_RETRY_AFTER_SECONDS,
    FailureKind,
    TokenEndpointError,
    TokenSet,
    parse_token_response,
    retry_after_seconds,
)

NOW = 1_000_000.0
REQUESTED = ("read", "write")
JSON = "application/json"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def ok(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {"access_token": "at-1", "token_type": "Bearer", "expires_in": 3600}
    fields.update(overrides)
    return json.dumps({k: v for k, v in fields.items() if v is not ABSENT}).encode()


ABSENT: Any = object()


def parse(status: int, raw: bytes, content_type: str | None = JSON, **kwargs: Any) -> TokenSet:
    return parse_token_response(
        status, content_type, raw, now=NOW, requested_scopes=REQUESTED, **kwargs
    )


def failure(status: int, raw: bytes, content_type: str | None = JSON) -> TokenEndpointError:
    with pytest.raises(TokenEndpointError) as info:
        parse(status, raw, content_type)
    return info.value


# --- success ---------------------------------------------------------------------------------


def test_minimal_success() -> None:
    assert parse(200, ok()) == TokenSet(
        access_token="at-1",
        token_type="Bearer",
        expires_at=NOW + 3600,
        refresh_token=None,
        scopes=REQUESTED,
    )


def test_full_success() -> None:
    raw = ok(refresh_token="rt-1", scope="read", id_token="x", extra={"nested": True})
    assert parse(200, raw) == TokenSet(
        access_token="at-1",
        token_type="Bearer",
        expires_at=NOW + 3600,
        refresh_token="rt-1",
        scopes=("read",),
    )


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [
        (3600, 3600),
        (0, 0),
        ("3600", 3600),
        (" 120 ", 120),
        ("0", 0),
        (59.9, 59),  # a float is accepted, rounded down
        (3600.0, 3600),
        (ABSENT, 3600),
        (None, 3600),  # JSON null reads as absent
        (10**30, 10 * 365 * 24 * 3600),  # clamped, no float overflow
        (10**400, 10 * 365 * 24 * 3600),
        (1e300, 10 * 365 * 24 * 3600),
    ],
)
def test_expires_in(expires_in: Any, expected: int) -> None:
    assert parse(200, ok(expires_in=expires_in)).expires_at == NOW + expected


def test_default_expires_in_applies_only_when_absent() -> None:
    assert parse(200, ok(expires_in=ABSENT), default_expires_in=60).expires_at == NOW + 60
    assert parse(200, ok(expires_in=10), default_expires_in=60).expires_at == NOW + 10


@pytest.mark.parametrize(
    ("token_type", "expected"),
    [("Bearer", "Bearer"), ("bearer", "Bearer"), ("BEARER", "Bearer"), ("DPoP", "DPoP")],
)
def test_token_type(token_type: str, expected: str) -> None:
    assert parse(200, ok(token_type=token_type)).token_type == expected


@pytest.mark.parametrize(
    ("refresh_token", "expected"),
    [("rt", "rt"), ("", None), (None, None), (ABSENT, None), ("r t", "r t")],
)
def test_refresh_token(refresh_token: Any, expected: str | None) -> None:
    assert parse(200, ok(refresh_token=refresh_token)).refresh_token == expected


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        (ABSENT, REQUESTED),
        (None, REQUESTED),
        ("read", ("read",)),
        ("a b  c a", ("a", "b", "c")),
        ("", ()),
        (["a", "b", "a"], ("a", "b")),
        ([], ()),
    ],
)
def test_scopes(scope: Any, expected: tuple[str, ...]) -> None:
    assert parse(200, ok(scope=scope)).scopes == expected


@pytest.mark.parametrize("status", [200, 201, 203, 299])
@pytest.mark.parametrize("content_type", [JSON, "text/plain", "text/html", None])
def test_any_2xx_with_a_token_json_succeeds_whatever_the_label(
    status: int, content_type: str | None
) -> None:
    assert parse(status, ok(), content_type).access_token == "at-1"


def test_utf8_bom_is_tolerated() -> None:
    assert parse(200, b"\xef\xbb\xbf" + ok()).access_token == "at-1"


def test_token_set_repr_redacts_tokens() -> None:
    tokens = parse(200, ok(access_token="SECRET-AT", refresh_token="SECRET-RT"))
    text = repr(tokens)
    assert "SECRET" not in text
    assert "access_token=<redacted>" in text
    assert "refresh_token=<redacted>" in text
    assert "token_type='Bearer'" in text
    assert "refresh_token=None" in repr(parse(200, ok()))


def test_token_set_is_frozen() -> None:
    tokens = parse(200, ok())
    with pytest.raises(dataclasses.FrozenInstanceError):
        tokens.access_token = "x"  # type: ignore[misc]


# --- malformed successes: always TRANSIENT ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "the answer is empty"),
        (b"  \r\n", "the answer is empty"),
        (b"<html>invalid_grant</html>", "not JSON"),
        (b"access_token=at&token_type=bearer", "not JSON"),
        (b"[]", "not an object"),
        (b'"at"', "not an object"),
        (b"null", "not an object"),
        (b"\xff\xfe{}", "not JSON"),
        (b'{"access_token": "a\xff"}', "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'{"expires_in": ' + b"9" * 5000 + b"}", "not JSON"),  # int digit limit
        (b" " * (MAX_BODY_BYTES + 1), "bytes long"),
        (ok(access_token="x" * MAX_BODY_BYTES), "bytes long"),
        (ok(access_token=ABSENT), "no access_token"),
        (ok(access_token=""), "no access_token"),
        (ok(access_token=123), "no access_token"),
        (ok(access_token=["at"]), "no access_token"),
        (ok(access_token="a t"), "access_token has spaces"),
        (ok(access_token="at\r\nX-Injected: 1"), "access_token has spaces"),
        (ok(access_token="até"), "access_token has spaces"),
        (ok(token_type=ABSENT), "no token_type"),
        (ok(token_type=""), "no token_type"),
        (ok(token_type=1), "no token_type"),
        (ok(token_type="Bearer x"), "token_type is not a single word"),
        (ok(token_type="Bearer\n"), "token_type is not a single word"),
        (ok(expires_in=-1), "expires_in"),
        (ok(expires_in="-1"), "expires_in"),
        (ok(expires_in="abc"), "expires_in"),
        (ok(expires_in="1.5"), "expires_in"),
        (ok(expires_in=""), "expires_in"),
        (ok(expires_in="٣"), "expires_in"),  # a non-ASCII digit
        (ok(expires_in=True), "expires_in"),
        (ok(expires_in=False), "expires_in"),
        (ok(expires_in=[]), "expires_in"),
        (ok(expires_in={}), "expires_in"),
        (ok(expires_in=-0.5), "expires_in"),
        (b'{"access_token": "a", "token_type": "Bearer", "expires_in": NaN}', "expires_in"),
        (b'{"access_token": "a", "token_type": "Bearer", "expires_in": Infinity}', "expires_in"),
        (ok(refresh_token=5), "refresh_token is not a string"),
        (ok(refresh_token="rt\n"), "refresh_token has characters"),
        (ok(scope=5), "scope is neither"),
        (ok(scope=[1]), "scope is neither"),
        (ok(scope={"a": 1}), "scope is neither"),
    ],
)
def test_malformed_success_is_transient(raw: bytes, reason: str) -> None:
    error = failure(200, raw)
    assert error.kind is FailureKind.TRANSIENT
    assert error.status == 200
    assert reason in str(error)


def test_invalid_grant_inside_a_2xx_does_not_disconnect() -> None:
    error = failure(200, body(error="invalid_grant", error_description="bad code"))
    assert error.kind is FailureKind.TRANSIENT
    assert error.error == "invalid_grant"
    assert str(error) == "token endpoint answered 200 invalid_grant: bad code"


def test_not_json_message_names_the_content_type() -> None:
    assert str(failure(200, b"<html/>", "text/html; charset=utf-8")) == (
        "token endpoint answered 200: the answer is not JSON (text/html; charset=utf-8)"
    )


# --- failures --------------------------------------------------------------------------------

ALWAYS_TRANSIENT = [408, 425, 429, 500, 502, 503, 504, 599]


@pytest.mark.parametrize("status", ALWAYS_TRANSIENT)
@pytest.mark.parametrize(
    "raw",
    [body(error="invalid_grant"), body(error="invalid_client"), b"", b"<html/>", ok()],
)
def test_retryable_statuses_are_transient_whatever_the_body(status: int, raw: bytes) -> None:
    assert failure(status, raw).kind is FailureKind.TRANSIENT


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (400, "invalid_grant", FailureKind.INVALID_GRANT),
        (401, "invalid_grant", FailureKind.INVALID_GRANT),
        (403, "invalid_grant", FailureKind.INVALID_GRANT),
        (400, "temporarily_unavailable", FailureKind.TRANSIENT),
        (400, "invalid_client", FailureKind.MISCONFIGURED),
        (401, "invalid_client", FailureKind.MISCONFIGURED),
        (400, "unauthorized_client", FailureKind.MISCONFIGURED),
        (400, "unsupported_grant_type", FailureKind.MISCONFIGURED),
        (400, "invalid_scope", FailureKind.MISCONFIGURED),
        (400, "invalid_request", FailureKind.MISCONFIGURED),
        (400, "server_error", FailureKind.MISCONFIGURED),
        (400, "something_new", FailureKind.MISCONFIGURED),
        (400, "Invalid_Grant", FailureKind.MISCONFIGURED),  # exact match only
        (400, "invalid_grant ", FailureKind.MISCONFIGURED),
    ],
)
def test_oauth_errors_in_4xx(status: int, error: str, kind: FailureKind) -> None:
    exc = failure(status, body(error=error, error_description="why"))
    assert exc.kind is kind
    assert exc.status == status
    assert exc.error == error
    assert exc.description == "why"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"invalid_grant",
        b"<html><body>error: invalid_grant</body></html>",
        b'{"message": "invalid_grant"}',
        b'{"error_description": "invalid_grant"}',
        b'{"error": ""}',
        b'{"error": null}',
        b'{"error": ["invalid_grant"]}',
        b'{"error": {"code": "invalid_grant"}}',
        b'"invalid_grant"',
        b'["invalid_grant"]',
        b'{"error": "invalid_grant"',  # truncated
        b'{"error": "invalid_grant"}' + b" " * MAX_BODY_BYTES,  # too long to read
    ],
)
def test_4xx_without_a_json_error_field_is_transient(raw: bytes) -> None:
    exc = failure(400, raw, "text/html")
    assert exc.kind is FailureKind.TRANSIENT
    assert exc.error is None


@pytest.mark.parametrize("status", [0, -1, 100, 101, 199, 300, 301, 302, 304, 399, 600, 999])
def test_other_statuses_are_transient(status: int) -> None:
    exc = failure(status, body(error="invalid_grant"))
    assert exc.kind is FailureKind.TRANSIENT


def test_error_message_shape() -> None:
    exc = failure(400, body(error="invalid_grant", error_description="Refresh token expired"))
    assert str(exc) == "token endpoint answered 400 invalid_grant: Refresh token expired"
    assert (
        str(failure(400, body(error="invalid_grant")))
        == "token endpoint answered 400 invalid_grant"
    )
    assert str(failure(503, b"")) == "token endpoint answered 503: the answer is empty"
    assert str(failure(400, b"{}")) == (
        "token endpoint answered 400: the answer has no OAuth error field"
    )


def test_description_is_sanitized_and_truncated() -> None:
    exc = failure(
        400, body(error="invalid_grant", error_description="a\nb\x00c\x1b[31m" + "x" * 500)
    )
    assert exc.description is not None
    assert len(exc.description) == 200
    assert exc.description.startswith("abc[31mxxx")
    assert exc.description.endswith("x…")
    assert "\n" not in str(exc)
    assert len(str(exc)) < 260


def test_error_code_is_sanitized() -> None:
    exc = failure(400, body(error="weird\ncode\x00"))
    assert exc.kind is FailureKind.MISCONFIGURED
    assert exc.error == "weirdcode"


def test_non_string_description_is_ignored() -> None:
    exc = failure(400, body(error="invalid_grant", error_description=["x"]))
    assert exc.description is None
    assert exc.kind is FailureKind.INVALID_GRANT


def test_not_sent_error() -> None:
    exc = TokenEndpointError.not_sent("connect timeout after 5s")
    assert exc.kind is FailureKind.NOT_SENT
    assert (exc.status, exc.error, exc.description, exc.retry_after) == (None, None, None, None)
    assert str(exc) == "token endpoint unreachable: connect timeout after 5s"
    assert str(TokenEndpointError.not_sent("")) == "token endpoint unreachable: no answer"
    assert str(TokenEndpointError.not_sent("a\r\nb")) == "token endpoint unreachable: ab"


def test_answer_lost_error() -> None:
    exc = TokenEndpointError.answer_lost("ReadError")
    assert exc.kind is FailureKind.ANSWER_LOST
    assert exc.status is None
    assert str(exc) == "token endpoint answer lost: ReadError"
    assert str(TokenEndpointError.answer_lost("")) == "token endpoint answer lost: no answer"


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (200, ok(access_token="SECRET-AT", refresh_token="SECRET-RT", expires_in=-5)),
        (200, ok(access_token="SECRET AT", refresh_token="SECRET-RT")),
        (200, ok(access_token="SECRET-AT", refresh_token="SECRET-RT", scope=5)),
        (400, body(error="invalid_grant", refresh_token="SECRET-RT")),
        (500, b"SECRET-AT"),
    ],
)
def test_failures_never_carry_token_values(status: int, raw: bytes) -> None:
    exc = failure(status, raw)
    assert "SECRET" not in str(exc)
    assert "SECRET" not in repr(exc)


# --- properties ------------------------------------------------------------------------------


def _json_error_field(raw: bytes) -> object:
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return None
    return value.get("error") if isinstance(value, dict) else None


def _check(status: int, raw: bytes) -> None:
    try:
        tokens = parse(status, raw)
    except TokenEndpointError as exc:
        if exc.kind is FailureKind.INVALID_GRANT:
            assert 400 <= status < 500
            assert status not in (408, 425, 429)
            assert _json_error_field(raw) == "invalid_grant"
        return
    assert 200 <= status < 300
    assert tokens.access_token
    assert all("\x21" <= c <= "\x7e" for c in tokens.access_token)
    assert tokens.expires_at >= NOW


statuses = st.integers(min_value=-10, max_value=1000) | st.sampled_from(
    [200, 400, 401, 403, 408, 425, 429, 500, 503]
)


@given(status=statuses, raw=st.binary(max_size=500))
@example(status=200, raw=b"\xef\xbb\xbf")
@example(status=400, raw=b'{"error": "invalid_grant"}')
def test_arbitrary_bytes_only_raise_token_endpoint_error(status: int, raw: bytes) -> None:
    _check(status, raw)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["invalid_grant", "bearer", "3600", "-1", "", " "])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
token_keys = st.sampled_from(
    [
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "scope",
        "error",
        "error_description",
    ]
)


@given(status=statuses, payload=st.dictionaries(token_keys, json_values, max_size=7))
def test_arbitrary_token_json_only_raises_token_endpoint_error(
    status: int, payload: dict[str, Any]
) -> None:
    _check(status, json.dumps(payload).encode())


@given(status=st.integers(min_value=400, max_value=499), error=st.text(max_size=30))
def test_only_the_exact_invalid_grant_error_disconnects(status: int, error: str) -> None:
    with pytest.raises(TokenEndpointError) as info:
        parse(status, json.dumps({"error": error}).encode())
    disconnects = info.value.kind is FailureKind.INVALID_GRANT
    assert disconnects is (error == "invalid_grant" and status not in (408, 425, 429))


# --- Retry-After ---------------------------------------------------------------------------

NOW_HTTP = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("999999", MAX_RETRY_AFTER_SECONDS),  # capped
        ("Tue, 14 Nov 2023 22:14:20 GMT", 60.0),  # an HTTP-date
        ("Tue, 14 Nov 2023 22:10:00 GMT", 0.0),  # in the past: now
        ("Tue, 14 Nov 2033 22:14:20 GMT", MAX_RETRY_AFTER_SECONDS),
        ("-5", None),
        ("1.5", None),  # delay-seconds are whole
        ("soon", None),
        ("", None),
        ("Tue, 14 Nov 2023 22:14:20", None),  # no zone: not an HTTP-date
        ("9" * 5000, None),
        ("\x00\r\n120", None),
    ],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, NOW_HTTP) == seconds


@given(st.text(max_size=60))
def test_retry_after_never_raises_and_stays_in_bounds(value: str) -> None:
    seconds = retry_after_seconds(value, NOW_HTTP)
    assert seconds is None or 0 <= seconds <= MAX_RETRY_AFTER_SECONDS


@pytest.mark.parametrize(
    ("status", "payload"),
    [(503, {"error": "temporarily_unavailable"}), (429, {}), (502, None)],
)
def test_a_transient_answer_carries_its_retry_after(
    status: int, payload: dict[str, Any] | None
) -> None:
    raw = b"<html>busy</html>" if payload is None else json.dumps(payload).encode()
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(
            status, "application/json", raw, now=0.0, requested_scopes=(), retry_after=30.0
        )
    assert caught.value.kind is FailureKind.TRANSIENT
    assert caught.value.retry_after == 30.0


def test_a_grant_refusal_carries_no_retry_after() -> None:
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(
            400,
            "application/json",
            b'{"error": "invalid_grant"}',
            now=0.0,
            requested_scopes=(),
            retry_after=30.0,
        )
    assert caught.value.kind is FailureKind.INVALID_GRANT
    assert caught.value.retry_after is None
