"""How a failed store operation is named: the Redis address without secrets, the operation."""

from __future__ import annotations

import sys
import types

import pytest

from keyrelay.auth.core.store_failure import UNKNOWN_OPERATION, redis_address, store_operation

ADDRESSES = [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cret@redis.internal:6380/2", "redis://redis.internal:6380/2"),
    ("rediss://user:s3cret@redis.internal/0", "rediss://redis.internal/0"),
    ("redis://user:p@ss@word@host:1/0", "redis://host:1/0"),  # up to the last '@'
    ("redis://host:6379/0?password=s3cret&socket_timeout=1", "redis://host:6379/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("unix://user:s3cret@/run/redis.sock?db=1", "unix:///run/redis.sock"),
    (
        "redis+sentinel://u:s3cret@s1:26379,[::1]/mymaster/3"
        "?sentinel_username=su&sentinel_password=s3cret",
        "redis+sentinel://s1:26379,[::1]:26379/mymaster/3",
    ),
    ("rediss+sentinel://s1/m", "rediss+sentinel://s1:26379/m/0"),
    ("http://s3cret@host/", "(not a Redis URL)"),
]


@pytest.mark.parametrize(("url", "address"), ADDRESSES)
def test_redis_address_keeps_no_secret(url: str, address: str) -> None:
    assert redis_address(url) == address
    assert "s3cret" not in redis_address(url)


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


STORE = _module(
    "fake_store",
    "def get_account(client):\n    return _hgetall(client)\n"
    "def _hgetall(client):\n    return client()\n",
)
CALLER = _module(
    "fake_caller", "def read_state(store, client):\n    return store.get_account(client)\n"
)


def _raise() -> None:
    raise ConnectionError("refused")


def test_store_operation_is_the_outermost_frame_of_the_store_module() -> None:
    try:
        CALLER.read_state(STORE, _raise)
    except ConnectionError:
        tb = sys.exc_info()[2]
    assert store_operation(tb, "fake_store") == "get_account"
    assert store_operation(tb, "not_in_the_traceback") == UNKNOWN_OPERATION
    assert store_operation(None, "fake_store") == UNKNOWN_OPERATION
