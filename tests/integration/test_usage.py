"""GetUsage and ``keyrelay usage`` (issue 11 item 4) against a real Redis.

The usage is written by the gateways' own writer (``LimitsStore.finish``, the
gateway's code, on the auth service's prefix), so these tests prove the auth
service reads what the gateways write. Days are relative to the real clock,
as the auth service's are.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
import pytest
import redis.asyncio

from keyrelay.auth.core import usage as usage_rules
from keyrelay.auth.rpc.server import RunningServer
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.gateway.core.ratelimit import Subject
from keyrelay.gateway.core.usage import Usage
from keyrelay.gateway.keys import key_hash, new_key
from keyrelay.gateway.limits_store import Lease, LimitsStore
from keyrelay.limit_rules import Limits
from keyrelay.usage_layout import UsageLayout
from tests.conftest import rpc_code
from tests.integration.test_cli_keys import keyrelay
from tests.support.redis_server import RedisServer
from tests.support.stack import admin_md, gateway_md

DAY = 86_400
Stub: TypeAlias = "auth_pb2_grpc.AuthServiceAsyncStub"


@pytest.fixture
async def limits(redis_server: RedisServer, prefix: str) -> AsyncIterator[LimitsStore]:
    """The gateways' writer, on the auth service's prefix."""
    store = LimitsStore.from_url(redis_server.url, prefix=prefix, timeout=5)
    yield store
    await store.close()


async def record(
    limits: LimitsStore,
    subjects: tuple[Subject, ...],
    *,
    days_ago: int = 0,
    usage: Usage | None = None,
    cost: float | None = 0.001,
) -> None:
    now = time.time() - days_ago * DAY
    lease = Lease(secrets.token_hex(12), subjects, now)
    assert await limits.finish(lease, usage or Usage(100, 20, 5, 7), cost, now)


def key_subject(sha: str) -> Subject:
    return Subject("key", sha, Limits(), "from-config")


def account_subject(account: str) -> Subject:
    return Subject("account", account, Limits(), account)


async def create_key(stub: Stub, name: str, account: str) -> auth_pb2.GatewayKey:
    reply = await stub.CreateKey(
        auth_pb2.CreateKeyRequest(name=name, route=auth_pb2.KeyRoute(account_id=account)),
        metadata=admin_md(),
    )
    return reply.key


def today(days_ago: int = 0) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() - days_ago * DAY))


async def usage(stub: Stub, **request: object) -> auth_pb2.GetUsageResponse:
    reply: auth_pb2.GetUsageResponse = await stub.GetUsage(
        auth_pb2.GetUsageRequest(**request),  # type: ignore[arg-type]
        metadata=admin_md(),
    )
    return reply


async def test_a_runtime_key_by_id_is_named_with_its_days_and_totals(
    auth_stub: Stub, limits: LimitsStore
) -> None:
    key = await create_key(auth_stub, "ci", "alice")
    both = (key_subject(key.key_sha256), account_subject("alice"))
    await record(limits, both, usage=Usage(100, 20, 5, 7), cost=0.25)
    await record(limits, both, usage=Usage(1, 2, 3, 4), cost=None)  # unpriced
    await record(limits, both, days_ago=3, cost=0.5)
    await record(limits, both, days_ago=40, cost=1.0)

    reply = await usage(auth_stub, key_id=key.key_id)
    assert (reply.since, reply.until) == (today(29), today())
    assert [(r.day, r.kind, r.id, r.key_id, r.name) for r in reply.rows] == [
        (today(3), "key", key.key_sha256, key.key_id, "ci"),
        (today(), "key", key.key_sha256, key.key_id, "ci"),
    ]
    latest = reply.rows[-1]
    assert latest.requests == 2
    assert (latest.input_tokens, latest.output_tokens) == (101, 22)
    assert (latest.cache_creation_input_tokens, latest.cache_read_input_tokens) == (8, 11)
    assert latest.tokens == 101 + 22 + 8  # input + output + cache creation
    assert latest.cost_usd == pytest.approx(0.25)
    assert latest.unpriced == 1
    (total,) = reply.totals
    assert (total.day, total.kind, total.id) == ("", "key", "")
    assert total.requests == 3
    assert total.cost_usd == pytest.approx(0.75)

    assert [r.day for r in (await usage(auth_stub, key_id=key.key_id, days=3)).rows] == [today()]
    assert [r.day for r in (await usage(auth_stub, key_id=key.key_id, days=4)).rows] == [
        today(3),
        today(),
    ]
    longer = await usage(auth_stub, key_id=key.key_id, days=41)
    assert [r.day for r in longer.rows] == [today(40), today(3), today()]
    assert longer.totals[0].cost_usd == pytest.approx(1.75)


async def test_filters_by_account_by_hash_and_both(auth_stub: Stub, limits: LimitsStore) -> None:
    config_key = key_hash(new_key())  # a config-file key: the auth service does not know it
    await record(limits, (key_subject(config_key), account_subject("bob")), cost=0.5)
    await record(limits, (account_subject("carol"),), days_ago=1)

    bob = await usage(auth_stub, account_id="bob")
    assert [(r.kind, r.id) for r in bob.rows] == [("account", "bob")]
    assert [t.kind for t in bob.totals] == ["account"]

    by_hash = await usage(auth_stub, key_sha256=config_key)
    ((row),) = by_hash.rows
    assert (row.kind, row.id, row.key_id, row.name) == ("key", config_key, "", "")

    both = await usage(auth_stub, key_sha256=config_key, account_id="bob")
    assert [(r.kind, r.id) for r in both.rows] == [("key", config_key), ("account", "bob")]
    assert [(t.kind, t.requests) for t in both.totals] == [("key", 1), ("account", 1)]

    assert not (await usage(auth_stub, account_id="nobody")).rows


async def test_no_filter_lists_every_subject_in_the_range(
    auth_stub: Stub, limits: LimitsStore
) -> None:
    key = await create_key(auth_stub, "named", "dave")
    config_key = key_hash(new_key())
    await record(limits, (key_subject(key.key_sha256), account_subject("dave")), days_ago=2)
    await record(limits, (key_subject(config_key), account_subject("dave")))
    await record(limits, (key_subject(config_key),), days_ago=10)

    reply = await usage(auth_stub, days=7)
    assert [(r.day, r.kind, r.id, r.name) for r in reply.rows] == [
        (today(2), "key", key.key_sha256, "named"),
        (today(2), "account", "dave", ""),
        (today(), "key", config_key, ""),
        (today(), "account", "dave", ""),
    ]
    assert [(t.kind, t.requests) for t in reply.totals] == [("key", 2), ("account", 2)]
    assert len((await usage(auth_stub, days=11)).rows) == 5


async def test_more_rows_than_an_answer_carries_are_refused_by_name(
    auth_stub: Stub, limits: LimitsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_rules, "MAX_ROWS", 2)
    for account in ("a1", "a2", "a3"):
        await record(limits, (account_subject(account),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage(auth_stub)
    assert rpc_code(caught.value) is grpc.StatusCode.INVALID_ARGUMENT
    details = str(caught.value.details())
    assert "days:" in details
    assert "3 usage records" in details
    assert len((await usage(auth_stub, account_id="a1")).rows) == 1  # a filter is bounded


async def test_an_unknown_key_id_is_not_found_and_an_unknown_hash_is_empty(
    auth_stub: Stub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage(auth_stub, key_id="gk-0123456789abcdef")
    assert rpc_code(caught.value) is grpc.StatusCode.NOT_FOUND
    reply = await usage(auth_stub, key_sha256=key_hash(new_key()))
    assert not reply.rows
    assert not reply.totals


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"days": 0}, "days"),
        ({"days": 401}, "days"),
        ({"days": -1}, "days"),
        ({"key_id": "nope"}, "key_id"),
        ({"key_sha256": "sha256:ABC"}, "key_sha256"),
        ({"key_id": "gk-0123456789abcdef", "key_sha256": "sha256:" + "0" * 64}, "key_sha256"),
        ({"account_id": "-bad"}, "account_id"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(
    auth_stub: Stub, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage(auth_stub, **request_fields)
    assert rpc_code(caught.value) is grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(caught.value.details())


async def test_the_gateway_role_is_refused(auth_stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth_stub.GetUsage(auth_pb2.GetUsageRequest(), metadata=gateway_md())
    assert rpc_code(caught.value) is grpc.StatusCode.PERMISSION_DENIED


async def test_the_layout_names_what_the_writer_writes(
    redis_server: RedisServer, prefix: str, limits: LimitsStore
) -> None:
    """usage_layout's key names are the keys LimitsStore.finish writes."""
    sha = key_hash(new_key())
    await record(limits, (key_subject(sha), account_subject("erin")))
    layout = UsageLayout(prefix)
    async with redis.asyncio.Redis.from_url(redis_server.url) as direct:
        assert await direct.exists(layout.usage("key", sha, "day", today()))
        assert await direct.exists(layout.usage("account", "erin", "month", today()[:7]))
        members = await direct.smembers(layout.days(today()))
    assert members == {f"key:{sha}".encode(), b"account:erin"}


