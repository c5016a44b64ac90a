"""The numbers and bytes of the gateway's front door. No I/O, no clock.

What the worker's HTTP protocol (``gateway.http.front_door``) decides with them:

- the file descriptors a worker needs to honour its limits, and the soft
  ``RLIMIT_NOFILE`` to ask for (``descriptors_needed``, ``nofile_soft_limit``):
  a connection limit above what the process may open would let the
  descriptors run out before the limit is reached;
- whether the rest of a request body is read after an answer that came before
  its end (``drain_rest``), from the length the request declared
  (``declared_length``);
- the bytes of the answers the protocol writes itself, before any ASGI app
  runs (``error_response``): 400, 408, 431 and 503 in the Anthropic error
  shape, each with ``connection: close``.

The fixed numbers (not configuration: they bound the bounds)::

    FD_RESERVE       descriptors kept for everything but client and upstream
                     connections: the listening socket, epoll, the auth
                     service's channel, log files, the tracing exporter
    REFUSING_MAX     connections beyond max_connections being answered 503 at
                     one time; beyond, they are closed without lingering
    LINGER_SECONDS   after an answer that ends a connection: how long what
    LINGER_BYTES     still arrives is read and dropped before the close
"""

from __future__ import annotations

import http
from collections.abc import Iterable, Sequence
from typing import Final

from keyrelay.gateway.core.errors import error_body

__all__ = [
    "FD_RESERVE",
    "LINGER_BYTES",
    "LINGER_SECONDS",
    "REFUSING_MAX",
    "DescriptorBudgetError",
    "declared_length",
    "descriptors_needed",
    "drain_rest",
    "error_response",
    "nofile_soft_limit",
]

FD_RESERVE: Final = 64
REFUSING_MAX: Final = 64
# Closing a socket with unread data makes the kernel send a reset, and many
# clients (asyncio streams, anyio, so httpx) raise the reset before they read
# the answer that had already arrived. A FIN first, then reading what still
# comes for a short while, lets them read it.
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 1 << 20


class DescriptorBudgetError(Exception):
    """The process may not open enough file descriptors for the configured limits."""


def descriptors_needed(max_connections: int, upstream_connections: int) -> int:
    """Client connections, those being refused, pooled upstream connections and
    the reserve: what the worker may hold open at once."""
    return max_connections + REFUSING_MAX + upstream_connections + FD_RESERVE


def nofile_soft_limit(soft: int, hard: int, needed: int) -> int:
    """The soft ``RLIMIT_NOFILE`` to run with: ``soft`` when it is enough, else
    ``needed`` (an unprivileged process may raise its soft limit up to the hard
    one). A negative limit is unlimited (``resource.RLIM_INFINITY``).

    Raises ``DescriptorBudgetError`` when even the hard limit is too low."""
    if soft < 0 or soft >= needed:
        return soft
    if 0 <= hard < needed:
        raise DescriptorBudgetError(
            f"the limits need {needed} file descriptors and the process may open "
            f"{hard} (RLIMIT_NOFILE): lower gateway.max_connections or an upstream's "
            "max_connections, or raise the limit (ulimit -n, the container runtime)"
        )
    return needed


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The body length a request declared: its ``content-length``, or ``None``
    when it has none that is a plain number, or is chunked (the parser already
    refused a request with both, or with two different lengths)."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if not value.isdigit():
                return None
            length = int(value)
    return length


def drain_rest(content_length: int | None, max_request_bytes: int) -> bool:
    """Read (and drop) the rest of a body the gateway answered before its end?

    Only when it is declared and at most twice the body limit: then a client that
    reads the answer only once it has sent everything (httpx, hence the Python
    SDK) still gets it, and the connection can be used again. Otherwise (chunked,
    or longer) the connection is closed after the answer."""
    return content_length is not None and content_length <= 2 * max_request_bytes


def error_response(
    status: int,
    error_type: str,
    message: str,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A whole HTTP/1.1 answer with the Anthropic error body, closing the connection."""
    body = error_body(error_type, message)
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
