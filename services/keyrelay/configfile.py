"""Reading a service's config file: TOML, secrets, typed keys, errors naming the key.

Each service's own config (``keyrelay.auth.config``, ``keyrelay.gateway.config``)
is parsed with what is here; this module imports neither service.

A bad config fails at start with a message naming the key and the problem
(``ConfigError("auth.skew_seconds: must be a number >= 0, got 'soon'")``).
Parsing is pure: it takes the parsed TOML, the environment and a file reader,
so every malformed form is a unit test.

Secrets are never written inline. A secret field is a table naming where the
secret lives, ``{ env = "VAR" }`` or ``{ file = "/run/secrets/name" }`` (a
Kubernetes Secret mounted as a file); the file's trailing newline is dropped.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

ReadFile = Callable[[str], str]
_Config = TypeVar("_Config")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A config value is missing or wrong; the message names the key."""


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


def parse_file(
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


class Section:
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

    def table(self, name: str) -> Section:
        value = self._get(name)
        return Section({} if value is None else value, self.key(name))

    def tables(self, name: str) -> list[Section]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(
                f"{self.key(name)}: must be an array of tables ([[{self.key(name)}]])"
            )
        return [Section(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

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
    section: Section, name: str, env: Mapping[str, str], read_file: ReadFile
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


def check_url(section: Section, name: str, value: str, *, allow_http: bool = True) -> str:
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


def parse_listen(section: Section, default: str) -> tuple[str, str, int]:
    """``section.listen`` as given, and its host and port; an HTTP side binds there."""
    listen = section.string("listen", default)
    try:
        host, port = host_port(listen)
    except ValueError:
        raise ConfigError(
            f"{section.key('listen')}: must be host:port (e.g. 0.0.0.0:8081), got {listen!r}"
        ) from None
    return listen, host, port


def check_log_level(section: Section, level: str) -> None:
    """``section.log_level`` (read lower-cased) is one of ``LOG_LEVELS``."""
    if level not in LOG_LEVELS:
        raise ConfigError(f"{section.key('log_level')}: must be one of {', '.join(LOG_LEVELS)}")


# -- tracing: [auth.tracing] and [gateway.tracing] --------------------------------

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


_TRACING_DEFAULTS = TracingConfig()


def parse_tracing(section: Section, *, gateway: bool) -> TracingConfig:
    """Every key is checked even while ``enabled = false``: a typo is never silent."""
    d = _TRACING_DEFAULTS
    section.used.add("exporter")
    raw = section.data.get("exporter", list(d.exporters))
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
        enabled=section.boolean("enabled", d.enabled),
        exporters=tuple(dict.fromkeys(names)),
        endpoint=check_url(section, "endpoint", endpoint) if endpoint else None,
        service_name=section.optional_string("service_name"),
        sample_ratio=ratio,
        propagate_upstream=(
            section.boolean("propagate_upstream", d.propagate_upstream)
            if gateway
            else d.propagate_upstream
        ),
    )
    section.reject_unknown()
    return config
