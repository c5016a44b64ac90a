"""Custom tool names on the way up (prefix or alias) and back down. No I/O.

A route's profile may set ``tool_prefix``. Every custom tool name the gateway
sends upstream gets exactly one prefix, and every name that comes back loses
exactly one, so a client tool really called ``mcp_x`` goes up as ``mcp_mcp_x``
and comes back as ``mcp_x``.

The upstream limits tool names to 64 bytes. When ``prefix + name`` would be
longer (counted in UTF-8), the name goes up as an *alias*: the prefix followed
by the first 16 hex digits of the SHA-256 of the name's UTF-8 bytes. The alias
is deterministic (the same in every worker and every process, so prompt caching
upstream keeps working across requests) and it is mapped back through the
request's own table.

Names that come back without being in the table (the model named a tool the
request never sent) lose one prefix if they have it and are left alone
otherwise: everything the gateway sent had the prefix, and a name without it
cannot have come from the gateway.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "ALIAS_HASH_CHARS",
    "MAX_TOOL_NAME_BYTES",
    "ToolNameConflict",
    "ToolNameTable",
    "upstream_tool_name",
]

MAX_TOOL_NAME_BYTES = 64
ALIAS_HASH_CHARS = 16


class ToolNameConflict(ValueError):
    """Two different client names would reach the upstream as the same name."""


def _utf8_len(text: str) -> int:
    if text.isascii():
        return len(text)
    # "surrogatepass": JSON can carry lone surrogates; count them, never crash.
    return len(text.encode("utf-8", "surrogatepass"))


def upstream_tool_name(prefix: str, name: str) -> str:
    """The name the upstream sees for the client tool ``name``."""
    candidate = prefix + name
    if _utf8_len(candidate) <= MAX_TOOL_NAME_BYTES:
        return candidate
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return prefix + digest[:ALIAS_HASH_CHARS]


class ToolNameTable:
    """The tool names of one request: client name <-> upstream name."""

    __slots__ = ("_prefix", "_to_client", "_to_upstream")

    def __init__(self, prefix: str) -> None:
        if not prefix:
            raise ValueError("a tool prefix must not be empty")
        if _utf8_len(prefix) + ALIAS_HASH_CHARS > MAX_TOOL_NAME_BYTES:
            raise ValueError(
                f"a tool prefix may be at most {MAX_TOOL_NAME_BYTES - ALIAS_HASH_CHARS} bytes "
                "(room is needed for an alias)"
            )
        self._prefix = prefix
        self._to_upstream: dict[str, str] = {}
        self._to_client: dict[str, str] = {}

    @property
    def prefix(self) -> str:
        return self._prefix

    def add(self, name: str) -> str:
        """Record the client tool ``name``; return the name to send upstream."""
        known = self._to_upstream.get(name)
        if known is not None:
            return known
        upstream = upstream_tool_name(self._prefix, name)
        other = self._to_client.get(upstream)
        if other is not None:
            raise ToolNameConflict(
                f"tool names {other!r} and {name!r} would both be sent upstream as {upstream!r}"
            )
        self._to_upstream[name] = upstream
        self._to_client[upstream] = name
        return upstream

    def upstream(self, name: str) -> str | None:
        """The upstream name recorded for the client name ``name``, if any."""
        return self._to_upstream.get(name)

    def to_client(self, upstream_name: str) -> str:
        """Map a name from the upstream back to the client's name."""
        name = self._to_client.get(upstream_name)
        if name is not None:
            return name
        if upstream_name.startswith(self._prefix):
            return upstream_name[len(self._prefix) :]
        return upstream_name

    def items(self) -> list[tuple[str, str]]:
        """(client name, upstream name) pairs, in the order they were added."""
        return list(self._to_upstream.items())

    def __len__(self) -> int:
        return len(self._to_upstream)

    def __contains__(self, name: object) -> bool:
        return name in self._to_upstream

    def __repr__(self) -> str:
        return f"ToolNameTable(prefix={self._prefix!r}, names={self._to_upstream!r})"
