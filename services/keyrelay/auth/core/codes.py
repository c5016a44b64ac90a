"""Reading an authorization code the way a person pastes it.

After consenting in a browser, the user copies *something* back to us. In
practice that is one of:

* the bare code: ``abc123``;
* ``code#state``, the form some providers show on a "copy this code" page;
* the whole address bar of the redirect:
  ``https://app.example/callback?code=abc123&state=xyz`` (or with the
  parameters in the fragment, ``…/callback#code=abc123&state=xyz``);
* only its query string: ``?code=abc123&state=xyz`` or ``code=abc123&state=xyz``.

:func:`parse_pasted_code` turns any of these into a :class:`PastedCode` or
raises :class:`~keyrelay.auth.core.errors.InvalidArgument` with a message that
tells the person what is wrong with what they pasted and what to do. It never
repeats the pasted value: it may be a live code.

How the form is recognised (first match wins):

1. starts with ``http://`` or ``https://`` → a URL. Parameters come from the
   query; when the query has neither ``code`` nor ``error``, from the fragment.
2. read as ``[path][?query][#fragment]``: there is a ``?``, or the query (the
   whole text before ``#`` when there is no ``?``) or the fragment has a field
   ``code=…``, ``state=…`` or ``error=…`` → a query string, with the same
   query-then-fragment rule. This also covers an address pasted without its
   scheme (``app.example/callback?code=…``).
3. contains ``#`` → ``code#state``.
4. anything else → a bare code.

URL parameters are ``application/x-www-form-urlencoded`` (RFC 6749 §4.1.2), so
they are percent-decoded and ``+`` means a space. The bare and ``code#state``
forms are taken literally. The ambiguities this leaves are deliberate and
harmless in practice: a bare code that itself starts with ``http://`` or
contains ``?`` or ``code=`` cannot be pasted bare (paste the redirect URL
instead, where it is percent-encoded).

:func:`resolve_state` then checks the state carried by the paste (or given
separately) against the one the flow expects. A bare code carries no state and
is accepted: the code alone is useless without the flow's PKCE verifier.

Pure functions: no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlsplit

from keyrelay.auth.core.errors import InvalidArgument
from keyrelay.auth.core.pkce import states_equal

__all__ = ["MAX_PASTED_LEN", "PastedCode", "parse_pasted_code", "resolve_state"]

MAX_PASTED_LEN = 8192

# RFC 6749 Appendix A: code and state are 1*VSCHAR, VSCHAR = %x20-7E; a space
# can never survive a paste intact, so it is excluded (%x21-7E).
_VSCHAR_RE = re.compile(r"[\x21-\x7e]+")
_URL_PREFIX_RE = re.compile(r"https?://", re.IGNORECASE)
_QUERY_KEYS = frozenset({"code", "state", "error"})
# Bounds what the provider's error text can add to our message.
_PROVIDER_TEXT_MAX = 200

_START_OVER = "start a new connection"


@dataclass(frozen=True, slots=True, repr=False)
class PastedCode:
    """An authorization code and, when the paste carried one, its ``state``."""

    code: str
    state: str | None

    def __repr__(self) -> str:
        # Never the values: a code is redeemable until the flow ends.
        state = "None" if self.state is None else "<present>"
        return f"PastedCode(code=<{len(self.code)} chars>, state={state})"


def parse_pasted_code(text: str) -> PastedCode:
    """Extract the code (and state) from what a person pasted; see the module docstring."""
    text = text.strip()
    if not text:
        raise InvalidArgument(
            "no authorization code was given: paste the code, or the whole address the "
            "browser was sent to after you approved access"
        )
    if len(text) > MAX_PASTED_LEN:
        raise InvalidArgument(
            f"the pasted text is {len(text)} characters long, more than the "
            f"{MAX_PASTED_LEN} an authorization code or redirect address can be: "
            "copy only the code or the redirect address"
        )
    _reject_invisible(text)

    if _URL_PREFIX_RE.match(text):
        return _from_params(_url_params(text), "address")
    # The rest is read like the tail of a URL: "[path][?query][#fragment]".
    before_hash, _, fragment = text.partition("#")
    path, question, query = before_hash.partition("?")
    if not question and _has_query_key(path):
        query = path  # a bare "code=...&state=..."
    if question or _has_query_key(query) or _has_query_key(fragment):
        params = _parse_query(query)
        if not _has_code_or_error(params):
            params = _parse_query(fragment)
        return _from_params(params, "text")
    if "#" in text:
        return _from_code_hash_state(text)
    return PastedCode(code=_checked("code", text), state=None)


def resolve_state(pasted: PastedCode, explicit_state: str | None, expected_state: str) -> None:
    """Check the state of a pasted code against the flow's; raise InvalidArgument on mismatch.

    The state checked is the one inside the paste, else the one given
    separately (an empty string counts as absent). With no state at all the
    code is accepted: it is bound to the flow's PKCE verifier anyway.
    """
    explicit = explicit_state or None
    if (
        pasted.state is not None
        and explicit is not None
        and not states_equal(pasted.state, explicit)
    ):
        raise InvalidArgument(
            "the pasted code carries a state that differs from the state given "
            "separately: give the state only once, or paste the redirect address alone"
        )
    state = pasted.state if pasted.state is not None else explicit
    if state is None:
        return
    if not states_equal(state, expected_state):
        raise InvalidArgument(
            "state mismatch: this code belongs to a different connection attempt; paste the "
            "code from the page this connection opened (this one is still waiting for it)"
        )


def _reject_invisible(text: str) -> None:
    for index, char in enumerate(text):
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf"):
            kind = "a space or line break" if char.isspace() else "an invisible control character"
            raise InvalidArgument(
                f"the pasted text contains {kind} at position {index + 1}: copy the code or "
                "redirect address again as a single line, without spaces"
            )


def _has_query_key(text: str) -> bool:
    for field in text.split("&"):
        name, sep, _ = field.partition("=")
        if sep and name in _QUERY_KEYS:
            return True
    return False


def _parse_query(query: str) -> list[tuple[str, str]]:
    # Our own split rather than urllib.parse.parse_qsl: duplicates must be seen
    # (parse_qs merges them) and only "&" separates fields.
    pairs: list[tuple[str, str]] = []
    for field in query.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        pairs.append((unquote_plus(name), unquote_plus(value)))
    return pairs


def _has_code_or_error(params: list[tuple[str, str]]) -> bool:
    return any(name in ("code", "error") for name, _ in params)


def _url_params(url: str) -> list[tuple[str, str]]:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidArgument(
            "the pasted address is not a valid URL: copy the whole address from the "
            "browser's address bar again, or paste only the code"
        ) from exc
    params = _parse_query(parts.query)
    if not _has_code_or_error(params):
        params = _parse_query(parts.fragment)
    return params


def _values(params: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in params if key == name]


def _from_params(params: list[tuple[str, str]], where: str) -> PastedCode:
    errors = [value for value in _values(params, "error") if value]
    if errors:
        descriptions = [value for value in _values(params, "error_description") if value]
        detail = _provider_text(errors[0])
        if descriptions:
            detail += f" ({_provider_text(descriptions[0])})"
        raise InvalidArgument(f"the provider refused the authorization: {detail}; {_START_OVER}")

    codes = _values(params, "code")
    if not codes:
        raise InvalidArgument(
            f"the pasted {where} has no code parameter: after approving access, copy the "
            "whole address the browser was sent to (it contains ?code=...), or paste only "
            "the code"
        )
    if len(codes) > 1:
        raise InvalidArgument(
            f"the pasted {where} has more than one code parameter: copy the address "
            "again exactly as the browser shows it"
        )
    if not codes[0]:
        raise InvalidArgument(
            f"the code parameter in the pasted {where} is empty: copy the address again "
            f"after approving access, or {_START_OVER}"
        )
    states = _values(params, "state")
    if len(states) > 1:
        raise InvalidArgument(
            f"the pasted {where} has more than one state parameter: copy the address "
            "again exactly as the browser shows it"
        )
    code = _checked("code", codes[0])
    # An empty state is no state, as for the separately given one in resolve_state.
    state = _checked("state", states[0]) if states and states[0] else None
    return PastedCode(code=code, state=state)


def _from_code_hash_state(text: str) -> PastedCode:
    if text.count("#") > 1:
        raise InvalidArgument(
            "the pasted text has more than one '#': paste either the code alone or "
            "code#state exactly as the provider showed it"
        )
    code, _, state = text.partition("#")
    if not code:
        raise InvalidArgument(
            "nothing before the '#': the code is missing; paste the code#state text "
            "exactly as the provider showed it"
        )
    if not state:
        raise InvalidArgument(
            "nothing after the '#': the state is missing; paste the code#state text "
            "exactly as the provider showed it, or only the code without '#'"
        )
    return PastedCode(code=_checked("code", code), state=_checked("state", state))


def _checked(what: str, value: str) -> str:
    if not value:
        raise InvalidArgument(
            f"the {what} is empty: copy it again exactly as the provider showed it"
        )
    if _VSCHAR_RE.fullmatch(value) is None:
        position = next(i for i, c in enumerate(value) if not "\x21" <= c <= "\x7e") + 1
        hint = (
            " (a space, written '+' or '%20' in an address)" if value[position - 1] == " " else ""
        )
        raise InvalidArgument(
            f"the {what} contains a character that cannot be part of an OAuth {what} at "
            f"position {position}{hint}: copy it again exactly as the provider showed it"
        )
    return value


def _provider_text(text: str) -> str:
    # The provider's words go into our message: keep them printable and short.
    cleaned = "".join(c for c in text if c.isprintable())
    if len(cleaned) > _PROVIDER_TEXT_MAX:
        cleaned = cleaned[: _PROVIDER_TEXT_MAX - 1] + "…"
    return cleaned
