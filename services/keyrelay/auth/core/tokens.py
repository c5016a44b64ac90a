"""Reading a token endpoint's answer (RFC 6749 §5.1 success, §5.2 error).

The one decision that matters here is whether a failed refresh means the grant
is gone. Getting it wrong in one direction leaves a dead account retrying
forever; in the other it disconnects a user over a proxy hiccup, and the user
has to go through the browser consent again. So the classification is strict
and conservative (DESIGN §1.2.6):

================================  ===============  ==============================
answer                            kind             what the caller does
================================  ===============  ==============================
2xx with a valid token response   (a TokenSet)     store it
2xx but malformed                 TRANSIENT        retry; never disconnect
408, 425, 429, 5xx                TRANSIENT        retry with backoff
4xx, JSON ``error`` =
  ``invalid_grant``               INVALID_GRANT    disconnect the account
  ``temporarily_unavailable``     TRANSIENT        retry with backoff
  anything else                   MISCONFIGURED    log loudly; keep the account
4xx without a JSON ``error``      TRANSIENT        probably a proxy; retry
1xx, 3xx, anything else           TRANSIENT        retry
request never sent (DNS,          NOT_SENT         retry with backoff: the refresh
  connect, TLS)                                      token was not presented
sent, no complete answer (read    ANSWER_LOST      DESIGN §1.2.1: the provider may
  timeout, cut, cancellation)                        have rotated the refresh token;
                                                     the lease is left to expire
================================  ===============  ==============================

A transient answer may carry ``Retry-After`` (:func:`retry_after_seconds`):
it is kept on the error so the refresh machine waits at least that long.

``error`` is read from the JSON object's ``error`` member only: a substring
search of the body would let an HTML error page that mentions "invalid_grant"
disconnect an account.

The body is hostile input: it is only decoded when small (1 MiB), any bytes are
tolerated, and nothing but :class:`TokenEndpointError` leaves
:func:`parse_token_response`. Token values never appear in a message or a repr.

Pure functions: no I/O; ``now`` is passed in.
"""

from __future__ import annotations

import email.utils
import enum
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_RETRY_AFTER_SECONDS",
    "FailureKind",
    "TokenEndpointError",
    "TokenSet",
    "parse_token_response",
    "retry_after_seconds",
]

MAX_BODY_BYTES = 1024 * 1024
# An expiry further out than this is clamped: refreshing early is harmless,
# while a huge value would overflow the float arithmetic on expires_at.
MAX_EXPIRES_IN = 10 * 365 * 24 * 3600
_DESCRIPTION_MAX = 200
_ERROR_CODE_MAX = 100

# RFC 6749 Appendix A: access_token and refresh_token are 1*VSCHAR (%x20-7E).
# The access token goes into an Authorization header after the scheme, where a
# space would split it (RFC 6750 b64token has none) and a CR/LF would inject a
# header, so it gets the stricter %x21-7E.
_VSCHAR_RE = re.compile(r"[\x20-\x7e]+")
_HEADER_VALUE_RE = re.compile(r"[\x21-\x7e]+")
# token_type becomes the Authorization scheme, an RFC 9110 token.
_TCHAR_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS_RE = re.compile(r"[0-9]{1,15}")
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# A provider's Retry-After is honoured up to this: a hostile or broken value
# ("86400") must not keep an account from refreshing for a day.
MAX_RETRY_AFTER_SECONDS = 600.0


@dataclass(frozen=True, slots=True, repr=False)
class TokenSet:
    """The tokens from one successful token-endpoint answer.

    ``expires_at`` is absolute (the ``now`` of the parse plus ``expires_in``),
    on the same clock as that ``now``. ``refresh_token`` is None when the
    provider sent none; the caller then keeps the one it already has.
    """

    access_token: str
    token_type: str
    expires_at: float
    refresh_token: str | None
    scopes: tuple[str, ...]

    def __repr__(self) -> str:
        refresh = "None" if self.refresh_token is None else "<redacted>"
        return (
            f"TokenSet(access_token=<redacted>, token_type={self.token_type!r}, "
            f"expires_at={self.expires_at!r}, refresh_token={refresh}, scopes={self.scopes!r})"
        )


