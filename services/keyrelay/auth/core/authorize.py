"""Building the authorization request (RFC 6749 §4.1.1 with PKCE, RFC 7636 §4.3).

The authorize URL is the only part of the flow that travels through the user's
browser, so everything in it is public: it carries the PKCE *challenge*, never
the verifier, and a ``state`` that is checked when the code comes back.

Providers are configured, not coded (DESIGN §1.3), so the URL is assembled from
configuration: the provider's endpoint (which may already carry a query, e.g. a
tenant or audience parameter) plus the standard parameters plus the provider's
extra parameters. Extra parameters may not override a standard one: a
configuration that set ``response_type`` or ``code_challenge_method`` there
would silently weaken the flow.

Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

__all__ = ["RESERVED_AUTHORIZE_PARAMS", "build_authorize_url", "is_loopback_redirect"]

RESERVED_AUTHORIZE_PARAMS: frozenset[str] = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
)

_NO_EXTRA_PARAMS: Mapping[str, str] = MappingProxyType({})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def build_authorize_url(
    authorize_url: str,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: Sequence[str],
    state: str,
    code_challenge: str,
    extra_params: Mapping[str, str] = _NO_EXTRA_PARAMS,
) -> str:
    """The URL to send the user to, asking for an authorization code with PKCE ``S256``.

    Parameter order: the endpoint's own query, then ``response_type``,
    ``client_id``, ``redirect_uri``, ``scope`` (space-separated, left out when
    there are no scopes), ``state``, ``code_challenge``,
    ``code_challenge_method``, then ``extra_params`` in their order.

    Raises ValueError for a configuration that cannot make a sound request: an
    endpoint that is not an absolute http(s) URL or has a fragment (RFC 6749
    §3.1), a reserved parameter in the endpoint's query or in ``extra_params``,
    or an empty scope or one containing whitespace.
    """
    parts = urlsplit(authorize_url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(
            "the provider's authorize_url must be an absolute http(s) URL, "
            "like https://auth.example/oauth/authorize"
        )
    if parts.fragment:
        raise ValueError(
            "the provider's authorize_url must not have a #fragment (RFC 6749 §3.1): remove it"
        )
    own = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    clash = sorted(own & RESERVED_AUTHORIZE_PARAMS)
    if clash:
        raise ValueError(
            f"the provider's authorize_url already has the query parameter(s) {', '.join(clash)}, "
            "which keyrelay sets itself: remove them from the URL"
        )
    clash = sorted(set(extra_params) & RESERVED_AUTHORIZE_PARAMS)
    if clash:
        raise ValueError(
            f"extra authorize parameter(s) {', '.join(clash)} are set by keyrelay itself "
            "and cannot be overridden: remove them from the provider's extra params"
        )
    for scope in scopes:
        # An empty or spaced scope would change the meaning of the space-joined list.
        if not scope or any(c.isspace() for c in scope):
            raise ValueError(
                f"invalid scope {scope!r}: each scope must be a non-empty word without "
                "spaces; list several scopes as separate entries"
            )

    params: list[tuple[str, str]] = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
    ]
    if scopes:
        params.append(("scope", " ".join(scopes)))
    params += [
        ("state", state),
        ("code_challenge", code_challenge),
        ("code_challenge_method", "S256"),
    ]
    params += extra_params.items()
    # quote, not quote_plus: "%20" is read as a space by every server, while a
    # "+" in a query is only a space to form decoders.
    encoded = urlencode(params, quote_via=quote)
    query = f"{parts.query}&{encoded}" if parts.query else encoded
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def is_loopback_redirect(uri: str) -> bool:
    """True for an ``http`` redirect URI on the loopback interface (RFC 8252 §7.3).

    Such a redirect can be caught by a local listener (``keyrelay connect``)
    instead of having the user paste the code.
    """
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    if parts.scheme.lower() != "http" or parts.username is not None:
        return False
    return parts.hostname in _LOOPBACK_HOSTS
