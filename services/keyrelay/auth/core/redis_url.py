"""Redis URLs, the Sentinel forms included: checked and parsed, no I/O.

keyrelay takes the URLs that redis-py opens itself (``redis://``, ``rediss://``,
``unix://``) and two for a primary that Redis Sentinel elects::

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db][?query]
    rediss+sentinel://...     the same with TLS, to the sentinels and to the primary

- The hosts are the sentinels (any one of them answering is enough); a port
  defaults to 26379. An IPv6 address is written in brackets: ``[::1]:26379``.
- ``service_name`` is the name in ``sentinel monitor <name> ...``;
  ``db`` defaults to 0.
- The credentials before ``@`` are the primary's (and so its replicas', which
  become primaries on failover). Sentinels often have none, or their own: the
  query parameters ``sentinel_username`` and ``sentinel_password``, the only
  ones accepted.
- Reserved characters (``@ : / , ? # & % =``) in a username or password are
  percent-encoded.

Error messages never quote a username or password: they say which part is
wrong and quote at most a host entry, a path part or a parameter name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "DIRECT_SCHEMES",
    "SENTINEL_QUERY_KEYS",
    "SENTINEL_SCHEMES",
    "DirectUrl",
    "RedisUrlError",
    "SentinelUrl",
    "parse_redis_url",
]

DIRECT_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_QUERY_KEYS = ("sentinel_username", "sentinel_password")
DEFAULT_SENTINEL_PORT = 26379
MAX_DB = 2**31 - 1

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_DIGITS = re.compile(r"[0-9]+")
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


class RedisUrlError(ValueError):
    """The URL is malformed; the message names the part and never quotes a password."""


@dataclass(frozen=True, slots=True)
class DirectUrl:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL, opened by redis-py as it is."""

    url: str = field(repr=False)  # may carry a password


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A ``redis+sentinel://`` or ``rediss+sentinel://`` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def to_url(self) -> str:
        """The canonical URL: explicit ports, the db, reserved characters percent-encoded."""
        scheme = SENTINEL_SCHEMES[1] if self.tls else SENTINEL_SCHEMES[0]
        auth = ""
        if self.password is not None:
            auth = f"{_encode(self.username or '')}:{_encode(self.password)}@"
        hosts = ",".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.sentinels
        )
        query = "&".join(
            f"{name}={_encode(value)}"
            for name, value in (
                ("sentinel_username", self.sentinel_username),
                ("sentinel_password", self.sentinel_password),
            )
            if value is not None
        )
        return f"{scheme}://{auth}{hosts}/{self.service_name}/{self.db}" + (
            f"?{query}" if query else ""
        )


def _encode(value: str) -> str:
    return quote(value, safe="")


def _decode(value: str, what: str) -> str:
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise RedisUrlError(f"{what} is not valid percent-encoded UTF-8") from None


def parse_redis_url(url: str) -> DirectUrl | SentinelUrl:
    """Checks a Redis URL; raises RedisUrlError (no password in its message)."""
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme in DIRECT_SCHEMES:
        return DirectUrl(url)
    if scheme not in SENTINEL_SCHEMES:
        raise RedisUrlError(
            "must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"
        )
    rest = url[len(scheme) + 1 :]
    if not rest.startswith("//"):
        raise RedisUrlError(f"expected {scheme}://hosts/service_name")
    return _parse_sentinel(rest[2:], tls=scheme == SENTINEL_SCHEMES[1])


def _parse_sentinel(rest: str, *, tls: bool) -> SentinelUrl:
    # The credentials end at the last '@': a password's reserved characters are
    # percent-encoded, so what follows it is hosts, path and query only, and a
    # message quoting those cannot quote the password.
    userinfo, at, after = rest.rpartition("@")
    username, password = _parse_userinfo(userinfo) if at else (None, None)
    if "#" in after:
        raise RedisUrlError("a sentinel URL has no #fragment")
    location, question, query = after.partition("?")
    hosts, slash, path = location.partition("/")
    sentinels = _parse_hosts(hosts)
    if not slash or not path:
        raise RedisUrlError("the service name is missing: .../service_name[/db]")
    service_name, db = _parse_path(path)
    sentinel_username, sentinel_password = _parse_query(query) if question else (None, None)
    return SentinelUrl(
        sentinels=sentinels,
        service_name=service_name,
        db=db,
        tls=tls,
        username=username,
        password=password,
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
    )


