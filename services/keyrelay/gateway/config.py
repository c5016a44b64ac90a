"""The gateway's config: ``[gateway]``, ``[profiles]``, ``[upstreams]``, ``[pools]``,
``[[keys]]``, ``[accounts]``, ``[prices]``.

Read with ``keyrelay.configfile`` (TOML, secrets, errors naming the key). Every
default is written once: a dataclass field's default or a named constant, which
the parser reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from keyrelay.configfile import (
    ConfigError,
    ReadFile,
    Section,
    TracingConfig,
    check_log_level,
    check_url,
    close_match,
    parse_file,
    parse_listen,
    parse_tracing,
    read_text_file,
    resolve_secret,
)
from keyrelay.gateway.core.pools import MIN_COOL_SECONDS, Member, Pool, Strategy
from keyrelay.gateway.core.ratelimit import Subject
from keyrelay.gateway.core.request_transform import Profile
from keyrelay.gateway.core.usage import Price, PriceTable
from keyrelay.limit_rules import Limits, LimitsError

# gRPC keepalive to the auth service: the gateway pings every DEFAULT_KEEPALIVE_SECONDS;
# the auth server permits that (auth.min_client_ping_interval_seconds, keyrelay.auth.config).
DEFAULT_KEEPALIVE_SECONDS = 30.0

Mode = Literal["oauth", "api_key", "auto"]
MODES: tuple[Mode, ...] = ("oauth", "api_key", "auto")
# A route's mode: a credential's, or "pool" for a key that names a pool (DESIGN §6.3).
RouteMode = Literal["oauth", "api_key", "auto", "pool"]
KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}\Z")
# A [[keys]] entry without mode, profile or upstream takes these. A pool member
# without mode takes DEFAULT_MODE too, unless it has an api_key and no account:
# then "api_key" (the only mode it can have).
DEFAULT_MODE: Mode = "oauth"
DEFAULT_PROFILE = "default"  # always defined: the empty profile, unless [profiles.default]
DEFAULT_UPSTREAM = "default"
OnStoreError = Literal["allow", "deny"]
ON_STORE_ERROR: tuple[OnStoreError, ...] = ("allow", "deny")
LIMITS_STORE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``[upstreams.<name>]``; these defaults are the parser's (README: the reasons)."""

    name: str
    url: str
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 600.0
    max_connections: int = 256
    # A request waits at most this long for a pooled connection, and at most
    # max_waiting requests wait: beyond either, 503 overloaded_error.
    pool_timeout_seconds: float = 5.0
    max_waiting: int = 256
    # Below the 5 s keep-alive of common servers (Node, Apache, uvicorn): the
    # gateway drops an idle connection before the server would.
    idle_timeout_seconds: float = 4.0
    ca_file: str | None = None  # replaces the system trust store for this upstream
    cert_file: str | None = None  # client certificate (mTLS)
    key_file: str | None = None
    proxy_url: str | None = None  # http://host:port, reached with CONNECT
    proxy_credentials: str | None = field(default=None, repr=False)  # "user:password"


# The defaults of every [upstreams.<name>] key, from UpstreamConfig's fields.
_UPSTREAM_DEFAULTS = UpstreamConfig(name="", url="")


@dataclass(frozen=True, slots=True)
class PoolMember:
    """A credential of ``[pools.<name>] members``. ``id`` is stable across workers,
    restarts and reorderings of the config (affinity hashing and the shared
    cool-downs use it): ``account:<account>`` when it has an account, else
    ``key:<name>``. ``name`` is for display: the given ``name``, else the account.
    ``mode``, ``account`` and ``api_key`` mean what they mean on a key."""

    id: str
    mode: Mode
    account: str | None
    api_key: str | None = field(repr=False)
    name: str


# [pools.<name>] cool-downs, in seconds: each key is at least pools.MIN_COOL_SECONDS
# (the floor cool_down_until applies anyway) and at most this.
COOL_DOWN_MAXIMA: Mapping[str, float] = {
    "default_cool_down_seconds": 3600.0,
    "max_cool_down_seconds": 86400.0,
}


