"""Domain errors of the auth service.

Every failure a caller can see is one of these; each transport maps each class
to exactly one status through ``mapped`` (gRPC: ``keyrelay.auth.rpc.interceptors``,
HTTP: ``keyrelay.auth.web.app``) and anything else to ``INTERNAL`` / 500 without
leaking its text::

    AuthError
    ├── NotFound             -> NOT_FOUND           unknown flow, account, provider
    ├── InvalidArgument      -> INVALID_ARGUMENT    malformed input, state mismatch
    ├── FailedPrecondition   -> FAILED_PRECONDITION disconnected account, code refused
    ├── Unavailable          -> UNAVAILABLE         token endpoint or Redis unreachable
    ├── Unauthenticated      -> UNAUTHENTICATED     missing or unknown service token
    └── PermissionDenied     -> PERMISSION_DENIED   role may not call this RPC

Messages are written for the person who will read them: they say what went
wrong and what to do, and they never contain a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class AuthError(Exception):
    """Base of every error the auth service reports to its callers."""


class NotFound(AuthError):
    pass


class InvalidArgument(AuthError):
    pass


class FailedPrecondition(AuthError):
    pass


class Unavailable(AuthError):
    pass


class Unauthenticated(AuthError):
    pass


class PermissionDenied(AuthError):
    pass


def mapped(error: AuthError, table: Mapping[type[AuthError], T], default: T) -> T:
    """``table``'s value for the nearest class of ``error`` (subclasses inherit), else ``default``.

    The one lookup behind every transport's mapping (gRPC status, HTTP status)."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return default
