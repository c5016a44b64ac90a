"""Gateway keys: minted once, stored only as a SHA-256 hash in the config."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "kr-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def config_entry(key: str, *, account: str, name: str) -> str:
    """The TOML to paste into the gateway config for ``key``."""
    return (
        "[[keys]]\n"
        f'name = "{name}"\n'
        f'hash = "{key_hash(key)}"\n'
        f'account = "{account}"\n'
        'mode = "oauth"        # or "api_key" / "auto" (with api_key = { env = "VAR" })\n'
        'profile = "default"\n'
        'upstream = "default"\n'
    )
