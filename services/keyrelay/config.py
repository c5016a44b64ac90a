"""Configuration: one TOML file per service, secrets from the environment or files.

A bad config fails at start with a message naming the key and the problem
(``ConfigError("auth.skew_seconds: must be a number >= 0, got 'soon'")``).
Parsing is pure: it takes the parsed TOML, the environment and a file reader,
so every malformed form is a unit test.

Secrets are never written inline. A secret field is a table naming where the
secret lives, ``{ env = "VAR" }`` or ``{ file = "/run/secrets/name" }`` (a
Kubernetes Secret mounted as a file); the file's trailing newline is dropped.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from keyrelay.auth.core.authorize import RESERVED_AUTHORIZE_PARAMS
from keyrelay.auth.core.redis_url import RedisUrlError, parse_redis_url
from keyrelay.auth.core.refresh import WAIT_PAST_DEADLINE_SECONDS, Timings
from keyrelay.gateway.core.request_transform import Profile
from keyrelay.gateway.core.usage import Price, PriceTable

# gRPC keepalive between the gateways and the auth service: the gateway pings every
# DEFAULT_KEEPALIVE_SECONDS; the auth server permits pings this often (and more).
DEFAULT_KEEPALIVE_SECONDS = 30.0
DEFAULT_MIN_CLIENT_PING_INTERVAL_SECONDS = 10.0

_T = Timings()  # the refresh timings' defaults
ReadFile = Callable[[str], str]
_Config = TypeVar("_Config")
Role = Literal["gateway", "admin"]
ROLES: tuple[Role, ...] = ("gateway", "admin")
TokenAuthMethod = Literal["none", "client_secret_basic", "client_secret_post"]
TOKEN_AUTH_METHODS: tuple[TokenAuthMethod, ...] = (
    "none",
    "client_secret_basic",
    "client_secret_post",
)
DEFAULT_ENCRYPTION_KEYS_ENV = "KEYRELAY_ENCRYPTION_KEYS"
PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class ConfigError(Exception):
    """A config value is missing or wrong; the message names the key."""


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


TRACING_EXPORTERS: tuple[str, ...] = ("otlp", "console")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry tracing, ``[auth.tracing]`` / ``[gateway.tracing]``; off by default.

    None means "the SDK's ``OTEL_*`` environment variable, else its default".
    """

    enabled: bool = False
    exporters: tuple[str, ...] = ("otlp",)
    endpoint: str | None = None  # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces
    service_name: str | None = None
    sample_ratio: float | None = None
    propagate_upstream: bool = False  # gateway only: send traceparent to the upstream


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
    events_stream: str = "keyrelay:events"
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


def read_text_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None


class _Section:
    """Typed access to one TOML table, with errors that name the dotted key."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: must be a table")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def _get(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def string(self, name: str, default: str | None = None) -> str:
        value = self._get(name)
        if value is None:
            if default is None:
                raise ConfigError(f"{self.key(name)}: required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key(name)}: must be a non-empty string, got {value!r}")
        return value

    def optional_string(self, name: str) -> str | None:
        return None if self.data.get(name) is None else self.string(name)

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._get(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)  # TOML allows nan and inf; neither is a duration
            or value < minimum
        ):
            raise ConfigError(f"{self.key(name)}: must be a number >= {minimum:g}, got {value!r}")
        return float(value)

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.key(name)}: must be an integer >= {minimum}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: must be true or false, got {value!r}")
        return value

    def strings(self, name: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        value = self._get(name)
        if value is None:
            return tuple(default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.key(name)}: must be a list of non-empty strings")
        return tuple(value)

    def table(self, name: str) -> _Section:
        value = self._get(name)
        return _Section({} if value is None else value, self.key(name))

    def tables(self, name: str) -> list[_Section]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(
                f"{self.key(name)}: must be an array of tables ([[{self.key(name)}]])"
            )
        return [_Section(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            hint = close_match(unknown[0], sorted(self.used))
            raise ConfigError(f"{self.key(unknown[0])}: unknown key{hint}")


def close_match(word: str, known: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` when ``word`` looks like a typo of a known key, else ``""``."""
    matches = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def resolve_secret(
    section: _Section, name: str, env: Mapping[str, str], read_file: ReadFile
) -> str | None:
    """Reads the secret that ``section.name`` points at; None when the key is absent."""
    raw = section.data.get(name)
    section.used.add(name)
    if raw is None:
        return None
    key = section.key(name)
    if not isinstance(raw, Mapping) or set(raw) not in ({"env"}, {"file"}):
        raise ConfigError(
            f'{key}: a secret must be {{ env = "VAR" }} or {{ file = "/path" }}, never inline'
        )
    if "env" in raw:
        var = raw["env"]
        if not isinstance(var, str) or not var:
            raise ConfigError(f"{key}.env: must name an environment variable")
        value = env.get(var)
        if not value:
            raise ConfigError(f"{key}: environment variable {var} is not set or empty")
        return value
    path = raw["file"]
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}.file: must be a file path")
    try:
        value = read_file(path).rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: file {path!r} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{key}: file {path!r} is empty")
    return value


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


def _check_url(section: _Section, name: str, value: str, *, allow_http: bool = True) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigError(f"{section.key(name)}: must be an http(s) URL, got {value!r}")
    if not allow_http and parts.scheme != "https":
        raise ConfigError(f"{section.key(name)}: must be https")
    return value


def host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(value)
    return host, int(port)


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _listen(section: _Section, default: str) -> tuple[str, str, int]:
    """``section.listen`` as given, and its host and port; an HTTP side binds there."""
    listen = section.string("listen", default)
    try:
        host, port = host_port(listen)
    except ValueError:
        raise ConfigError(
            f"{section.key('listen')}: must be host:port (e.g. 0.0.0.0:8081), got {listen!r}"
        ) from None
    return listen, host, port


def _parse_web(section: _Section) -> WebConfig:
    listen, host, port = _listen(section, "127.0.0.1:8081")
    public_url = section.optional_string("public_url")
    if public_url is not None:
        _check_url(section, "public_url", public_url)
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
        session_ttl_seconds=section.number("session_ttl_seconds", 8 * 3600.0, minimum=60),
    )
    section.reject_unknown()
    return web


def _parse_tracing(section: _Section, *, gateway: bool) -> TracingConfig:
    """Every key is checked even while ``enabled = false``: a typo is never silent."""
    section.used.add("exporter")
    raw = section.data.get("exporter", "otlp")
    names = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n in TRACING_EXPORTERS for n in names)
    ):
        raise ConfigError(
            f'{section.key("exporter")}: must be "otlp", "console" or a list of them, got {raw!r}'
        )
    endpoint = section.optional_string("endpoint")
    ratio = None
    if section.data.get("sample_ratio") is not None:
        ratio = section.number("sample_ratio", 1.0)
        if ratio > 1:
            raise ConfigError(
                f"{section.key('sample_ratio')}: must be a number from 0 to 1, got {ratio:g}"
            )
    config = TracingConfig(
        enabled=section.boolean("enabled", False),
        exporters=tuple(dict.fromkeys(names)),
        endpoint=_check_url(section, "endpoint", endpoint) if endpoint else None,
        service_name=section.optional_string("service_name"),
        sample_ratio=ratio,
        propagate_upstream=section.boolean("propagate_upstream", False) if gateway else False,
    )
    section.reject_unknown()
    return config


def _parse_provider(
    name: str, section: _Section, env: Mapping[str, str], read_file: ReadFile
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
        _check_url(section, "redirect_uris", uri)
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
        authorize_url=_check_url(section, "authorize_url", section.string("authorize_url")),
        token_url=_check_url(section, "token_url", section.string("token_url")),
        revoke_url=_check_url(section, "revoke_url", revoke_url) if revoke_url else None,
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
    root = _Section(data, "")
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
    prefix = auth.string("key_prefix", "keyrelay:")
    lock_ttl = auth.number("lock_ttl_seconds", _T.lock_ttl, minimum=0.1)
    refresh_deadline = auth.number("refresh_deadline_seconds", _T.refresh_deadline, minimum=0.1)
    token_timeout = auth.number("token_timeout_seconds", _T.token_timeout, minimum=0.1)
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
        listen=auth.string("listen", "127.0.0.1:50051"),
        redis_url=_redis_url(auth, env, read_file),
        key_prefix=prefix,
        events_stream=auth.string("events_stream", f"{prefix}events"),
        events_maxlen=auth.integer("events_maxlen", 100_000, minimum=100),
        events_subscriber_queue=auth.integer(
            "events_subscriber_queue",
            DEFAULT_EVENTS_SUBSCRIBER_QUEUE,
            minimum=MIN_EVENTS_SUBSCRIBER_QUEUE,
        ),
        events_max_subscribers=auth.integer(
            "events_max_subscribers", DEFAULT_EVENTS_MAX_SUBSCRIBERS, minimum=1
        ),
        flow_ttl_seconds=auth.number("flow_ttl_seconds", _T.flow_ttl, minimum=10),
        skew_seconds=auth.number("skew_seconds", _T.skew),
        lock_ttl_seconds=lock_ttl,
        refresh_deadline_seconds=refresh_deadline,
        wait_for_refresh_seconds=auth.number(
            "wait_for_refresh_seconds", refresh_deadline + WAIT_PAST_DEADLINE_SECONDS, minimum=0.1
        ),
        token_timeout_seconds=token_timeout,
        refresh_backoff_base_seconds=auth.number(
            "refresh_backoff_base_seconds", _T.backoff_base, minimum=0.01
        ),
        refresh_backoff_cap_seconds=auth.number(
            "refresh_backoff_cap_seconds", _T.backoff_cap, minimum=0.01
        ),
        forced_refresh_cooldown_seconds=auth.number(
            "forced_refresh_cooldown_seconds", _T.forced_refresh_cooldown, minimum=0.0
        ),
        min_client_ping_interval_seconds=auth.number(
            "min_client_ping_interval_seconds",
            DEFAULT_MIN_CLIENT_PING_INTERVAL_SECONDS,
            minimum=0.1,
        ),
        log_level=auth.string("log_level", "info").lower(),
        tracing=_parse_tracing(auth.table("tracing"), gateway=False),
        tls=tls,
        web=web,
    )
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("auth.log_level: must be one of debug, info, warning, error")
    auth.reject_unknown()
    root.reject_unknown()
    return config


