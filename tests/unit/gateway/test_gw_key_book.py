"""The key book (``keyrelay.gateway.key_book``): config keys and runtime keys, what is
taken and what is refused, expiry, versions; and the follower's bookkeeping of
events against its last list (``keyrelay.gateway.key_follower``). No I/O."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2
from keyrelay.gateway.config import GatewayConfig, parse_gateway_config
from keyrelay.gateway.core.errors import GatewayError
from keyrelay.gateway.http.metrics import GatewayMetrics
from keyrelay.gateway.key_book import NEVER, KeyBook, Refusal, RuntimeKey, runtime_key
from keyrelay.gateway.key_follower import KeyFollower, event_order
from keyrelay.gateway.keys import key_hash
from keyrelay.limit_rules import Budget, BudgetUnit, Limits, Period

CONFIG_KEY = "kr-config-key-0123456789"
NOW = 1_750_000_000.0


def config(*, store: bool = True, **top: Any) -> GatewayConfig:
    gateway: dict[str, Any] = {"auth": {"target": "ipv4:127.0.0.1:9", "token": {"env": "T"}}}
    if store:
        gateway["limits"] = {"redis_url": "redis://127.0.0.1:6379/0"}
    data: dict[str, Any] = {
        "gateway": gateway,
        "profiles": {"coding": {"betas": ["b1"]}},
        "upstreams": {
            "default": {"url": "http://127.0.0.1:9"},
            "eu": {"url": "http://127.0.0.1:10"},
        },
        "keys": [{"name": "file-key", "hash": key_hash(CONFIG_KEY), "account": "team"}],
        **top,
    }
    return parse_gateway_config(data, {"T": "gateway-token"})


def key(secret: str = "kr-runtime-1", **fields: Any) -> RuntimeKey:
    values: dict[str, Any] = {
        "key_id": "gk-0000000000000001",
        "name": "ci-bot",
        "key_sha256": key_hash(secret),
        "account": "team",
        "mode": "oauth",
        "profile": "default",
        "upstream": "default",
        "limits": {},
        "expires_at": 0,
        "version": 1,
    }
    return RuntimeKey(**{**values, **fields})


def test_a_runtime_key_becomes_a_route_of_the_configs_profile_and_upstream() -> None:
    cfg = config(accounts={"team": {"limits": {"concurrent_requests": 4}}})
    book = KeyBook(cfg)
    entry = book.put(key(profile="coding", upstream="eu", limits={"requests_per_minute": 2}))
    assert entry is not None
    assert entry.refusal is None
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    route, expires_at = found
    assert expires_at == NEVER
    assert (route.name, route.account, route.mode) == ("ci-bot", "team", "oauth")
    assert route.profile is cfg.profiles["coding"]
    assert route.upstream is cfg.upstreams["eu"]
    assert route.api_key is None
    key_subject, account_subject = route.subjects
    assert key_subject.id == key_hash("kr-runtime-1")
    assert key_subject.limits == Limits(requests_per_minute=2)
    assert account_subject.limits == Limits(concurrent_requests=4)
    assert len(book) == 1


def test_an_account_only_runtime_keys_use_has_its_limits() -> None:
    """With [gateway.auth], [accounts.<id>.limits] may name an account no config key
    uses: runtime keys of that account get them."""
    cfg = config(accounts={"ops": {"limits": {"requests_per_minute": 30}}})
    book = KeyBook(cfg)
    book.put(key(account="ops"))
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    (account_subject,) = [s for s in found[0].subjects if s.kind == "account"]
    assert (account_subject.id, account_subject.limits) == ("ops", Limits(requests_per_minute=30))


def test_without_limits_anywhere_there_are_no_subjects() -> None:
    book = KeyBook(config(store=False))
    book.put(key())
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    assert found[0].subjects == ()


def test_config_keys_win_and_are_found_first() -> None:
    cfg = config()
    book = KeyBook(cfg)
    assert book.lookup(key_hash(CONFIG_KEY), NOW) == (cfg.routes[key_hash(CONFIG_KEY)], NEVER)
    entry = book.put(key(CONFIG_KEY, name="impostor"))
    assert entry is not None
    assert entry.refusal is Refusal.SHADOWS_CONFIG
    assert len(book) == 0
    found = book.lookup(key_hash(CONFIG_KEY), NOW)
    assert found is not None
    assert found[0].name == "file-key"
    assert book.lookup(key_hash("kr-unknown"), NOW) is None


@pytest.mark.parametrize(
    ("fields", "store", "refusal", "status", "words"),
    [
        ({"profile": "nope"}, True, Refusal.UNKNOWN_PROFILE, 401, "profile 'nope'"),
        ({"upstream": "us"}, True, Refusal.UNKNOWN_UPSTREAM, 401, "upstream 'us'"),
        ({"mode": "api_key"}, True, Refusal.NEEDS_API_KEY, 401, "needs an upstream API key"),
        ({"mode": "auto"}, True, Refusal.NEEDS_API_KEY, 401, "must be oauth"),
        ({"account": ""}, True, Refusal.NO_ACCOUNT, 401, "no account"),
        ({"limits": {"requests_per_minute": 0}}, True, Refusal.BAD_LIMITS, 401, "at least 1"),
        ({"limits": {"rpm": 5}}, True, Refusal.BAD_LIMITS, 401, "unknown limit"),
        (
            {"limits": {"requests_per_minute": 2}},
            False,
            Refusal.NO_LIMITS_STORE,
            503,
            "no limits store",
        ),
    ],
)
def test_keys_this_gateway_cannot_serve_are_refused_with_a_reason(
    fields: dict[str, Any], store: bool, refusal: Refusal, status: int, words: str
) -> None:
    book = KeyBook(config(store=store))
    entry = book.put(key(**fields))
    assert entry is not None
    assert entry.refusal is refusal
    assert words in entry.message
    assert len(book) == 0  # not counted as served
    with pytest.raises(GatewayError) as raised:
        book.lookup(key_hash("kr-runtime-1"), NOW)
    assert raised.value.status == status
    assert "not usable on this gateway" in raised.value.message


# -- keys naming a pool (DESIGN §6.3, issue 12) ---------------------------------------

POOLS = {
    "team": {"members": [{"account": "acct-a"}, {"account": "acct-b"}]},
    "other": {"strategy": "round_robin", "members": [{"account": "acct-c"}]},
}


def test_a_runtime_key_naming_a_pool_gets_the_configs_pool() -> None:
    """The config's [pools.<name>] by name (the one object config keys share), mode
    "pool", no account; the subjects are the key's own limits only, as for a config
    key naming a pool: a member account's limits do not apply."""
    cfg = config(pools=POOLS, accounts={"acct-a": {"limits": {"requests_per_minute": 1}}})
    book = KeyBook(cfg)
    entry = book.put(
        key(pool="team", account="", mode="pool", profile="coding", upstream="eu",
            limits={"requests_per_minute": 60})
    )  # fmt: skip
    assert entry is not None
    assert entry.refusal is None
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    route = found[0]
    assert (route.name, route.mode, route.account, route.api_key) == (
        "ci-bot", "pool", None, None
    )  # fmt: skip
    assert route.pool is cfg.pools["team"]
    assert route.profile is cfg.profiles["coding"]
    assert route.upstream is cfg.upstreams["eu"]
    (subject,) = route.subjects
    assert (subject.kind, subject.id, subject.limits) == (
        "key", key_hash("kr-runtime-1"), Limits(requests_per_minute=60)
    )  # fmt: skip
    assert len(book) == 1


