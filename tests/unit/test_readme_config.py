"""The README's configuration reference against the code that parses configs.

Both directions: every TOML example in the README parses with the real parser
(unknown keys are errors there, so a documented key that the code does not know
fails), and every key the parser reads is named in the README's examples.
"""

from __future__ import annotations

import base64
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from keyrelay import configfile
from keyrelay.auth.config import parse_auth_config
from keyrelay.gateway.config import parse_gateway_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# The modules whose parsers read keys: the shared reader and each service's config.
CONFIG_FILES = ("configfile.py", "auth/config.py", "gateway/config.py")
CONFIG_SOURCE = "\n".join(
    (ROOT / "services" / "keyrelay" / name).read_text() for name in CONFIG_FILES
)

TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)
# The README elides a key hash as "sha256:…"; any well-formed one stands in (each its
# own: two keys may not share a hash).
_ELIDED = iter(range(1, 1000))
BLOCKS = [
    re.sub('"sha256:…"', lambda _: f'"sha256:{next(_ELIDED):064x}"', b)
    for b in TOML_BLOCK.findall(README)
]
# Names whose value is a name the user picks: `[providers.example]`, `[[keys]]` entries…
USER_NAMED = ("providers", "profiles", "upstreams", "prices", "pools")
ACCESSOR = re.compile(
    r"\.(?:string|optional_string|number|integer|boolean|strings|table|tables)\(\s*\"(\w+)\""
    r"|resolve_secret\(\s*\w+,\s*\"(\w+)\""
    r"|\.data\.get\(\"(\w+)\""
)


def normalize(path: str) -> str:
    """``providers.example.client_id`` → ``providers.*.client_id``; ``keys[0]`` → ``keys[]``."""
    path = re.sub(r"\[\d+\]", "[]", path)
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in USER_NAMED:
            parts[i + 1] = "*"
    return ".".join(parts)


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and set(value) not in ({"env"}, {"file"}):
            yield from flatten(value, path)
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                yield from flatten(item, path + "[]")
        else:
            yield path


def merged(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block in blocks:
        for key, value in block.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def readme_config(service: str) -> dict[str, Any]:
    """The README's blocks for one service, merged (the tracing block serves both)."""
    parsed = [tomllib.loads(block) for block in BLOCKS]
    chosen = [b for b in parsed if service in b or (service == "auth" and "providers" in b)]
    if service == "gateway":
        chosen += [{"upstreams": b["upstreams"], "keys": b["keys"]} for b in parsed if "keys" in b]
        tracing = next(b for b in parsed if "tracing" in b.get("auth", {}))
        chosen.append({"gateway": {"tracing": tracing["auth"]["tracing"]}})
    return merged(chosen)


def secret_env(text: str) -> dict[str, str]:
    names = set(re.findall(r'env = "(\w+)"', text))
    env = {name: f"secret-value-of-{name.lower()}-0123456789" for name in names}
    env["KEYRELAY_ENCRYPTION_KEYS"] = "k1:" + base64.b64encode(b"\x01" * 32).decode()
    return env


def read_file(path: str) -> str:
    return f"secret-file-{Path(path).name}-0123456789\n"


def parse_recording(
    parse: Callable[..., Any], data: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch
) -> set[str]:
    """Parses ``data`` and returns every key path the parser looked at, present or not."""
    sections: list[Any] = []
    original = configfile.Section.__init__

    def recording_init(self: Any, data: Any, path: str) -> None:
        original(self, data, path)
        sections.append(self)

    monkeypatch.setattr(configfile.Section, "__init__", recording_init)
    parse(data, secret_env(README), read_file)
    return {normalize(s.key(name)) for s in sections for name in s.used}


@pytest.mark.parametrize(
    ("service", "parse"), [("auth", parse_auth_config), ("gateway", parse_gateway_config)]
)
def test_every_key_the_parser_reads_is_in_the_readme(
    service: str, parse: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = readme_config(service)
    assert service in data
    read = parse_recording(parse, data, monkeypatch)
    shown = {normalize(path) for path in flatten(data)}
    block_text = "\n".join(BLOCKS)
    undocumented = sorted(
        path
        for path in read
        if path not in shown
        # a table the README shows keys of, or a key inside a table it shows whole
        and not any(s.startswith((path + ".", path + "[]")) for s in shown)
        and not any(path.startswith((s + ".", s + "[]")) for s in shown)
        and not re.search(rf"\b{re.escape(path.rsplit('.', 1)[-1].rstrip('[]'))}\b", block_text)
    )
    assert undocumented == [], f"keys the {service} parser reads but the README never names"


def test_every_key_named_in_the_config_modules_appears_in_a_readme_example() -> None:
    names = {next(g for g in m.groups() if g) for m in ACCESSOR.finditer(CONFIG_SOURCE)}
    block_text = "\n".join(BLOCKS)
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", block_text))
    assert names, "the accessor pattern found nothing: it no longer matches the config modules"
    assert missing == []


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.split("\n", 1)[0])
def test_every_readme_example_is_valid_toml(block: str) -> None:
    tomllib.loads(block)


def test_readme_examples_cover_both_services() -> None:
    assert readme_config("auth")["auth"]["callers"]
    assert readme_config("gateway")["keys"]