def _redis_url(auth: _Section, env: Mapping[str, str], read_file: ReadFile) -> str:
    # The URL may carry a password, so it may come from a secret instead of inline.
    secret = resolve_secret(auth, "redis_url_secret", env, read_file)
    if secret is not None and auth.data.get("redis_url") is not None:
        raise ConfigError("auth.redis_url: set either redis_url or redis_url_secret, not both")
    url = secret or auth.string("redis_url", "redis://127.0.0.1:6379/0")
    try:
        parse_redis_url(url)
    except RedisUrlError as exc:  # its message never quotes the password
        key = auth.key("redis_url_secret" if secret is not None else "redis_url")
        raise ConfigError(f"{key}: {exc}") from None
    return url


def load_auth_config(path: str, env: Mapping[str, str]) -> AuthConfig:
    return _parse_file(path, parse_auth_config, env)


def _parse_file(
    path: str,
    parse: Callable[[Mapping[str, Any], Mapping[str, str]], _Config],
    env: Mapping[str, str],
) -> _Config:
    """``parse`` of the file at ``path``; every error names the file, then the key."""
    data = load_toml(path)
    try:
        return parse(data, env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# -- gateway -------------------------------------------------------------------

Mode = Literal["oauth", "api_key", "auto"]
MODES: tuple[Mode, ...] = ("oauth", "api_key", "auto")
KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


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


@dataclass(frozen=True, slots=True)
class Route:
    """What one gateway key maps to. ``api_key`` is the upstream key, never the gateway key."""

    name: str
    account: str | None
    mode: Mode
    profile_name: str
    profile: Profile
    upstream: UpstreamConfig
    api_key: str | None = field(default=None, repr=False)


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


@dataclass(frozen=True, slots=True)
class FrontDoorConfig:
    """A worker's bounds on its clients' connections: flat keys of ``[gateway]``
    (README: the answer a client gets at each); these defaults are the parser's."""

    max_connections: int = 1000  # open at once, per worker; beyond: 503, closed
    listen_backlog: int = 1024  # connections the kernel queues before the worker accepts them
    max_header_bytes: int = 32 << 10  # request line + headers; beyond: 431, closed
    max_header_count: int = 100  # beyond: 431, closed
    header_timeout_seconds: float = 10.0  # a head's first byte to its end; beyond: 408, closed
    first_byte_timeout_seconds: float = 10.0  # a new connection silent this long: closed


_FRONT_DOOR_DEFAULTS = FrontDoorConfig()


def _parse_front_door(gateway: _Section) -> FrontDoorConfig:
    d = _FRONT_DOOR_DEFAULTS
    return FrontDoorConfig(
        max_connections=gateway.integer("max_connections", d.max_connections, minimum=1),
        listen_backlog=gateway.integer("listen_backlog", d.listen_backlog, minimum=1),
        max_header_bytes=gateway.integer("max_header_bytes", d.max_header_bytes, minimum=1024),
        max_header_count=gateway.integer("max_header_count", d.max_header_count, minimum=8),
        header_timeout_seconds=gateway.number(
            "header_timeout_seconds", d.header_timeout_seconds, minimum=0.1
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


def _parse_profile(name: str, section: _Section) -> Profile:
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
    name: str, section: _Section, env: Mapping[str, str], read_file: ReadFile
) -> UpstreamConfig:
    url = _check_url(section, "url", section.string("url")).rstrip("/")
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


# The defaults of every [upstreams.<name>] key, from UpstreamConfig's fields.
_UPSTREAM_DEFAULTS = UpstreamConfig(name="", url="")


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


def _parse_prices(section: _Section) -> PriceTable:
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


def parse_gateway_config(
    data: Mapping[str, Any], env: Mapping[str, str], read_file: ReadFile = read_text_file
) -> GatewayConfig:
    root = _Section(data, "")
    gateway = root.table("gateway")
    auth_section = gateway.table("auth")
    auth: AuthClientConfig | None = None
    if auth_section.data:
        token = resolve_secret(auth_section, "token", env, read_file)
        if token is None:
            raise ConfigError(f"{auth_section.key('token')}: required")
        auth = AuthClientConfig(
            target=auth_section.string("target"),
            token=token,
            timeout_seconds=auth_section.number("timeout_seconds", 40.0, minimum=0.1),
            keepalive_seconds=auth_section.number(
                "keepalive_seconds", DEFAULT_KEEPALIVE_SECONDS, minimum=1.0
            ),
            ca_file=auth_section.optional_string("ca_file"),
            cert_file=auth_section.optional_string("cert_file"),
            key_file=auth_section.optional_string("key_file"),
        )
        auth_section.reject_unknown()
    profiles_section = root.table("profiles")
    profiles = {"default": Profile()}
    for name in profiles_section.data:
        profiles[name] = _parse_profile(name, profiles_section.table(name))
    upstreams_section = root.table("upstreams")
    upstreams = {
        name: _parse_upstream(name, upstreams_section.table(name), env, read_file)
        for name in upstreams_section.data
    }
    routes: dict[str, Route] = {}
    for index, key in enumerate(root.tables("keys")):
        key_hash = key.string("hash").lower()
        if not KEY_HASH.match(key_hash):
            raise ConfigError(
                f"{key.key('hash')}: must be sha256:<64 hex digits> (`keyrelay keys new` prints it)"
            )
        if key_hash in routes:
            raise ConfigError(f"{key.key('hash')}: the same key hash appears twice")
        mode = key.string("mode", "oauth")
        if mode not in MODES:
            raise ConfigError(f"{key.key('mode')}: must be one of {', '.join(MODES)}")
        account = key.optional_string("account")
        if mode != "api_key" and account is None:
            raise ConfigError(f"{key.key('account')}: required for mode {mode!r}")
        api_key = resolve_secret(key, "api_key", env, read_file)
        if mode == "api_key" and api_key is None:
            raise ConfigError(
                f"{key.key('api_key')}: mode 'api_key' needs an upstream key, named explicitly "
                '({ env = "VAR" } or { file = "/path" })'
            )
        profile_name = key.string("profile", "default")
        if profile_name not in profiles:
            raise ConfigError(f"{key.key('profile')}: no [profiles.{profile_name}]")
        upstream_name = key.string("upstream", "default")
        if upstream_name not in upstreams:
            raise ConfigError(f"{key.key('upstream')}: no [upstreams.{upstream_name}]")
        if mode != "api_key" and auth is None:
            raise ConfigError(f"gateway.auth: required by {key.path} (mode {mode!r})")
        routes[key_hash] = Route(
            name=key.string("name", f"key{index}"),
            account=account,
            mode=mode,
            profile_name=profile_name,
            profile=profiles[profile_name],
            upstream=upstreams[upstream_name],
            api_key=api_key,
        )
        key.reject_unknown()
    config = GatewayConfig(
        routes=routes,
        auth=auth,
        prices=_parse_prices(root.table("prices")),
        listen=_listen(gateway, "127.0.0.1:8080")[0],
        max_request_bytes=gateway.integer("max_request_bytes", 10 << 20, minimum=1024),
        max_event_bytes=gateway.integer("max_event_bytes", 1 << 20, minimum=1024),
        token_skew_seconds=gateway.number("token_skew_seconds", 30.0),
        log_level=gateway.string("log_level", "info").lower(),
        tracing=_parse_tracing(gateway.table("tracing"), gateway=True),
        front_door=_parse_front_door(gateway),
    )
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("gateway.log_level: must be one of debug, info, warning, error")
    gateway.reject_unknown()
    root.reject_unknown()
    return config


def load_gateway_config(path: str, env: Mapping[str, str]) -> GatewayConfig:
    return _parse_file(path, parse_gateway_config, env)