def test_a_pool_key_without_limits_has_no_subjects() -> None:
    book = KeyBook(config(pools=POOLS, accounts={"acct-a": {"limits": {"concurrent_requests": 1}}}))
    book.put(key(pool="other", account="", mode="pool"))
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    assert found[0].subjects == ()
    assert found[0].pool is not None
    assert found[0].pool.pool.name == "other"


@pytest.mark.parametrize("pools", [POOLS, {}], ids=["other pools", "no pools"])
def test_a_pool_this_gateway_does_not_have_is_refused(pools: dict[str, Any]) -> None:
    book = KeyBook(config(pools=pools) if pools else config())
    entry = book.put(key(pool="teams", account="", mode="pool"))
    assert entry is not None
    assert entry.refusal is Refusal.UNKNOWN_POOL
    assert entry.refusal.value == "unknown_pool"  # the metric's label
    assert entry.message == "its pool 'teams' is not defined on this gateway"
    assert len(book) == 0
    with pytest.raises(GatewayError) as raised:
        book.lookup(key_hash("kr-runtime-1"), NOW)
    assert raised.value.status == 401
    assert "its pool 'teams' is not defined on this gateway" in raised.value.message


def test_a_key_moved_between_an_account_and_a_pool() -> None:
    cfg = config(pools=POOLS)
    book = KeyBook(cfg)
    book.put(key(version=1))
    before = book.version
    book.put(key(version=2, pool="team", account="", mode="pool"))
    assert book.version > before  # the app's raw-key cache forgets the old route
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    assert (found[0].mode, found[0].pool) == ("pool", cfg.pools["team"])
    book.put(key(version=3))
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    assert (found[0].mode, found[0].account, found[0].pool) == ("oauth", "team", None)


def test_a_pool_key_from_the_message() -> None:
    """The auth service answers a pool key with mode "pool" and no account; a pool
    wins over anything else the route says (the credentials are the members')."""
    for route in (
        auth_pb2.KeyRoute(mode="pool", pool="team"),
        auth_pb2.KeyRoute(account_id="stray", mode="oauth", pool="team"),
    ):
        converted = runtime_key(
            auth_pb2.GatewayKey(
                key_id="gk-1", name="n", key_sha256=key_hash("kr-x"), route=route, version=1
            )
        )
        assert (converted.pool, converted.mode, converted.account) == ("team", "pool", "")
        assert (converted.profile, converted.upstream) == ("default", "default")
    plain = runtime_key(auth_pb2.GatewayKey(key_id="gk-2", route=auth_pb2.KeyRoute(account_id="a")))
    assert (plain.pool, plain.mode, plain.account) == ("", "oauth", "a")


@pytest.mark.parametrize(
    ("expires_at", "now", "ok"),
    [
        (0, NOW, True),
        (int(NOW) + 1, NOW, True),
        (int(NOW), NOW, False),
        (int(NOW) - 60, NOW, False),
    ],
)
def test_expiry_is_checked_at_lookup(expires_at: int, now: float, ok: bool) -> None:
    book = KeyBook(config())
    book.put(key(expires_at=expires_at))
    if ok:
        found = book.lookup(key_hash("kr-runtime-1"), now)
        assert found is not None
        assert found[1] == (expires_at or NEVER)
    else:
        with pytest.raises(GatewayError) as raised:
            book.lookup(key_hash("kr-runtime-1"), now)
        assert raised.value.status == 401
        assert "expired at" in raised.value.message


def test_versions_revocation_and_the_book_version() -> None:
    book = KeyBook(config())
    v0 = book.version
    book.put(key(version=2, limits={"requests_per_minute": 5}))
    v1 = book.version
    assert v1 > v0
    assert book.put(key(version=1)) is None  # older than held: ignored
    assert book.version == v1
    book.put(key(version=2, limits={"requests_per_minute": 5}))  # the same again
    assert book.version == v1  # nothing changed: the app's cache stays
    book.put(key(version=3, limits={"requests_per_minute": 7}))
    assert book.version > v1
    found = book.lookup(key_hash("kr-runtime-1"), NOW)
    assert found is not None
    assert found[0].subjects[0].limits.requests_per_minute == 7
    v3 = book.version
    assert book.put(key(version=4, revoked=True)) is None
    assert book.version > v3
    assert book.lookup(key_hash("kr-runtime-1"), NOW) is None
    assert not book.remove("gk-0000000000000001")


