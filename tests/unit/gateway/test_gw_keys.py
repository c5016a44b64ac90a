"""`keyrelay keys new`: the printed key, its hash and the pasted config block."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tomllib

import pytest

from keyrelay.gateway.config import parse_gateway_config
from keyrelay.gateway.keys import KEY_PREFIX, config_entry, key_hash, new_key

AUTH = {"auth": {"target": "ipv4:127.0.0.1:50051", "token": {"env": "GW_TOKEN"}}}
UPSTREAMS = {"default": {"url": "http://127.0.0.1:9"}}
ENV = {"GW_TOKEN": "gateway-token-0123456789"}


def gateway_config_with(block: str) -> dict[str, object]:
    data = tomllib.loads(block)
    return {"gateway": AUTH, "upstreams": UPSTREAMS, **data}


def test_new_keys_are_random_and_url_safe() -> None:
    keys = {new_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) == len(KEY_PREFIX) + 43
        assert key[len(KEY_PREFIX) :].replace("-", "").replace("_", "").isalnum()


def test_hash_is_sha256_of_the_key() -> None:
    assert key_hash("kr-abc") == "sha256:" + hashlib.sha256(b"kr-abc").hexdigest()


@pytest.mark.parametrize(
    "name",
    ["alice-laptop", 'quote " inside', "back\\slash", "new\nline", "ünïcødé", '"]\n[evil]\nx="'],
)
def test_the_printed_block_parses_and_routes_the_key(name: str) -> None:
    key = new_key()
    config = parse_gateway_config(
        gateway_config_with(config_entry(key, account="alice", name=name)), ENV
    )
    route = config.routes[key_hash(key)]
    assert route.name == name
    assert route.account == "alice"
    assert route.mode == "oauth"
    assert list(config.routes) == [key_hash(key)]


def test_cli_prints_the_key_once_and_a_block_with_its_hash() -> None:
    command = [sys.executable, "-m", "keyrelay", "keys", "new", "--config-entry"]
    result = subprocess.run(
        [*command, "--account", "bob", "--name", "ci"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    lines = [line.strip() for line in result.stdout.splitlines()]
    keys = [line for line in lines if line.startswith(KEY_PREFIX)]
    assert len(keys) == 1
    block = result.stdout[result.stdout.index("[[keys]]") :]
    config = parse_gateway_config(gateway_config_with(block), ENV)
    route = config.routes[key_hash(keys[0])]
    assert (route.name, route.account) == ("ci", "bob")
    assert result.stdout.count(keys[0]) == 1