@dataclass(frozen=True, slots=True)
class PoolRoute:
    """``[pools.<name>]``: the credentials a pool key's requests go to (DESIGN §6.3).
    ``members[i]`` is ``pool.members[i]``'s credential; every key naming the pool
    shares this one object. These defaults, and ``Pool``'s strategy, are the parser's."""

    pool: Pool
    members: tuple[PoolMember, ...]
    default_cool_down_seconds: float = 30.0  # when the upstream's answer gives no reset
    max_cool_down_seconds: float = 3600.0  # the cap on any reset the upstream gives


# The defaults of every [pools.<name>] key, from PoolRoute's and Pool's fields.
_POOL_DEFAULTS = PoolRoute(pool=Pool("", (Member("-"),)), members=())


@dataclass(frozen=True, slots=True)
class Route:
    """What one gateway key maps to. ``api_key`` is the upstream key, never the gateway key.

    A key that names a pool has mode ``"pool"``, ``pool`` set, and neither
    ``account`` nor ``api_key``: its credentials are the pool's members, never
    the route's own. Its ``subjects`` are the key alone (its own limits): an
    account's limits belong to one account, and a pool's request may go to any.
    """

    name: str
    account: str | None
    mode: RouteMode
    profile_name: str
    profile: Profile
    upstream: UpstreamConfig
    api_key: str | None = field(default=None, repr=False)
    # What admission checks (the key, then its account), when either has limits;
    # empty: no limits anywhere, and no call to the limits store.
    subjects: tuple[Subject, ...] = ()
    pool: PoolRoute | None = None  # mode "pool" only


@dataclass(frozen=True, slots=True)
class LimitsStoreConfig:
    """``[gateway.limits]``: the shared counters of limits and budgets (README,
    "Limits and budgets"); these defaults are the parser's."""

    # Connects as the gateway's Redis ACL user, so it carries that user's password.
    redis_url: str = field(repr=False)
    key_prefix: str = "keyrelay:"  # the counters live under <key_prefix>limits:
    on_store_error: OnStoreError = "allow"  # the store unreachable: serve, or 503
    timeout_seconds: float = 0.5  # a store call gives up after this (never a hang)


_LIMITS_STORE_DEFAULTS = LimitsStoreConfig(redis_url="")


@dataclass(frozen=True, slots=True)
class AuthClientConfig:
    target: str
    token: str = field(repr=False)
    timeout_seconds: float = 40.0
    # HTTP/2 pings on the channel (they find a dead connection under an idle event
    # stream); auth.min_client_ping_interval_seconds must permit them.
    keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


# The defaults of every [gateway.auth] key, from AuthClientConfig's fields.
_AUTH_CLIENT_DEFAULTS = AuthClientConfig(target="", token="")


@dataclass(frozen=True, slots=True)
class FrontDoorConfig:
    """A worker's bounds on its clients' connections: flat keys of ``[gateway]``
    (README: the answer a client gets at each); these defaults are the parser's."""

    max_connections: int = 1000  # open at once, per worker; beyond: 503, closed
    listen_backlog: int = 1024  # connections the kernel queues before the worker accepts them
    max_header_bytes: int = 32 << 10  # request line + headers; beyond: 431, closed
    max_header_count: int = 100  # beyond: 431, closed
    header_timeout_seconds: float = 10.0  # a head's first byte to its end; beyond: 408, closed
    # A head's end to its body's end, however the bytes come (a total, so that a
    # trickle cannot hold the request); beyond: 408, closed.
    body_timeout_seconds: float = 60.0
    first_byte_timeout_seconds: float = 10.0  # a new connection silent this long: closed


_FRONT_DOOR_DEFAULTS = FrontDoorConfig()


