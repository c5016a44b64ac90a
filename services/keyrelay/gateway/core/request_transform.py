"""Request transforms of a route's profile (DESIGN §2.1). Pure functions, no I/O.

``transform_request`` = ``transform_headers`` + ``merge_query`` + ``transform_body``.
The input is never mutated; the output body shares every sub-object it did not
change with the input, and ``body_changed`` says whether the client's original
bytes can be forwarded as they are (no re-serialisation on the common path).

Headers, in this order
    1. Dropped: the client's ``x-api-key`` and ``authorization`` (a gateway key
       never reaches the upstream), hop-by-hop headers (RFC 9110 §7.6.1 plus any
       named in ``Connection``), ``host``, ``content-length``, ``expect``,
       ``accept-encoding`` and ``content-encoding`` (the HTTP client negotiates
       its own encoding and the body sent is the gateway's own serialisation),
       and the profile's ``strip_headers``.
    2. ``anthropic-beta``: the betas of every remaining client ``anthropic-beta``
       line (comma-separated, in order), then the profile's ``betas``,
       de-duplicated, as one comma-separated line (none if empty). A profile
       that strips ``anthropic-beta`` thus replaces the client's betas.
    3. ``set_headers`` replace any header of the same name.
    4. The upstream auth header is set last; ``Profile`` refuses ``set_headers``
       that would touch it.
    Names come out lower-case; values are untouched.

Body (validated only along the paths a transform reads: everything else is
the upstream's to judge, so the gateway is never stricter than the API)
    - ``system_preamble``: a text block at ``system[0]``. An absent or ``null``
      system becomes ``[preamble]``; a string becomes ``[preamble, {"type":
      "text", "text": system}]`` (an empty string is dropped: the API refuses
      empty text blocks); a list keeps its blocks as they are, ``cache_control``
      included, after the preamble.
    - ``tool_prefix``: custom tools (no ``type``, ``type: null`` or ``type:
      "custom"``) are renamed through a ``ToolNameTable``; typed tools (a
      versioned ``type`` such as ``web_search_20250305`` or ``bash_20250124``)
      are untouched. ``tool_choice`` ``{"type": "tool", "name": N}`` is renamed
      when N is one of the request's custom tools (any other N is left for the
      upstream to reject under the client's own name). In ``messages``, every
      ``tool_use`` block of an ``assistant`` message is renamed unless its name
      is a typed tool of this request: history written against earlier tool
      lists still matches what the model saw then, and nothing unprefixed
      reaches the upstream. ``server_tool_use`` and other block types are
      untouched. Every renamed name is in the returned table, which maps the
      response back.
    - Wrong shapes on those paths raise ``RequestShapeError`` (a 400
      ``invalid_request_error``) with the JSON path in the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any

from keyrelay.gateway.core import fast_json
from keyrelay.gateway.core.tool_names import (
    ALIAS_HASH_CHARS,
    MAX_TOOL_NAME_BYTES,
    ToolNameConflict,
    ToolNameTable,
)

__all__ = [
    "BETA_HEADER",
    "CLIENT_AUTH_HEADERS",
    "HOP_BY_HOP_HEADERS",
    "Headers",
    "Profile",
    "RequestShapeError",
    "TransformedRequest",
    "decode_json_body",
    "encode_json_body",
    "merge_query",
    "transform_body",
    "transform_headers",
    "transform_request",
]

Headers = Mapping[str, str] | Iterable[tuple[str, str]]

CLIENT_AUTH_HEADERS = frozenset({"x-api-key", "authorization"})
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the gateway's HTTP client for the body it really sends.
_CLIENT_SET_HEADERS = frozenset(
    {"host", "content-length", "expect", "accept-encoding", "content-encoding"}
)
# The gateway's own request headers (a pool's session): for the gateway only.
_GATEWAY_HEADERS = frozenset({"x-keyrelay-session"})
_ALWAYS_DROPPED = CLIENT_AUTH_HEADERS | HOP_BY_HOP_HEADERS | _CLIENT_SET_HEADERS | _GATEWAY_HEADERS
BETA_HEADER = "anthropic-beta"

# A header name is an RFC 9110 token; a value has no CR, LF or NUL.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
# CR/LF would split the header; beyond latin-1 it cannot go on the wire as HTTP/1.1 octets.
_BAD_HEADER_VALUE = re.compile(r"[\r\n\0]|[^\x00-\xff]")


class RequestShapeError(ValueError):
    """The request body cannot be transformed; the message names the JSON path."""


def _check_header_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not a valid header name")
    return name.lower()


def _check_header_value(value: object, where: str) -> str:
    if not isinstance(value, str) or _BAD_HEADER_VALUE.search(value):
        raise ValueError(f"{where}: header values must be latin-1 strings without CR, LF or NUL")
    return value


@dataclass(frozen=True, slots=True)
class Profile:
    """A route's transforms; every one is off by default.

    Validated on construction (a bad config fails at start, naming the field);
    header names are stored lower-case and sequences as tuples.
    """

    betas: tuple[str, ...] = ()
    strip_headers: tuple[str, ...] = ()
    set_headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    system_preamble: str | None = None
    tool_prefix: str | None = None

    def __post_init__(self) -> None:
        betas = tuple(self.betas)
        for beta in betas:
            if not isinstance(beta, str) or not beta.strip() or any(c in beta for c in ",\r\n\0"):
                raise ValueError(f"betas: {beta!r} is not a beta name")
        strip = tuple(_check_header_name(n, "strip_headers") for n in self.strip_headers)
        set_headers = tuple(
            (_check_header_name(n, "set_headers"), _check_header_value(v, "set_headers"))
            for n, v in self.set_headers
        )
        for name, _ in set_headers:
            if name in _ALWAYS_DROPPED:
                raise ValueError(
                    f"set_headers: {name!r} is managed by the gateway and cannot be set"
                )
        query = tuple((str(k), str(v)) for k, v in self.query)
        if self.system_preamble is not None and (
            not isinstance(self.system_preamble, str) or not self.system_preamble
        ):
            raise ValueError("system_preamble must be a non-empty string")
        if self.tool_prefix is not None:
            if not isinstance(self.tool_prefix, str) or not self.tool_prefix:
                raise ValueError("tool_prefix must be a non-empty string")
            if len(self.tool_prefix.encode("utf-8")) > MAX_TOOL_NAME_BYTES - ALIAS_HASH_CHARS:
                raise ValueError(
                    f"tool_prefix may be at most {MAX_TOOL_NAME_BYTES - ALIAS_HASH_CHARS} bytes"
                )
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "strip_headers", strip)
        object.__setattr__(self, "set_headers", set_headers)
        object.__setattr__(self, "query", query)


@dataclass(frozen=True, slots=True)
class TransformedRequest:
    """What the HTTP layer sends upstream, plus the table to map the response back."""

    headers: list[tuple[str, str]]
    query: tuple[tuple[str, str], ...]
    body: dict[str, Any]
    body_changed: bool
    tool_names: ToolNameTable | None

    def body_bytes(self, original: bytes | None = None) -> bytes:
        """The body to send: ``original`` itself when nothing changed."""
        if original is not None and not self.body_changed:
            return original
        return encode_json_body(self.body)


# -- JSON -------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body; ``RequestShapeError`` unless it is a JSON object."""
    try:
        body = fast_json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RequestShapeError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestShapeError("request body must be a JSON object")
    return body