class FailureKind(enum.Enum):
    """What a failed token-endpoint call means for the account."""

    INVALID_GRANT = "invalid_grant"
    """The grant is gone (revoked, expired, replayed code): disconnect."""
    TRANSIENT = "transient"
    """Try again later; the account stays connected."""
    MISCONFIGURED = "misconfigured"
    """Our client configuration is wrong: an operator must act; the account stays."""
    NOT_SENT = "not_sent"
    """No byte of the request left (DNS, connect, TLS): the refresh token is untouched."""
    ANSWER_LOST = "answer_lost"
    """The request may have reached the provider but no complete answer came back:
    the provider may have rotated the refresh token in the answer we lost."""


class TokenEndpointError(Exception):
    """A token-endpoint call that did not produce tokens.

    ``status`` is None when there was no HTTP answer at all. ``error`` and
    ``description`` are the provider's ``error`` and ``error_description``
    when it sent them, made printable and short. ``retry_after`` is the
    provider's ``Retry-After`` in seconds (capped), when a transient answer had one.
    """

    kind: FailureKind
    status: int | None
    error: str | None
    description: str | None
    retry_after: float | None

    def __init__(
        self,
        kind: FailureKind,
        *,
        status: int | None = None,
        error: str | None = None,
        description: str | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.error = None if error is None else _sanitize(error, _ERROR_CODE_MAX) or None
        self.description = (
            None if description is None else _sanitize(description, _DESCRIPTION_MAX) or None
        )
        reason = None if reason is None else _sanitize(reason, _DESCRIPTION_MAX) or None
        super().__init__(self._message(reason))

    @classmethod
    def not_sent(cls, reason: str) -> TokenEndpointError:
        """The request never left (DNS, connection refused, connect or TLS failure)."""
        return cls(FailureKind.NOT_SENT, reason=reason)

    @classmethod
    def answer_lost(cls, reason: str) -> TokenEndpointError:
        """The request was (perhaps partly) sent and no complete answer arrived."""
        return cls(FailureKind.ANSWER_LOST, reason=reason)

    def _message(self, reason: str | None) -> str:
        if self.kind is FailureKind.ANSWER_LOST:
            return f"token endpoint answer lost: {reason or 'no answer'}"
        if self.status is None:
            return f"token endpoint unreachable: {reason or 'no answer'}"
        message = f"token endpoint answered {self.status}"
        if self.error is not None:
            message += f" {self.error}"
        detail = self.description if self.description is not None else reason
        if detail is not None:
            message += f": {detail}"
        return message


def parse_token_response(
    status: int,
    content_type: str | None,
    body: bytes,
    *,
    now: float,
    requested_scopes: Sequence[str],
    default_expires_in: int = 3600,
    retry_after: float | None = None,
) -> TokenSet:
    """Turn a token-endpoint answer into a TokenSet, or raise TokenEndpointError.

    ``requested_scopes`` are the granted scopes when the answer does not list
    any (RFC 6749 §5.1); ``default_expires_in`` is the lifetime assumed when it
    has no ``expires_in``; ``retry_after`` (seconds, from the answer's
    ``Retry-After``) is kept on a TRANSIENT error.
    """
    payload, problem = _json_object(body, content_type)
    if 200 <= status < 300:
        if payload is None:
            raise TokenEndpointError(FailureKind.TRANSIENT, status=status, reason=problem)
        return _token_set(status, payload, now, requested_scopes, default_expires_in)

    error, description = _error_fields(payload)
    if 400 <= status < 500 and status not in _TRANSIENT_STATUSES and error is not None:
        if error == "invalid_grant":
            kind = FailureKind.INVALID_GRANT
        elif error == "temporarily_unavailable":
            raise TokenEndpointError(
                FailureKind.TRANSIENT,
                status=status,
                error=error,
                description=description,
                retry_after=retry_after,
            )
        else:
            # invalid_client, unauthorized_client, unsupported_grant_type,
            # invalid_scope, invalid_request and extensions: none of them says
            # the user's grant is gone, all of them need an operator.
            kind = FailureKind.MISCONFIGURED
        raise TokenEndpointError(kind, status=status, error=error, description=description)
    if error is None and problem is None:
        problem = "the answer has no OAuth error field"
    raise TokenEndpointError(
        FailureKind.TRANSIENT,
        status=status,
        error=error,
        description=description,
        reason=problem,
        retry_after=retry_after,
    )


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (RFC 9110 §10.2.3) as seconds from ``now``, or None.

    Delay-seconds or an HTTP-date; anything else (negative, fractional,
    unparseable) is ignored. The result is capped at MAX_RETRY_AFTER_SECONDS.
    """
    if value is None:
        return None
    text = value.strip()
    if _DIGITS_RE.fullmatch(text):
        seconds = float(int(text))
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # RFC 9110: an HTTP-date is always GMT
            return None
        seconds = max(0.0, when.timestamp() - now)
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def _json_object(body: bytes, content_type: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The body as a JSON object, or None and why not.

    The content type is not trusted either way: servers label JSON as
    text/plain and HTML as application/json.
    """
    if len(body) > MAX_BODY_BYTES:
        return None, f"the answer is {len(body)} bytes long, more than a token response can be"
    if not body.strip():
        return None, "the answer is empty"
    label = f" ({_sanitize(content_type, 80)})" if content_type else ""
    try:
        value = json.loads(body.decode("utf-8-sig"))
    # RecursionError: deeply nested arrays; ValueError covers invalid UTF-8,
    # invalid JSON and integers over the int-to-str digit limit.
    except (ValueError, RecursionError):
        return None, f"the answer is not JSON{label}"
    if not isinstance(value, dict):
        return None, f"the answer is JSON but not an object{label}"
    return value, None


def _error_fields(payload: dict[str, Any] | None) -> tuple[str | None, str | None]:
    if payload is None:
        return None, None
    error = payload.get("error")
    if not isinstance(error, str) or not error:
        return None, None
    description = payload.get("error_description")
    return error, description if isinstance(description, str) else None


def _token_set(
    status: int,
    payload: dict[str, Any],
    now: float,
    requested_scopes: Sequence[str],
    default_expires_in: int,
) -> TokenSet:
    def malformed(what: str) -> TokenEndpointError:
        # Kept TRANSIENT: a malformed success must never cost the user the grant.
        error, description = _error_fields(payload)
        return TokenEndpointError(
            FailureKind.TRANSIENT,
            status=status,
            error=error,
            description=description,
            reason=f"malformed token response: {what}",
        )

    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise malformed("no access_token")
    if _HEADER_VALUE_RE.fullmatch(access_token) is None:
        raise malformed("the access_token has spaces or characters outside printable ASCII")

    token_type = payload.get("token_type")
    if not isinstance(token_type, str) or not token_type:
        raise malformed("no token_type")
    if _TCHAR_RE.fullmatch(token_type) is None:
        raise malformed("the token_type is not a single word")
    if token_type.lower() == "bearer":
        token_type = "Bearer"

    expires_in = _expires_in(payload.get("expires_in"), default_expires_in)
    if expires_in is None:
        raise malformed("expires_in is not a non-negative number of seconds")

    refresh_token = payload.get("refresh_token")
    if refresh_token is not None and not isinstance(refresh_token, str):
        raise malformed("the refresh_token is not a string")
    if refresh_token is not None and refresh_token and _VSCHAR_RE.fullmatch(refresh_token) is None:
        raise malformed("the refresh_token has characters outside printable ASCII")

    scope = payload.get("scope")
    if scope is None:
        scopes = tuple(requested_scopes)
    elif isinstance(scope, str):
        scopes = tuple(dict.fromkeys(s for s in scope.split(" ") if s))
    elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        # Not RFC 6749, but seen in the wild; the meaning is unambiguous.
        scopes = tuple(dict.fromkeys(s for s in scope if s))
    else:
        raise malformed("scope is neither a string nor a list of strings")

    return TokenSet(
        access_token=access_token,
        token_type=token_type,
        expires_at=now + expires_in,
        refresh_token=refresh_token or None,
        scopes=scopes,
    )


def _expires_in(value: object, default: int) -> int | None:
    """Seconds of validity, or None when the value is not usable."""
    if value is None:
        seconds = default
    elif isinstance(value, bool):  # bool is an int subclass; true is not "1 second"
        return None
    elif isinstance(value, int):
        seconds = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            return None
        seconds = min(int(value), MAX_EXPIRES_IN)
    elif isinstance(value, str) and _DIGITS_RE.fullmatch(value.strip()):
        seconds = int(value.strip())
    else:
        return None
    if seconds < 0:
        return None
    return min(seconds, MAX_EXPIRES_IN)


def _sanitize(text: str, limit: int) -> str:
    # Provider text ends up in logs and gRPC messages: printable, one line, short.
    cleaned = "".join(c for c in text if c.isprintable())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1] + "…"
    return cleaned