def _parse_front_door(gateway: Section) -> FrontDoorConfig:
    d = _FRONT_DOOR_DEFAULTS
    return FrontDoorConfig(
        max_connections=gateway.integer("max_connections", d.max_connections, minimum=1),
        listen_backlog=gateway.integer("listen_backlog", d.listen_backlog, minimum=1),
        max_header_bytes=gateway.integer("max_header_bytes", d.max_header_bytes, minimum=1024),
        max_header_count=gateway.integer("max_header_count", d.max_header_count, minimum=8),
        header_timeout_seconds=gateway.number(
            "header_timeout_seconds", d.header_timeout_seconds, minimum=0.1
        ),
        body_timeout_seconds=gateway.number(
            "body_timeout_seconds", d.body_timeout_seconds, minimum=0.1
        ),
        first_byte_timeout_seconds=gateway.number(
            "first_byte_timeout_seconds", d.first_byte_timeout_seconds, minimum=0.1
        ),
    )


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    routes: Mapping[str, Route]  # by key hash, "sha256:<hex>"
    auth: AuthClientConfig | None
    prices: PriceTable
    listen: str = "127.0.0.1:8080"
    max_request_bytes: int = 10 << 20
    max_event_bytes: int = 1 << 20
    token_skew_seconds: float = 30.0
    log_level: str = "info"
    tracing: TracingConfig = field(default_factory=TracingConfig)
    front_door: FrontDoorConfig = _FRONT_DOOR_DEFAULTS
    limits: LimitsStoreConfig | None = None  # [gateway.limits]; None: no limits store
    # By name, for the keys created at runtime (keyrelay.gateway.key_book): a runtime
    # key's route names a profile and an upstream of the config, and its account's
    # limits are the config's [accounts.<id>.limits].
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    account_limits: Mapping[str, Limits] = field(default_factory=dict)
    # [pools.<name>], by name: config keys' and runtime keys' (by name too).
    pools: Mapping[str, PoolRoute] = field(default_factory=dict)


# The defaults of every flat [gateway] key, from GatewayConfig's fields.
_GATEWAY_DEFAULTS = GatewayConfig(routes={}, auth=None, prices=PriceTable())


def _parse_profile(name: str, section: Section) -> Profile:
    set_headers = section.table("set_headers")
    query = section.table("query")
    for table in (set_headers, query):
        for key, value in table.data.items():
            if not isinstance(value, str):
                raise ConfigError(f"{table.key(key)}: must be a string")
    try:
        profile = Profile(
            betas=section.strings("betas"),
            strip_headers=section.strings("strip_headers"),
            set_headers=tuple(set_headers.data.items()),
            query=tuple(query.data.items()),
            system_preamble=section.optional_string("system_preamble"),
            tool_prefix=section.optional_string("tool_prefix"),
        )
    except ValueError as exc:
        raise ConfigError(f"{section.path}: {exc}") from None
    section.reject_unknown()
    return profile