def test_replace_holds_exactly_the_listed_keys() -> None:
    book = KeyBook(config())
    book.put(key("kr-a", key_id="gk-a"))
    book.put(key("kr-b", key_id="gk-b"))
    refused = book.replace(
        [
            key("kr-b", key_id="gk-b", version=2),
            key("kr-c", key_id="gk-c"),
            key("kr-d", key_id="gk-d", profile="nope"),
            key(CONFIG_KEY, key_id="gk-e"),
            key("kr-f", key_id="gk-f", revoked=True),
        ]
    )
    assert sorted(e.refusal for e in refused if e.refusal) == [
        Refusal.SHADOWS_CONFIG,
        Refusal.UNKNOWN_PROFILE,
    ]
    assert book.lookup(key_hash("kr-a"), NOW) is None
    assert book.lookup(key_hash("kr-b"), NOW) is not None
    assert book.lookup(key_hash("kr-c"), NOW) is not None
    assert book.lookup(key_hash("kr-f"), NOW) is None
    assert len(book) == 2


def test_runtime_key_from_the_message() -> None:
    message = auth_pb2.GatewayKey(
        key_id="gk-0000000000000009",
        name="n",
        key_sha256=key_hash("kr-x").upper().replace("SHA256", "sha256"),
        route=auth_pb2.KeyRoute(account_id="team"),
        limits=auth_pb2.KeyLimits(
            requests_per_minute=3,
            budget=auth_pb2.KeyBudget(amount=1000.0, unit="tokens", period="day"),
        ),
        expires_at=123,
        version=4,
        revoked_at=0,
    )
    converted = runtime_key(message)
    assert converted == RuntimeKey(
        key_id="gk-0000000000000009",
        name="n",
        key_sha256=key_hash("kr-x"),
        account="team",
        mode="oauth",
        profile="default",
        upstream="default",
        limits={
            "requests_per_minute": 3,
            "tokens_per_minute": None,
            "concurrent_requests": None,
            "budget": {"amount": 1000, "unit": "tokens", "period": "day"},
        },
        expires_at=123,
        version=4,
    )
    book = KeyBook(config())
    book.put(dataclasses.replace(converted, expires_at=0))
    found = book.lookup(key_hash("kr-x"), NOW)
    assert found is not None
    assert found[0].subjects[0].limits.budget == Budget(1000, BudgetUnit.TOKENS, Period.DAY)
    revoked = runtime_key(auth_pb2.GatewayKey(key_id="gk-1", revoked_at=5, version=2))
    assert revoked.revoked


@pytest.mark.parametrize(
    ("earlier", "later"),
    [("0-0", "1-0"), ("1700000000000-0", "1700000000000-1"), ("999-5", "1000-0"), ("", "0-1")],
)
def test_event_ids_compare_as_numbers(earlier: str, later: str) -> None:
    assert event_order(earlier) < event_order(later)


# -- the follower's bookkeeping, against a scripted stub ----------------------------


class ScriptedStub:
    """ListKeys answers the next of ``lists``; GetKey answers from ``keys`` (absent:
    NOT_FOUND). Every call is recorded."""

    def __init__(self, lists: list[auth_pb2.ListKeysResponse]) -> None:
        self.lists = lists
        self.keys: dict[str, auth_pb2.GatewayKey] = {}
        self.calls: list[str] = []

    async def ListKeys(self, request: Any, **_: Any) -> auth_pb2.ListKeysResponse:  # noqa: N802
        self.calls.append("list")
        return self.lists.pop(0)

    async def GetKey(self, request: Any, **_: Any) -> auth_pb2.GatewayKey:  # noqa: N802
        self.calls.append(f"get {request.key_id}")
        if request.key_id not in self.keys:
            raise aio.AioRpcError(grpc.StatusCode.NOT_FOUND, aio.Metadata(), aio.Metadata())
        return self.keys[request.key_id]


