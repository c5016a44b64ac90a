"""StoreErrors: store failures become UNAVAILABLE, counted, and logged without a flood.

A real ``RedisStore`` over a port where nothing listens (no retries: the
first connection error is the answer) gives the errors; the clock is the test's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from keyrelay.auth.config import parse_encryption_keys
from keyrelay.auth.core.errors import Unavailable
from keyrelay.auth.service import STORE_BACK_LINE, STORE_ERROR_LINE, StoreErrors
from keyrelay.auth.store.crypto import TokenCipher
from keyrelay.auth.store.redis_store import AccountRecord, RedisStore
from tests.support.redis_server import free_port
from tests.support.stack import ENCRYPTION_KEYS

ADDRESS = "redis://127.0.0.1:1/0"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def dead_store() -> AsyncIterator[RedisStore]:
    client = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    store = RedisStore(client, TokenCipher(parse_encryption_keys(ENCRYPTION_KEYS, "test")))
    yield store
    await store.close()


def lines(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, Any]]:
    return [vars(r) for r in caplog.records if r.name == "keyrelay.auth" and r.msg == msg]


def counted(operation: str, kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "keyrelay_auth_store_errors_total", {"operation": operation, "kind": kind}
    )
    return value or 0.0


async def test_redis_errors_name_the_operation_and_are_rate_limited(
    dead_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    errors = StoreErrors(ADDRESS, interval=10.0, clock=clock)
    before = counted("get_account", "ConnectionError")
    caplog.set_level(logging.WARNING, logger="keyrelay.auth")

    async def get_account() -> None:
        with pytest.raises(Unavailable, match="token store \\(Redis\\) unavailable"), errors:
            await dead_store.get_account("acct")

    for at in (0.0, 1.0, 2.0, 9.0, 10.0, 11.0):
        clock.now = 1000.0 + at
        await get_account()

    logged = lines(caplog, STORE_ERROR_LINE)
    assert [(line["operation"], line["error"], line["suppressed"]) for line in logged] == [
        ("get_account", "ConnectionError", 0),
        ("get_account", "ConnectionError", 3),  # at 10 s: 1, 2 and 9 left out
    ]
    assert logged[0]["address"] == ADDRESS
    assert "connecting to 127.0.0.1" in logged[0]["detail"]
    assert logged[0]["levelname"] == "ERROR"
    # The metric counts every one.
    assert counted("get_account", "ConnectionError") - before == 6

    # The first success says so once, with how many failed and for how long.
    clock.now = 1020.0
    with errors:
        pass
    with errors:
        pass
    (back,) = lines(caplog, STORE_BACK_LINE)
    assert (back["errors"], back["down_seconds"], back["address"]) == (6, 20.0, ADDRESS)


async def test_a_flapping_store_logs_at_most_one_recovery_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    errors = StoreErrors(ADDRESS, interval=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="keyrelay.auth")
    for step in range(6):  # fail, answer, fail, answer ... one second apart
        clock.now = 1000.0 + step
        if step % 2 == 0:
            errors.failed("get_account", "ConnectionError", "refused")
        else:
            errors.answered()
    assert len(lines(caplog, STORE_ERROR_LINE)) == 1
    (back,) = lines(caplog, STORE_BACK_LINE)
    assert back["errors"] == 1
    clock.now = 1012.0  # past the interval: the next recovery line counts the rest
    errors.failed("get_account", "ConnectionError", "refused")
    errors.answered()
    assert [line["errors"] for line in lines(caplog, STORE_BACK_LINE)] == [1, 3]


async def test_undecryptable_tokens_are_unavailable_and_rate_limited(
    dead_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    errors = StoreErrors(ADDRESS, interval=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="keyrelay.auth")
    record = AccountRecord(
        account_id="acct",
        provider="p",
        status="connected",
        scopes=(),
        connected_at=0.0,
        expires_at=0.0,
        token_type="Bearer",
        generation=1,
        disconnect_reason="",
        last_error="",
        failures=0,
        retry_at=0.0,
        tokens_blob=b"not a token blob",
    )
    before = counted("decrypt_tokens", "DecryptError")
    for _ in range(3):
        with pytest.raises(Unavailable, match="cannot be decrypted"), errors:
            dead_store.decrypt_tokens(replace(record))
    assert counted("decrypt_tokens", "DecryptError") - before == 3
    (line,) = lines(caplog, "stored tokens cannot be decrypted")
    assert line["suppressed"] == 0
    # Not a Redis outage: nothing "answers again".
    with errors:
        pass
    assert lines(caplog, STORE_BACK_LINE) == []