def _parse_upstream(
    name: str, section: Section, env: Mapping[str, str], read_file: ReadFile
) -> UpstreamConfig:
    url = check_url(section, "url", section.string("url")).rstrip("/")
    # The gateway's client sends to host:port with the URL's path as a prefix:
    # anything else in the URL would be ignored, or fail at the first request.
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    except ValueError:
        raise ConfigError(f"{section.key('url')}: the port is not a number 0-65535") from None
    if not parts.hostname or parts.username is not None or parts.query or parts.fragment:
        raise ConfigError(
            # Not echoed: the URL may hold a password.
            f"{section.key('url')}: must be scheme://host[:port][/path], "
            "without credentials, query or fragment"
        )
    defaults = _UPSTREAM_DEFAULTS
    tls_files = {
        "ca_file": section.optional_string("ca_file"),
        "cert_file": section.optional_string("cert_file"),
        "key_file": section.optional_string("key_file"),
    }
    for key, value in tls_files.items():
        if value is not None and parts.scheme != "https":
            raise ConfigError(f"{section.key(key)}: only for an https upstream URL")
    if tls_files["key_file"] is not None and tls_files["cert_file"] is None:
        raise ConfigError(f"{section.key('cert_file')}: required with key_file (mTLS)")
    proxy_url = section.optional_string("proxy_url")
    if proxy_url is not None:
        if not _plain_proxy_url(proxy_url):
            raise ConfigError(
                # Not echoed: the URL may hold a password (it belongs in proxy_credentials).
                f"{section.key('proxy_url')}: must be http://host[:port] (the proxy is "
                "reached with CONNECT), without credentials (see proxy_credentials) or path"
            )
        proxy_url = proxy_url.rstrip("/")
    credentials = resolve_secret(section, "proxy_credentials", env, read_file)
    if credentials is not None:
        if proxy_url is None:
            raise ConfigError(f"{section.key('proxy_credentials')}: needs proxy_url")
        if ":" not in credentials or any(c in credentials for c in "\r\n"):
            raise ConfigError(
                f"{section.key('proxy_credentials')}: the secret must be user:password on one line"
            )
    upstream = UpstreamConfig(
        name=name,
        url=url,
        connect_timeout_seconds=section.number(
            "connect_timeout_seconds", defaults.connect_timeout_seconds, minimum=0.1
        ),
        read_timeout_seconds=section.number(
            "read_timeout_seconds", defaults.read_timeout_seconds, minimum=0.1
        ),
        max_connections=section.integer("max_connections", defaults.max_connections, minimum=1),
        pool_timeout_seconds=section.number(
            "pool_timeout_seconds", defaults.pool_timeout_seconds, minimum=0.0
        ),
        max_waiting=section.integer("max_waiting", defaults.max_waiting, minimum=0),
        idle_timeout_seconds=section.number(
            "idle_timeout_seconds", defaults.idle_timeout_seconds, minimum=0.0
        ),
        ca_file=tls_files["ca_file"],
        cert_file=tls_files["cert_file"],
        key_file=tls_files["key_file"],
        proxy_url=proxy_url,
        proxy_credentials=credentials,
    )
    section.reject_unknown()
    return upstream


def _plain_proxy_url(value: str) -> bool:
    """``http://host[:port]`` and nothing else (a CONNECT proxy, no credentials)."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and bool(parts.hostname)
        and parts.username is None
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
    )


def _parse_prices(section: Section) -> PriceTable:
    prices: list[tuple[str, Price]] = []
    for model in section.data:
        entry = section.table(model)
        if "input" not in entry.data or "output" not in entry.data:
            raise ConfigError(
                f"{entry.path}: input and output prices (USD per million tokens) are required"
            )
        optional = {
            name: entry.number(name, 0.0) if name in entry.data else None
            for name in ("cache_creation", "cache_read")
        }
        price = Price(
            input=entry.number("input", 0.0),
            output=entry.number("output", 0.0),
            cache_creation=optional["cache_creation"],
            cache_read=optional["cache_read"],
        )
        entry.reject_unknown()
        prices.append((model, price))
    try:
        return PriceTable(prices)
    except ValueError as exc:
        raise ConfigError(f"prices: {exc}") from None


def _parse_auth_client(
    section: Section, env: Mapping[str, str], read_file: ReadFile
) -> AuthClientConfig | None:
    """``[gateway.auth]``; None when the section is absent or empty."""
    if not section.data:
        return None
    d = _AUTH_CLIENT_DEFAULTS
    token = resolve_secret(section, "token", env, read_file)
    if token is None:
        raise ConfigError(f"{section.key('token')}: required")
    auth = AuthClientConfig(
        target=section.string("target"),
        token=token,
        timeout_seconds=section.number("timeout_seconds", d.timeout_seconds, minimum=0.1),
        keepalive_seconds=section.number("keepalive_seconds", d.keepalive_seconds, minimum=1.0),
        ca_file=section.optional_string("ca_file"),
        cert_file=section.optional_string("cert_file"),
        key_file=section.optional_string("key_file"),
    )
    section.reject_unknown()
    return auth


def _parse_limits_store(
    section: Section, env: Mapping[str, str], read_file: ReadFile
) -> LimitsStoreConfig | None:
    """``[gateway.limits]``; None when the section is absent or empty."""
    if not section.data:
        return None
    d = _LIMITS_STORE_DEFAULTS
    key = section.key("redis_url")
    inline = not isinstance(section.data.get("redis_url"), Mapping)
    url = (
        section.string("redis_url")
        if inline
        else resolve_secret(section, "redis_url", env, read_file)
    )
    assert url is not None  # a secret table always resolves or raises
    # Never echoed: the URL may hold a password.
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    except ValueError:
        raise ConfigError(f"{key}: the port is not a number 0-65535") from None
    if parts.scheme not in LIMITS_STORE_SCHEMES or not (parts.hostname or parts.path):
        raise ConfigError(
            f"{key}: must be redis://, rediss:// or unix:// "
            "(redis://user:password@host:port/db, as the gateway's Redis ACL user)"
        )
    if inline and parts.password:
        raise ConfigError(
            f"{key}: holds a password, so it is a secret: "
            'redis_url = { env = "VAR" } or { file = "/path" }, never inline'
        )
    on_store_error = section.string("on_store_error", d.on_store_error)
    if on_store_error not in ON_STORE_ERROR:
        raise ConfigError(
            f"{section.key('on_store_error')}: must be one of {', '.join(ON_STORE_ERROR)}, "
            f"got {on_store_error!r}"
        )
    config = LimitsStoreConfig(
        redis_url=url,
        key_prefix=section.string("key_prefix", d.key_prefix),
        on_store_error="deny" if on_store_error == "deny" else "allow",
        timeout_seconds=section.number("timeout_seconds", d.timeout_seconds, minimum=0.01),
    )
    section.reject_unknown()
    return config


def _parse_limits(section: Section, whose: str) -> Limits | None:
    """``section.limits`` (``Limits.from_dict``: strict, every value checked); None
    when absent or empty. ``whose`` ends an error message (which key it is)."""
    section.used.add("limits")
    raw = section.data.get("limits")
    if raw is None:
        return None
    try:
        limits = Limits.from_dict(raw, where=section.key("limits"))
    except LimitsError as exc:
        raise ConfigError(f"{exc} ({whose})") from None
    return None if limits.unlimited else limits


def _no_store(where: str, whose: str) -> ConfigError:
    return ConfigError(
        f"{where}: limits need a limits store, and [gateway.limits] has no redis_url ({whose}); "
        "add [gateway.limits] (README: Limits and budgets) or remove the limits"
    )


def _parse_accounts(section: Section, store: bool) -> dict[str, Limits]:
    """``[accounts.<id>]``: the limits shared by every key of the account."""
    found: dict[str, Limits] = {}
    for account in section.data:
        entry = section.table(account)
        limits = _parse_limits(entry, f"account {account!r}")
        entry.reject_unknown()
        if limits is not None:
            if not store:
                raise _no_store(entry.key("limits"), f"account {account!r}")
            found[account] = limits
    return found


def _parse_credential(
    section: Section, env: Mapping[str, str], read_file: ReadFile, default_mode: Mode
) -> tuple[Mode, str | None, str | None]:
    """``mode``, ``account`` and ``api_key`` of a ``[[keys]]`` entry or a pool member,
    checked alike: an account for oauth and auto, an explicit upstream key for api_key."""
    mode = section.string("mode", default_mode)
    if mode not in MODES:
        raise ConfigError(
            f"{section.key('mode')}: must be one of {', '.join(MODES)}, got {mode!r}"
            f"{close_match(mode, MODES)}"
        )
    section.used.add("account")  # so that a misspelt account gets a hint, even when absent
    account = section.optional_string("account")
    if mode != "api_key" and account is None:
        raise ConfigError(f"{section.key('account')}: required for mode {mode!r}")
    api_key = resolve_secret(section, "api_key", env, read_file)
    if mode == "api_key" and api_key is None:
        raise ConfigError(
            f"{section.key('api_key')}: mode 'api_key' needs an upstream key, named explicitly "
            '({ env = "VAR" } or { file = "/path" })'
        )
    return mode, account, api_key


def _require_auth(section: Section, mode: Mode, auth: AuthClientConfig | None) -> None:
    """An oauth or auto credential gets its tokens from the auth service."""
    if mode != "api_key" and auth is None:
        raise ConfigError(f"gateway.auth: required by {section.path} (mode {mode!r})")


def _secret_reference(section: Section, name: str) -> str:
    """Where a secret that ``resolve_secret`` read comes from: ``env VAR`` or ``file /path``."""
    ((kind, where),) = section.data[name].items()
    return f"{kind} {where}"


_MEMBER_KEYS = ("account", "mode", "api_key", "name")


def _parse_pool_member(
    section: Section,
    env: Mapping[str, str],
    read_file: ReadFile,
    auth: AuthClientConfig | None,
) -> PoolMember:
    """One entry of ``[pools.<name>] members``."""
    section.used.update(_MEMBER_KEYS)  # unknown keys first: a misspelt one gets its hint
    section.reject_unknown()
    if section.data.get("account") is None and section.data.get("api_key") is None:
        raise ConfigError(f"{section.path}: names no credential: an account, an api_key or both")
    only_key = section.data.get("account") is None
    mode, account, api_key = _parse_credential(
        section, env, read_file, "api_key" if only_key else DEFAULT_MODE
    )
    name = section.optional_string("name")
    _require_auth(section, mode, auth)
    if account is not None:
        return PoolMember(f"account:{account}", mode, account, api_key, name or account)
    if name is None:
        raise ConfigError(
            f"{section.key('name')}: required for a member without an account "
            "(its id is key:<name>, stable across restarts and workers)"
        )
    return PoolMember(f"key:{name}", mode, account, api_key, name)


def _parse_pool(
    name: str,
    section: Section,
    env: Mapping[str, str],
    read_file: ReadFile,
    auth: AuthClientConfig | None,
) -> PoolRoute:
    """``[pools.<name>]``: the strategy, the cool-downs and the members, each
    credential once (by id, by secret, by key)."""
    d = _POOL_DEFAULTS
    strategies = [strategy.value for strategy in Strategy]
    strategy = section.string("strategy", d.pool.strategy.value)
    if strategy not in strategies:
        raise ConfigError(
            f"{section.key('strategy')}: must be one of {', '.join(strategies)}, "
            f"got {strategy!r}{close_match(strategy, strategies)}"
        )
    cool_downs = {
        key: section.number(key, getattr(d, key), minimum=MIN_COOL_SECONDS)
        for key in COOL_DOWN_MAXIMA
    }
    for key, maximum in COOL_DOWN_MAXIMA.items():
        if cool_downs[key] > maximum:
            raise ConfigError(
                f"{section.key(key)}: must be a number from {MIN_COOL_SECONDS:g} to "
                f"{maximum:g}, got {cool_downs[key]:g}"
            )
    default, cap = cool_downs["default_cool_down_seconds"], cool_downs["max_cool_down_seconds"]
    if cap < default:
        raise ConfigError(
            f"{section.key('max_cool_down_seconds')}: must be at least "
            f"default_cool_down_seconds ({default:g}), got {cap:g}"
        )
    entries = section.tables("members")
    section.reject_unknown()
    if not entries:
        raise ConfigError(f"{section.key('members')}: required: at least one member")
    members: list[PoolMember] = []
    ids: dict[str, str] = {}  # member id: where
    references: dict[str, str] = {}  # "env VAR" or "file /path": where
    api_keys: dict[str, str] = {}  # the key itself: where
    for index, entry in enumerate(entries):
        member = _parse_pool_member(entry, env, read_file, auth)
        where = f"members[{index}]"
        if member.id in ids:
            raise ConfigError(f"{entry.path}: the same member as {ids[member.id]} ({member.id})")
        ids[member.id] = where
        if member.api_key is not None:
            reference = _secret_reference(entry, "api_key")
            if reference in references:
                raise ConfigError(
                    f"{entry.key('api_key')}: the same secret as {references[reference]}.api_key "
                    f"({reference})"
                )
            if member.api_key in api_keys:
                raise ConfigError(
                    f"{entry.key('api_key')}: the same API key as {api_keys[member.api_key]}"
                    ".api_key (through another secret)"
                )
            references[reference] = api_keys[member.api_key] = where
        members.append(member)
    try:
        pool = Pool(name, tuple(Member(member.id) for member in members), Strategy(strategy))
    except ValueError as exc:  # the checks above leave only a hash collision of two ids
        raise ConfigError(f"{section.path}: {exc}") from None
    return PoolRoute(pool, tuple(members), default, cap)


def _parse_pools(
    section: Section,
    env: Mapping[str, str],
    read_file: ReadFile,
    auth: AuthClientConfig | None,
    store: LimitsStoreConfig | None,
) -> dict[str, PoolRoute]:
    """``[pools.<name>]``, by name."""
    pools: dict[str, PoolRoute] = {}
    for name in section.data:
        if store is None:
            raise ConfigError(
                f"{section.key(name)}: a pool needs [gateway.limits]: its members' cool-downs "
                "are shared by every worker through that Redis (README: Limits and budgets)"
            )
        pools[name] = _parse_pool(name, section.table(name), env, read_file, auth)
    return pools


def _key_pool(key: Section, whose: str, pools: Mapping[str, PoolRoute]) -> PoolRoute | None:
    """The pool a ``[[keys]]`` entry names, or None: the key has its own credential.
    ``whose`` ends an error message (which key it is)."""
    key.used.add("pool")  # so that a misspelt pool gets a hint, even when absent
    pool_name = key.optional_string("pool")
    if pool_name is None:
        return None
    own = [name for name in ("mode", "account", "api_key") if name in key.data]
    if own:
        raise ConfigError(
            f"{key.key('pool')}: a key names a pool or its own credential, not both: "
            f"remove {', '.join(own)} ({whose})"
        )
    pool = pools.get(pool_name)
    if pool is None:
        raise ConfigError(
            f"{key.key('pool')}: no [pools.{pool_name}]{close_match(pool_name, sorted(pools))} "
            f"({whose})"
        )
    return pool


def key_subjects(
    key_hash: str, name: str, account: str | None, key_limits: Limits | None,
    account_limits: Limits | None,
) -> tuple[Subject, ...]:  # fmt: skip
    """The key and its account, when either has limits (usage is recorded for both)."""
    if key_limits is None and account_limits is None:
        return ()
    key = Subject("key", key_hash, key_limits or Limits(), name)
    if account is None:
        return (key,)
    return (key, Subject("account", account, account_limits or Limits(), account))


def parse_gateway_config(
    data: Mapping[str, Any], env: Mapping[str, str], read_file: ReadFile = read_text_file
) -> GatewayConfig:
    d = _GATEWAY_DEFAULTS
    root = Section(data, "")
    gateway = root.table("gateway")
    auth = _parse_auth_client(gateway.table("auth"), env, read_file)
    profiles_section = root.table("profiles")
    profiles = {DEFAULT_PROFILE: Profile()}
    for name in profiles_section.data:
        profiles[name] = _parse_profile(name, profiles_section.table(name))
    upstreams_section = root.table("upstreams")
    upstreams = {
        name: _parse_upstream(name, upstreams_section.table(name), env, read_file)
        for name in upstreams_section.data
    }
    limits_store = _parse_limits_store(gateway.table("limits"), env, read_file)
    accounts_section = root.table("accounts")
    account_limits = _parse_accounts(accounts_section, limits_store is not None)
    pools_section = root.table("pools")
    pools = _parse_pools(pools_section, env, read_file, auth, limits_store)
    routes: dict[str, Route] = {}
    for index, key in enumerate(root.tables("keys")):
        key_hash = key.string("hash").lower()
        if not KEY_HASH.match(key_hash):
            raise ConfigError(
                f"{key.key('hash')}: must be sha256:<64 hex digits> (`keyrelay keys new` prints it)"
            )
        if key_hash in routes:
            raise ConfigError(f"{key.key('hash')}: the same key hash appears twice")
        name = key.string("name", f"key{index}")
        pool = _key_pool(key, f"key {name!r}", pools)
        mode: RouteMode
        if pool is None:
            mode, account, api_key = _parse_credential(key, env, read_file, DEFAULT_MODE)
        else:  # the pool's members are the credentials, never the route's own
            mode, account, api_key = "pool", None, None
        profile_name = key.string("profile", DEFAULT_PROFILE)
        if profile_name not in profiles:
            raise ConfigError(f"{key.key('profile')}: no [profiles.{profile_name}]")
        upstream_name = key.string("upstream", DEFAULT_UPSTREAM)
        if upstream_name not in upstreams:
            raise ConfigError(f"{key.key('upstream')}: no [upstreams.{upstream_name}]")
        if mode != "pool":
            _require_auth(key, mode, auth)
        key_limits = _parse_limits(key, f"key {name!r}")
        if key_limits is not None and limits_store is None:
            raise _no_store(key.key("limits"), f"key {name!r}")
        routes[key_hash] = Route(
            name=name,
            account=account,
            mode=mode,
            profile_name=profile_name,
            profile=profiles[profile_name],
            upstream=upstreams[upstream_name],
            api_key=api_key,
            subjects=key_subjects(
                key_hash, name, account, key_limits, account_limits.get(account or "")
            ),
            pool=pool,
        )
        key.reject_unknown()
    # A pool no config key names is a typo, unless runtime keys (which need
    # [gateway.auth]) may name it: then it waits for them (keyrelay.gateway.key_book).
    used_pools = {route.pool.pool.name for route in routes.values() if route.pool is not None}
    for pool_name in pools:
        if pool_name not in used_pools and auth is None:
            raise ConfigError(
                f"{pools_section.key(pool_name)}: no [[keys]] entry has pool = {pool_name!r}"
                f"{close_match(pool_name, sorted(used_pools))} (and without [gateway.auth] "
                "no runtime key can)"
            )
    # An account no config key names (itself or through a pool) is a typo, unless
    # runtime keys (which need [gateway.auth]) may name it: then its limits wait for them.
    used_accounts = {route.account for route in routes.values()} | {
        member.account for pool in pools.values() for member in pool.members
    }
    for account in accounts_section.data:
        if account not in used_accounts and auth is None:
            raise ConfigError(
                f"{accounts_section.key(account)}: no [[keys]] entry has account = {account!r}"
                f"{close_match(account, sorted(a for a in used_accounts if a))} (and without "
                "[gateway.auth] no runtime key can)"
            )
    config = GatewayConfig(
        routes=routes,
        auth=auth,
        prices=_parse_prices(root.table("prices")),
        listen=parse_listen(gateway, d.listen)[0],
        max_request_bytes=gateway.integer("max_request_bytes", d.max_request_bytes, minimum=1024),
        max_event_bytes=gateway.integer("max_event_bytes", d.max_event_bytes, minimum=1024),
        token_skew_seconds=gateway.number("token_skew_seconds", d.token_skew_seconds),
        log_level=gateway.string("log_level", d.log_level).lower(),
        tracing=parse_tracing(gateway.table("tracing"), gateway=True),
        front_door=_parse_front_door(gateway),
        limits=limits_store,
        profiles=profiles,
        upstreams=upstreams,
        account_limits=account_limits,
        pools=pools,
    )
    check_log_level(gateway, config.log_level)
    gateway.reject_unknown()
    root.reject_unknown()
    return config


def load_gateway_config(path: str, env: Mapping[str, str]) -> GatewayConfig:
    return parse_file(path, parse_gateway_config, env)
