"""Gateway keys: minted once, stored only as a SHA-256 hash in the config."""

from __future__ import annotations

import hashlib
import secrets

import tomli_w

KEY_PREFIX = "kr-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def config_entry(key: str, *, account: str, name: str) -> str:
    """The TOML to paste into the gateway config for ``key``.

    Written by a TOML serialiser, so a name or account with quotes or
    backslashes stays one string instead of breaking (or extending) the config.
    """
    entry = {
        "name": name,
        "hash": key_hash(key),
        "account": account,
        "mode": "oauth",
        "profile": "default",
        "upstream": "default",
    }
    return (
        tomli_w.dumps({"keys": [entry]})
        + '# mode: "oauth", "api_key" or "auto" (these two need api_key = { env = "VAR" })\n'
    )
