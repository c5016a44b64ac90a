"""PKCE (RFC 7636) and the ``state`` nonce of an authorization request.

The verifier is the only thing that binds an authorization code to the flow
that asked for it: whoever holds the code but not the verifier cannot redeem
it. So the verifier comes from ``secrets`` and is checked against the RFC's
grammar before we derive a challenge from it, and the only challenge method
offered is ``S256`` (``plain`` would send the verifier itself over the front
channel).

``state`` guards against a code from a *different* attempt being pasted or
redirected into this one; it is compared in constant time so a caller cannot
learn it byte by byte from response timings.

Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

__all__ = [
    "VERIFIER_MAX_LEN",
    "VERIFIER_MIN_LEN",
    "is_valid_verifier",
    "new_state",
    "new_verifier",
    "s256_challenge",
    "states_equal",
]

VERIFIER_MIN_LEN = 43
VERIFIER_MAX_LEN = 128

# RFC 7636 §4.1: code-verifier = 43*128unreserved,
# unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~".
# fullmatch + explicit ASCII classes: `\w` would admit non-ASCII letters and `$` a trailing "\n".
_VERIFIER_RE = re.compile(rf"[A-Za-z0-9\-._~]{{{VERIFIER_MIN_LEN},{VERIFIER_MAX_LEN}}}")


def new_verifier(nbytes: int = 32) -> str:
    """Return a fresh code verifier built from ``nbytes`` random bytes.

    32 bytes (256 bits, 43 characters) is what RFC 7636 §4.1 recommends. A
    size whose encoding falls outside 43-128 characters is refused rather than
    silently padded or truncated.
    """
    # Checked before drawing: token_urlsafe(n) always yields ceil(4n/3) characters.
    length = -(-4 * nbytes // 3) if nbytes > 0 else 0
    if not VERIFIER_MIN_LEN <= length <= VERIFIER_MAX_LEN:
        raise ValueError(
            f"a PKCE verifier from {nbytes} random bytes would be {length} characters long; "
            f"RFC 7636 needs {VERIFIER_MIN_LEN}-{VERIFIER_MAX_LEN}: use 32 to 96 bytes"
        )
    verifier = secrets.token_urlsafe(nbytes)
    if not is_valid_verifier(verifier):  # pragma: no cover - guards the arithmetic above
        raise ValueError("secrets.token_urlsafe produced an invalid PKCE verifier")
    return verifier


def is_valid_verifier(verifier: str) -> bool:
    """True when ``verifier`` is 43-128 characters of ``[A-Za-z0-9-._~]``."""
    return _VERIFIER_RE.fullmatch(verifier) is not None


def s256_challenge(verifier: str) -> str:
    """The ``S256`` code challenge: BASE64URL(SHA256(ASCII(verifier))) without padding."""
    if not is_valid_verifier(verifier):
        # The value itself stays out of the message: it is a secret.
        raise ValueError(
            f"not a valid PKCE verifier ({len(verifier)} characters): RFC 7636 needs "
            f"{VERIFIER_MIN_LEN}-{VERIFIER_MAX_LEN} characters of A-Z a-z 0-9 - . _ ~"
        )
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_state() -> str:
    """A fresh, unguessable ``state`` value (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def states_equal(a: str, b: str) -> bool:
    """Compare two state values in constant time (for equal lengths).

    ``surrogatepass`` keeps the function total: a lone surrogate in pasted text
    must compare unequal, not raise. The encoding stays injective, so distinct
    strings never compare equal.
    """
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )
