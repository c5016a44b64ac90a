"""The auth service's config: ``[auth]`` and ``[providers.<name>]`` of its TOML file.

Read with ``keyrelay.configfile`` (TOML, secrets, errors naming the key). Every
default is written once: a dataclass field's default (the refresh timings' are
``Timings``' in ``auth/core/refresh.py``) or a named constant, which the parser reads.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from keyrelay.auth.core.authorize import RESERVED_AUTHORIZE_PARAMS
from keyrelay.auth.core.redis_url import RedisUrlError, parse_redis_url
from keyrelay.auth.core.refresh import WAIT_PAST_DEADLINE_SECONDS, Timings
from keyrelay.configfile import (
    ConfigError,
    ReadFile,
    Section,
    TracingConfig,
    check_log_level,
    check_url,
    parse_file,
    parse_listen,
    parse_tracing,
    read_text_file,
    resolve_secret,
)

# The auth server permits gRPC keepalive pings this often (and more); the gateways
# ping every gateway.auth.keepalive_seconds (keyrelay.gateway.config).
DEFAULT_MIN_CLIENT_PING_INTERVAL_SECONDS = 10.0

_T = Timings()  # the refresh timings' defaults
Role = Literal["gateway", "admin"]
ROLES: tuple[Role, ...] = ("gateway", "admin")
TokenAuthMethod = Literal["none", "client_secret_basic", "client_secret_post"]
TOKEN_AUTH_METHODS: tuple[TokenAuthMethod, ...] = (
    "none",
    "client_secret_basic",
    "client_secret_post",
)
DEFAULT_ENCRYPTION_KEYS_ENV = "KEYRELAY_ENCRYPTION_KEYS"
PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    kid: str
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    authorize_url: str
    token_url: str
    client_id: str
    redirect_uris: tuple[str, ...]
    scopes: tuple[str, ...] = ()
    revoke_url: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    token_auth_method: TokenAuthMethod = "none"
    authorize_params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class WebConfig:
    """``[auth.web]``: the auth service's HTTP side (probes, metrics, the connect page)."""

    listen: str = "127.0.0.1:8081"
    # Where browsers reach this side; the provider redirects to public_url + /callback.
    # None: no web callback (every connection is finished by pasting the code).
    public_url: str | None = None
    session_ttl_seconds: float = 8 * 3600.0

    @property
    def callback_uri(self) -> str | None:
        return f"{self.public_url}/callback" if self.public_url else None

    @property
    def secure_cookies(self) -> bool:
        return (self.public_url or "").startswith("https://")


_WEB_DEFAULTS = WebConfig()

# WatchEvents per auth replica (keyrelay.auth.events): events a subscriber may fall
# behind before it is cut, and subscribers served before RESOURCE_EXHAUSTED.
DEFAULT_EVENTS_SUBSCRIBER_QUEUE = 1024
DEFAULT_EVENTS_MAX_SUBSCRIBERS = 4096
MIN_EVENTS_SUBSCRIBER_QUEUE = 16


@dataclass(frozen=True, slots=True)
class AuthConfig:
    encryption_keys: tuple[EncryptionKey, ...]
    callers: tuple[Caller, ...]
    providers: Mapping[str, ProviderConfig]
    listen: str = "127.0.0.1:50051"
    # May carry a password (see ``redis_url_secret``), so it stays out of repr().
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = "keyrelay:"
    events_stream: str = "keyrelay:events"  # configured: key_prefix + "events"
    events_maxlen: int = 100_000
    events_subscriber_queue: int = DEFAULT_EVENTS_SUBSCRIBER_QUEUE
    events_max_subscribers: int = DEFAULT_EVENTS_MAX_SUBSCRIBERS
    # The refresh timings' defaults are Timings' (auth/core/refresh.py): written once.
    flow_ttl_seconds: float = _T.flow_ttl
    skew_seconds: float = _T.skew
    lock_ttl_seconds: float = _T.lock_ttl
    refresh_deadline_seconds: float = _T.refresh_deadline
    wait_for_refresh_seconds: float = _T.wait_for_refresh
    token_timeout_seconds: float = _T.token_timeout
    refresh_backoff_base_seconds: float = _T.backoff_base
    refresh_backoff_cap_seconds: float = _T.backoff_cap
    forced_refresh_cooldown_seconds: float = _T.forced_refresh_cooldown
    # A client may ping this often without a GOAWAY too_many_pings (gRPC's default is
    # 5 min); the gateways ping every gateway.auth.keepalive_seconds (30).
    min_client_ping_interval_seconds: float = DEFAULT_MIN_CLIENT_PING_INTERVAL_SECONDS
    log_level: str = "info"
    tls: TlsConfig | None = None
    web: WebConfig | None = None  # no [auth.web] section: no HTTP side
    tracing: TracingConfig = field(default_factory=TracingConfig)


