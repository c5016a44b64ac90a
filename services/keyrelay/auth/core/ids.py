"""Account ids: one syntax wherever an account is named (an RPC's ``account_id``, a
gateway key's ``route.account_id``). No I/O."""

from __future__ import annotations

import re

from keyrelay.auth.core.errors import InvalidArgument

ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}\Z")


def validate_account_id(account_id: str, field: str = "account_id") -> str:
    """``account_id``, or ``InvalidArgument`` naming ``field``."""
    if not ACCOUNT_ID.match(account_id):
        raise InvalidArgument(
            f"{field} must be 1-128 characters of letters, digits and ._@+- "
            "starting with a letter or digit"
        )
    return account_id