def encode_json_body(body: object) -> bytes:
    """Compact UTF-8 JSON, the way the gateway sends every body it rewrote.

    A lone surrogate (JSON allows ``"\\ud800"``) cannot be UTF-8: such a body
    is sent with ASCII escapes instead, exactly as the client wrote it.
    """
    return fast_json.dumps(body, fast=False, allow_nan=False)


# -- headers and query --------------------------------------------------------


def _pairs(headers: Headers) -> Iterable[tuple[str, str]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def transform_headers(
    headers: Headers, profile: Profile, *, upstream_auth: tuple[str, str]
) -> list[tuple[str, str]]:
    """The headers to send upstream (see the module docstring for the rules)."""
    auth_name = _check_header_name(upstream_auth[0], "upstream_auth")
    auth_value = _check_header_value(upstream_auth[1], "upstream_auth")
    pairs = [(name.lower(), value) for name, value in _pairs(headers)]
    dropped: Set[str] = (
        _ALWAYS_DROPPED.union(profile.strip_headers) if profile.strip_headers else _ALWAYS_DROPPED
    )
    for name, value in pairs:
        if name == "connection":
            more = set(dropped)  # a copy: never the shared constant
            more.update(t.strip().lower() for t in value.split(",") if t.strip())
            dropped = more
    out: list[tuple[str, str]] = []
    betas: list[str] = []
    for name, value in pairs:
        if name in dropped:
            continue
        if name == BETA_HEADER:
            betas.extend(b.strip() for b in value.split(","))
            continue
        out.append((name, value))
    betas.extend(profile.betas)
    merged = list(dict.fromkeys(b for b in betas if b))
    if merged:
        out.append((BETA_HEADER, ",".join(merged)))
    if profile.set_headers:
        replaced = {name for name, _ in profile.set_headers}
        out = [(n, v) for n, v in out if n not in replaced]
        out.extend(profile.set_headers)
    out = [(n, v) for n, v in out if n != auth_name]
    out.append((auth_name, auth_value))
    return out


def merge_query(
    client_query: Iterable[tuple[str, str]], profile: Profile
) -> tuple[tuple[str, str], ...]:
    """The client's query parameters, then the profile's; a profile parameter
    replaces every client parameter of the same name."""
    if not profile.query:
        return tuple(client_query)
    names = {name for name, _ in profile.query}
    kept = tuple((k, v) for k, v in client_query if k not in names)
    return kept + profile.query


# -- body ---------------------------------------------------------------------


def _with_preamble(system: object, preamble: str) -> list[Any]:
    block: dict[str, Any] = {"type": "text", "text": preamble}
    if system is None:
        return [block]
    if isinstance(system, str):
        return [block, {"type": "text", "text": system}] if system else [block]
    if isinstance(system, list):
        return [block, *system]
    raise RequestShapeError("system must be a string or an array of content blocks")


def _is_custom(tool: dict[str, Any], where: str) -> bool:
    kind = tool.get("type")
    if kind is None or kind == "custom":
        return True
    if not isinstance(kind, str):
        raise RequestShapeError(f"{where}.type must be a string")
    return False


def _prefix_tools(
    body: dict[str, Any], out: dict[str, Any], table: ToolNameTable
) -> tuple[bool, set[str], set[str]]:
    """Rename custom tools into ``out``; return (changed, custom names, typed names)."""
    tools = body.get("tools")
    custom: set[str] = set()
    typed: set[str] = set()
    if tools is None:
        return False, custom, typed
    if not isinstance(tools, list):
        raise RequestShapeError("tools must be an array")
    new_tools: list[Any] = []
    changed = False
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise RequestShapeError(f"{where} must be an object")
        name = tool.get("name")
        if _is_custom(tool, where):
            if not isinstance(name, str) or not name:
                raise RequestShapeError(f"{where}.name must be a non-empty string")
            custom.add(name)
            upstream = table.add(name)
            if upstream != name:
                new_tools.append({**tool, "name": upstream})
                changed = True
                continue
        elif isinstance(name, str):
            typed.add(name)
        new_tools.append(tool)
    if changed:
        out["tools"] = new_tools
    return changed, custom, typed


def _prefix_tool_choice(
    body: dict[str, Any], out: dict[str, Any], table: ToolNameTable, custom: set[str]
) -> bool:
    choice = body.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") != "tool":
        return False
    name = choice.get("name")
    if not isinstance(name, str):
        raise RequestShapeError('tool_choice.name must be a string when tool_choice.type is "tool"')
    if name not in custom:
        return False
    out["tool_choice"] = {**choice, "name": table.add(name)}
    return True


def _prefix_history(
    body: dict[str, Any], out: dict[str, Any], table: ToolNameTable, typed: set[str]
) -> bool:
    messages = body.get("messages")
    if messages is None:
        return False
    if not isinstance(messages, list):
        raise RequestShapeError("messages must be an array")
    new_messages: list[Any] | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestShapeError(f"messages[{i}] must be an object")
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, list):
            continue
        new_content: list[Any] | None = None
        for j, block in enumerate(content):
            if not isinstance(block, dict):
                raise RequestShapeError(f"messages[{i}].content[{j}] must be an object")
            if block.get("type") != "tool_use":
                continue
            name = block.get("name")
            if not isinstance(name, str) or not name:
                raise RequestShapeError(
                    f"messages[{i}].content[{j}].name must be a non-empty string"
                )
            if name in typed:
                continue
            if new_content is None:
                new_content = list(content)
            new_content[j] = {**block, "name": table.add(name)}
        if new_content is not None:
            if new_messages is None:
                new_messages = list(messages)
            new_messages[i] = {**message, "content": new_content}
    if new_messages is None:
        return False
    out["messages"] = new_messages
    return True