# The defaults of every [auth] key, from AuthConfig's fields.
_AUTH_DEFAULTS = AuthConfig(encryption_keys=(), callers=(), providers={})


def parse_encryption_keys(value: str, source: str) -> tuple[EncryptionKey, ...]:
    """``kid:base64key,...``: the first key encrypts, all of them decrypt."""
    keys: list[EncryptionKey] = []
    for index, item in enumerate(part.strip() for part in value.split(",")):
        where = f"{source}: entry {index + 1}"
        kid, sep, encoded = item.partition(":")
        if not sep or not KEY_ID.match(kid):
            raise ConfigError(f"{where}: expected kid:base64key with kid of [A-Za-z0-9_-]{{1,32}}")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where} ({kid}): key is not valid base64") from None
        if len(key) != 32:
            raise ConfigError(f"{where} ({kid}): key must be 32 bytes (AES-256), got {len(key)}")
        if any(k.kid == kid for k in keys):
            raise ConfigError(f"{where}: key id {kid!r} appears twice")
        keys.append(EncryptionKey(kid, key))
    return tuple(keys)


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _parse_web(section: Section) -> WebConfig:
    d = _WEB_DEFAULTS
    listen, host, port = parse_listen(section, d.listen)
    public_url = section.optional_string("public_url")
    if public_url is not None:
        check_url(section, "public_url", public_url)
        parts = urlsplit(public_url)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(
                f"{section.key('public_url')}: must be scheme://host[:port] without a path, "
                f"got {public_url!r}"
            )
        public_url = public_url.rstrip("/")
    elif host in _LOOPBACK_HOSTS and port != 0:
        # Only a loopback address is known to be what the browser uses too.
        public_url = f"http://{listen}"
    web = WebConfig(
        listen=listen,
        public_url=public_url,
        session_ttl_seconds=section.number(
            "session_ttl_seconds", d.session_ttl_seconds, minimum=60
        ),
    )
    section.reject_unknown()
    return web


def _parse_provider(
    name: str, section: Section, env: Mapping[str, str], read_file: ReadFile
) -> ProviderConfig:
    if not PROVIDER_NAME.match(name):
        raise ConfigError(f"{section.path}: provider names are [a-z0-9_-], up to 63 chars")
    secret = resolve_secret(section, "client_secret", env, read_file)
    default_method: TokenAuthMethod = "client_secret_basic" if secret else "none"
    method = section.string("token_auth_method", default_method)
    if method not in TOKEN_AUTH_METHODS:
        raise ConfigError(
            f"{section.key('token_auth_method')}: must be one of {', '.join(TOKEN_AUTH_METHODS)}"
        )
    if method != "none" and not secret:
        raise ConfigError(f"{section.key('client_secret')}: required by {method}")
    redirect_uris = section.strings("redirect_uris")
    if not redirect_uris:
        raise ConfigError(f"{section.key('redirect_uris')}: at least one redirect URI is required")
    for uri in redirect_uris:
        check_url(section, "redirect_uris", uri)
    params = section.table("authorize_params")
    extra: list[tuple[str, str]] = []
    for key, value in params.data.items():
        if key in RESERVED_AUTHORIZE_PARAMS:
            raise ConfigError(f"{params.key(key)}: set by keyrelay itself, cannot be overridden")
        if not isinstance(value, str):
            raise ConfigError(f"{params.key(key)}: must be a string")
        extra.append((key, value))
    revoke_url = section.optional_string("revoke_url")
    provider = ProviderConfig(
        name=name,
        authorize_url=check_url(section, "authorize_url", section.string("authorize_url")),
        token_url=check_url(section, "token_url", section.string("token_url")),
        revoke_url=check_url(section, "revoke_url", revoke_url) if revoke_url else None,
        client_id=section.string("client_id"),
        client_secret=secret,
        token_auth_method=method,
        scopes=section.strings("scopes"),
        redirect_uris=redirect_uris,
        authorize_params=tuple(extra),
    )
    section.reject_unknown()
    return provider


def parse_auth_config(
    data: Mapping[str, Any], env: Mapping[str, str], read_file: ReadFile = read_text_file
) -> AuthConfig:
    d = _AUTH_DEFAULTS
    root = Section(data, "")
    auth = root.table("auth")
    keys_value = resolve_secret(auth, "encryption_keys", env, read_file)
    keys_source = auth.key("encryption_keys")
    if keys_value is None:
        keys_value = env.get(DEFAULT_ENCRYPTION_KEYS_ENV)
        keys_source = DEFAULT_ENCRYPTION_KEYS_ENV
        if not keys_value:
            raise ConfigError(
                f"auth.encryption_keys: not configured and {DEFAULT_ENCRYPTION_KEYS_ENV} is not "
                "set; generate one with: python -c 'import base64,os; "
                'print("k1:" + base64.b64encode(os.urandom(32)).decode())\''
            )
    callers: list[Caller] = []
    for caller in auth.tables("callers"):
        role = caller.string("role")
        if role not in ROLES:
            raise ConfigError(f"{caller.key('role')}: must be one of {', '.join(ROLES)}")
        token = resolve_secret(caller, "token", env, read_file)
        if token is None:
            raise ConfigError(f"{caller.key('token')}: required")
        if len(token) < 16:
            raise ConfigError(f"{caller.key('token')}: service tokens need at least 16 characters")
        caller.reject_unknown()
        callers.append(Caller(role, token))
    if not callers:
        raise ConfigError("auth.callers: at least one [[auth.callers]] entry is required")
    tls_section = auth.table("tls")
    tls = None
    if tls_section.data:
        tls = TlsConfig(
            cert_file=tls_section.string("cert_file"),
            key_file=tls_section.string("key_file"),
            client_ca_file=tls_section.optional_string("client_ca_file"),
        )
        tls_section.reject_unknown()
    web_section = auth.table("web")
    web = _parse_web(web_section) if "web" in auth.data else None
    prefix = auth.string("key_prefix", d.key_prefix)
    lock_ttl = auth.number("lock_ttl_seconds", d.lock_ttl_seconds, minimum=0.1)
    refresh_deadline = auth.number(
        "refresh_deadline_seconds", d.refresh_deadline_seconds, minimum=0.1
    )
    token_timeout = auth.number("token_timeout_seconds", d.token_timeout_seconds, minimum=0.1)
    if token_timeout > refresh_deadline:
        raise ConfigError(
            "auth.token_timeout_seconds: must not exceed auth.refresh_deadline_seconds"
        )
    providers_section = root.table("providers")
    providers = {
        name: _parse_provider(name, providers_section.table(name), env, read_file)
        for name in providers_section.data
    }
    config = AuthConfig(
        encryption_keys=parse_encryption_keys(keys_value, keys_source),
        callers=tuple(callers),
        providers=providers,
        listen=auth.string("listen", d.listen),
        redis_url=_redis_url(auth, env, read_file),
        key_prefix=prefix,
        events_stream=auth.string("events_stream", f"{prefix}events"),
        events_maxlen=auth.integer("events_maxlen", d.events_maxlen, minimum=100),
        events_subscriber_queue=auth.integer(
            "events_subscriber_queue",
            d.events_subscriber_queue,
            minimum=MIN_EVENTS_SUBSCRIBER_QUEUE,
        ),
        events_max_subscribers=auth.integer(
            "events_max_subscribers", d.events_max_subscribers, minimum=1
        ),
        flow_ttl_seconds=auth.number("flow_ttl_seconds", d.flow_ttl_seconds, minimum=10),
        skew_seconds=auth.number("skew_seconds", d.skew_seconds),
        lock_ttl_seconds=lock_ttl,
        refresh_deadline_seconds=refresh_deadline,
        # The default follows a configured refresh_deadline_seconds.
        wait_for_refresh_seconds=auth.number(
            "wait_for_refresh_seconds", refresh_deadline + WAIT_PAST_DEADLINE_SECONDS, minimum=0.1
        ),
        token_timeout_seconds=token_timeout,
        refresh_backoff_base_seconds=auth.number(
            "refresh_backoff_base_seconds", d.refresh_backoff_base_seconds, minimum=0.01
        ),
        refresh_backoff_cap_seconds=auth.number(
            "refresh_backoff_cap_seconds", d.refresh_backoff_cap_seconds, minimum=0.01
        ),
        forced_refresh_cooldown_seconds=auth.number(
            "forced_refresh_cooldown_seconds", d.forced_refresh_cooldown_seconds, minimum=0.0
        ),
        min_client_ping_interval_seconds=auth.number(
            "min_client_ping_interval_seconds", d.min_client_ping_interval_seconds, minimum=0.1
        ),
        log_level=auth.string("log_level", d.log_level).lower(),
        tracing=parse_tracing(auth.table("tracing"), gateway=False),
        tls=tls,
        web=web,
    )
    check_log_level(auth, config.log_level)
    auth.reject_unknown()
    root.reject_unknown()
    return config


def _redis_url(auth: Section, env: Mapping[str, str], read_file: ReadFile) -> str:
    # The URL may carry a password, so it may come from a secret instead of inline.
    secret = resolve_secret(auth, "redis_url_secret", env, read_file)
    if secret is not None and auth.data.get("redis_url") is not None:
        raise ConfigError("auth.redis_url: set either redis_url or redis_url_secret, not both")
    url = secret or auth.string("redis_url", _AUTH_DEFAULTS.redis_url)
    try:
        parse_redis_url(url)
    except RedisUrlError as exc:  # its message never quotes the password
        key = auth.key("redis_url_secret" if secret is not None else "redis_url")
        raise ConfigError(f"{key}: {exc}") from None
    return url


def load_auth_config(path: str, env: Mapping[str, str]) -> AuthConfig:
    return parse_file(path, parse_auth_config, env)