def _parse_userinfo(userinfo: str) -> tuple[str | None, str]:
    if any(c in userinfo for c in "/?#"):
        raise RedisUrlError(
            "the credentials before '@' hold '/', '?' or '#': percent-encode them "
            "(%2F, %3F, %23), and '@' as %40"
        )
    raw_username, colon, raw_password = userinfo.partition(":")
    if not colon:
        raise RedisUrlError(
            "credentials must be [username]:password@ (a lone name before '@' is ambiguous)"
        )
    if ":" in raw_password:
        raise RedisUrlError("the password holds ':': percent-encode it as %3A")
    password = _decode(raw_password, "the password")
    if not password:
        raise RedisUrlError("the password before '@' is empty")
    username = _decode(raw_username, "the username")
    return username or None, password


def _parse_hosts(hosts: str) -> tuple[tuple[str, int], ...]:
    if not hosts:
        raise RedisUrlError("no sentinel host: expected host[:port][,host[:port]...]")
    parsed: list[tuple[str, int]] = []
    for index, entry in enumerate(hosts.split(","), start=1):
        where = f"sentinel host {index}"
        if not entry:
            raise RedisUrlError(f"{where} is empty (a stray ',')")
        host, port = _parse_host(entry, f"{where} ({entry!r})")
        if (host.lower(), port) in {(h.lower(), p) for h, p in parsed}:
            raise RedisUrlError(f"{where} ({entry!r}) appears twice")
        parsed.append((host, port))
    return tuple(parsed)


def _parse_host(entry: str, where: str) -> tuple[str, int]:
    if entry.startswith("["):
        inner, bracket, tail = entry[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise RedisUrlError(f"{where}: expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise RedisUrlError(f"{where}: not an IPv6 address in brackets") from None
        host, port = inner, tail[1:] if tail else None
    else:
        host, colon, raw_port = entry.partition(":")
        if ":" in raw_port:
            raise RedisUrlError(f"{where}: an IPv6 address needs brackets, [addr]:port")
        port = raw_port if colon else None
        if len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise RedisUrlError(f"{where}: not a host name or IPv4 address")
    if port is None:
        return host, DEFAULT_SENTINEL_PORT
    if not _DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise RedisUrlError(f"{where}: the port must be a number from 1 to 65535")
    return host, int(port)


def _parse_path(path: str) -> tuple[str, int]:
    parts = path.split("/")
    if len(parts) > 2:
        raise RedisUrlError(f"stray path part {'/'.join(parts[2:])!r}: expected /service_name[/db]")
    service_name = parts[0]
    if not service_name:
        raise RedisUrlError("the service name is empty: expected /service_name[/db]")
    if not _SERVICE_NAME.fullmatch(service_name):
        raise RedisUrlError(
            f"service name {service_name!r}: use letters, digits, '.', '_' and '-' (up to 128)"
        )
    if len(parts) == 1:
        return service_name, 0
    db = parts[1]
    if not _DIGITS.fullmatch(db) or int(db) > MAX_DB:
        raise RedisUrlError(f"db {db!r}: must be a number from 0 to {MAX_DB}")
    return service_name, int(db)


def _parse_query(query: str) -> tuple[str | None, str | None]:
    values: dict[str, str] = {}
    for item in query.split("&"):
        name, equals, raw = item.partition("=")
        if not _PARAM_NAME.fullmatch(name):
            raise RedisUrlError(
                "a malformed query parameter: expected sentinel_username=...&sentinel_password=..."
            )
        if name not in SENTINEL_QUERY_KEYS:
            raise RedisUrlError(
                f"unknown query parameter {name!r}: only {' and '.join(SENTINEL_QUERY_KEYS)}"
            )
        if name in values:
            raise RedisUrlError(f"query parameter {name} appears twice")
        value = _decode(raw, f"query parameter {name}")
        if not equals or not value:
            raise RedisUrlError(f"query parameter {name} is empty")
        values[name] = value
    if "sentinel_username" in values and "sentinel_password" not in values:
        raise RedisUrlError("sentinel_username needs sentinel_password as well")
    return values.get("sentinel_username"), values.get("sentinel_password")