def message(secret: str, key_id: str, version: int = 1, **fields: Any) -> auth_pb2.GatewayKey:
    fields.setdefault("route", auth_pb2.KeyRoute(account_id="team"))
    return auth_pb2.GatewayKey(
        key_id=key_id, name=key_id, key_sha256=key_hash(secret), version=version, **fields
    )


def changed(event_id: str, key_id: str) -> auth_pb2.AccountEvent:
    return auth_pb2.AccountEvent(
        event_id=event_id, kind=auth_pb2.AccountEvent.KEY_CHANGED, key_id=key_id
    )


async def settle(follower: KeyFollower) -> asyncio.Task[None]:
    task = asyncio.create_task(follower.run())
    for _ in range(50):
        await asyncio.sleep(0)
    return task


async def test_the_follower_lists_again_when_the_stream_starts_after_its_list() -> None:
    stub = ScriptedStub(
        [
            auth_pb2.ListKeysResponse(keys=[message("kr-a", "gk-a")], events_cursor="100-0"),
            auth_pb2.ListKeysResponse(keys=[message("kr-b", "gk-b")], events_cursor="200-0"),
        ]
    )
    book = KeyBook(config())
    tokens = SimpleNamespace(stub=stub, call_metadata=())
    follower = KeyFollower(book, tokens, GatewayMetrics())  # type: ignore[arg-type]
    task = await settle(follower)
    assert follower.loaded
    assert stub.calls == ["list"]
    follower.run_started("100-0")  # the stream starts at the list's cursor: nothing missed
    await settle(follower)
    assert stub.calls == ["list"]
    follower.run_started("150-0")  # a new run, after the list: events in between unknown
    await settle(follower)
    assert stub.calls == ["list", "list"]
    assert book.lookup(key_hash("kr-a"), NOW) is None
    assert book.lookup(key_hash("kr-b"), NOW) is not None
    # Events the list covers are dropped; later ones are fetched; NOT_FOUND removes.
    stub.keys["gk-c"] = message("kr-c", "gk-c")
    follower.key_changed(changed("199-0", "gk-x"))
    follower.key_changed(changed("201-0", "gk-c"))
    follower.key_changed(changed("202-0", "gk-b"))
    await settle(follower)
    assert sorted(stub.calls[2:]) == ["get gk-b", "get gk-c"]
    assert book.lookup(key_hash("kr-c"), NOW) is not None
    assert book.lookup(key_hash("kr-b"), NOW) is None
    task.cancel()


async def test_a_pool_key_of_an_unknown_pool_is_counted_as_not_taken() -> None:
    stub = ScriptedStub(
        [
            auth_pb2.ListKeysResponse(
                keys=[
                    message("kr-a", "gk-a", route=auth_pb2.KeyRoute(mode="pool", pool="team")),
                    message("kr-b", "gk-b", route=auth_pb2.KeyRoute(mode="pool", pool="nope")),
                ],
                events_cursor="100-0",
            )
        ]
    )
    book = KeyBook(config(pools=POOLS))
    metrics = GatewayMetrics()
    tokens = SimpleNamespace(stub=stub, call_metadata=())
    follower = KeyFollower(book, tokens, metrics)  # type: ignore[arg-type]
    task = await settle(follower)
    assert follower.loaded
    found = book.lookup(key_hash("kr-a"), NOW)
    assert found is not None
    assert found[0].mode == "pool"
    refused = metrics.registry.get_sample_value(
        "keyrelay_gateway_runtime_keys_refused_total", {"reason": "unknown_pool"}
    )
    assert refused == 1.0
    task.cancel()