def transform_body(
    body: object, profile: Profile
) -> tuple[dict[str, Any], ToolNameTable | None, bool]:
    """Apply ``system_preamble`` and ``tool_prefix``.

    Returns ``(body, tool_names, changed)``; ``tool_names`` is ``None`` when the
    profile has no ``tool_prefix``. ``body`` is a new dict only if ``changed``.
    """
    if not isinstance(body, dict):
        raise RequestShapeError("request body must be a JSON object")
    out = dict(body)
    changed = False
    if profile.system_preamble is not None:
        out["system"] = _with_preamble(body.get("system"), profile.system_preamble)
        changed = True
    table: ToolNameTable | None = None
    if profile.tool_prefix is not None:
        table = ToolNameTable(profile.tool_prefix)
        try:
            tools_changed, custom, typed = _prefix_tools(body, out, table)
            choice_changed = _prefix_tool_choice(body, out, table, custom)
            history_changed = _prefix_history(body, out, table, typed)
        except ToolNameConflict as exc:
            raise RequestShapeError(str(exc)) from None
        changed = changed or tools_changed or choice_changed or history_changed
    return (out if changed else body), table, changed


def transform_request(
    body: object,
    headers: Headers,
    profile: Profile,
    *,
    upstream_auth: tuple[str, str],
    query: Iterable[tuple[str, str]] = (),
) -> TransformedRequest:
    """Everything the profile does to one request (see the module docstring)."""
    new_body, table, changed = transform_body(body, profile)
    return TransformedRequest(
        headers=transform_headers(headers, profile, upstream_auth=upstream_auth),
        query=merge_query(query, profile),
        body=new_body,
        body_changed=changed,
        tool_names=table,
    )