# -- keyrelay usage ---------------------------------------------------------------------


async def test_the_cli_prints_a_table_with_totals_and_json(
    auth_server: RunningServer, auth_stub: Stub, limits: LimitsStore
) -> None:
    key = await create_key(auth_stub, "ci", "frank")
    both = (key_subject(key.key_sha256), account_subject("frank"))
    await record(limits, both, usage=Usage(1200, 300, 40, 5000), cost=0.0125)
    await record(limits, both, days_ago=1, usage=Usage(800, 100, 0, 0), cost=None)

    status, out, err = await keyrelay(auth_server, "usage", "--key", key.key_id)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "DAY", "SUBJECT", "REQUESTS", "INPUT", "OUTPUT", "CACHE", "READ", "CACHE", "WRITE", "COST",
    ]  # fmt: skip
    assert lines[1].split() == [
        today(1), "key", "ci", f"({key.key_id})", "1", "800", "100", "0", "0", "$0.0000",
    ]  # fmt: skip
    assert lines[2].split() == [
        today(), "key", "ci", f"({key.key_id})", "1", "1,200", "300", "5,000", "40", "$0.0125",
    ]  # fmt: skip
    assert lines[3] == ""
    assert lines[4].split() == ["TOTAL", "keys", "2", "2,000", "400", "5,000", "40", "$0.0125"]
    assert "1 requests of models without a price" in lines[5]

    status, out, err = await keyrelay(auth_server, "usage", "--account", "frank", "--days", "1")
    assert status == 0, err
    assert [line.split()[:3] for line in out.splitlines()[1:2]] == [[today(), "account", "frank"]]

    status, out, err = await keyrelay(
        auth_server, "usage", "--key", key.key_id, "--account", "frank", "--json"
    )
    assert status == 0, err
    data = json.loads(out)
    assert (data["since"], data["until"]) == (today(29), today())
    assert [(r["day"], r["kind"]) for r in data["rows"]] == [
        (today(1), "key"),
        (today(1), "account"),
        (today(), "key"),
        (today(), "account"),
    ]
    assert (data["rows"][0]["key_id"], data["rows"][0]["name"]) == (key.key_id, "ci")
    assert data["rows"][0]["cache_read_input_tokens"] == 0  # every field, zeros too
    assert [(t["kind"], t["requests"], t["input_tokens"]) for t in data["totals"]] == [
        ("key", 2, 2000),
        ("account", 2, 2000),
    ]

    status, out, err = await keyrelay(auth_server, "usage", "--account", "nobody")
    assert status == 0, err
    assert out.strip() == f"no usage recorded from {today(29)} to {today()} (UTC)"

    status, out, err = await keyrelay(auth_server, "usage", "--days", "0")
    assert status == 1
    assert "INVALID_ARGUMENT: days must be 1 to 400" in err
