"""``[pools.<name>]`` and a key's ``pool`` (DESIGN §6.3, issue 12): parsed into
``PoolRoute``s on the routes; a bad pool is one start-up error that names the
file, the pool, the member or the key, never a gateway that runs."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from keyrelay.configfile import ConfigError
from keyrelay.gateway.config import (
    GatewayConfig,
    PoolMember,
    load_gateway_config,
    parse_gateway_config,
)
from keyrelay.gateway.core.pools import Member, Strategy
from keyrelay.gateway.core.ratelimit import Subject
from keyrelay.limit_rules import Limits

ALICE = "sha256:" + "ab" * 32
BOB = "sha256:" + "cd" * 32
ENV = {
    "B_KEY": "sk-b-0123456789",
    "SPARE_KEY": "sk-spare-0123456789",
    "OTHER_KEY": "sk-other-0123456789",
    "B_KEY_AGAIN": "sk-b-0123456789",  # B_KEY's key under another variable
    "GATEWAY_TOKEN": "gateway-service-token",
    "LIMITS_URL": "redis://gateway:s3cret@127.0.0.1:6379/0",
}

# The shape of the issue, as an operator writes it.
CONFIG = f"""
[gateway.auth]
target = "dns:///keyrelay-auth:50051"
token = {{ env = "GATEWAY_TOKEN" }}

[gateway.limits]
redis_url = {{ env = "LIMITS_URL" }}

[upstreams.default]
url = "http://127.0.0.1:9"

[pools.team]
members = [
  {{ account = "acct-a" }},
  {{ account = "acct-b", mode = "auto", api_key = {{ env = "B_KEY" }} }},
  {{ name = "spare", api_key = {{ env = "SPARE_KEY" }} }},
]

[[keys]]
name = "alice"
hash = "{ALICE}"
pool = "team"
"""


def data() -> dict[str, Any]:
    return copy.deepcopy(tomllib.loads(CONFIG))


def parse(config: dict[str, Any]) -> GatewayConfig:
    return parse_gateway_config(config, ENV)


def test_members_ids_modes_and_defaults() -> None:
    config = parse(data())
    team = config.pools["team"]
    assert team.members == (
        PoolMember("account:acct-a", "oauth", "acct-a", None, "acct-a"),
        PoolMember("account:acct-b", "auto", "acct-b", "sk-b-0123456789", "acct-b"),
        PoolMember("key:spare", "api_key", None, "sk-spare-0123456789", "spare"),
    )
    assert team.pool.name == "team"
    assert team.pool.members == tuple(Member(member.id) for member in team.members)
    assert team.pool.strategy is Strategy.AFFINITY
    assert (team.default_cool_down_seconds, team.max_cool_down_seconds) == (30.0, 3600.0)
    assert "sk-" not in repr(team)  # upstream keys stay out of logs


def test_a_pool_key_has_the_pool_and_no_credential_of_its_own() -> None:
    route = parse(data()).routes[ALICE]
    assert (route.name, route.mode, route.account, route.api_key) == ("alice", "pool", None, None)
    assert route.pool is not None
    assert route.pool.pool.name == "team"
    assert route.subjects == ()  # no limits anywhere: no call to the limits store


def test_every_key_of_a_pool_shares_one_pool_route() -> None:
    config = data()
    config["keys"].append({"name": "bob", "hash": BOB, "pool": "team"})
    parsed = parse(config)
    assert parsed.routes[ALICE].pool is parsed.routes[BOB].pool is parsed.pools["team"]


def test_strategy_and_cool_downs_as_given() -> None:
    config = data()
    config["pools"]["team"].update(
        strategy="round_robin", default_cool_down_seconds=5, max_cool_down_seconds=86400
    )
    team = parse(config).pools["team"]
    assert team.pool.strategy is Strategy.ROUND_ROBIN
    assert (team.default_cool_down_seconds, team.max_cool_down_seconds) == (5.0, 86400.0)
    config["pools"]["team"].update(default_cool_down_seconds=3600, max_cool_down_seconds=3600)
    assert parse(config).pools["team"].max_cool_down_seconds == 3600.0


def test_members_as_an_array_of_tables_and_member_names() -> None:
    config = data()
    config["pools"]["team"]["members"][0]["name"] = "Team A"
    text = tomli_w.dumps(config)  # writes members as [[pools.team.members]]
    team = parse_gateway_config(tomllib.loads(text), ENV).pools["team"]
    assert [(m.id, m.name) for m in team.members] == [
        ("account:acct-a", "Team A"),
        ("account:acct-b", "acct-b"),
        ("key:spare", "spare"),
    ]


def test_a_pool_keys_subjects_are_its_own_limits_only() -> None:
    config = data()
    config["keys"][0]["limits"] = {"requests_per_minute": 60}
    config["accounts"] = {"acct-a": {"limits": {"requests_per_minute": 5}}}
    (subject,) = parse(config).routes[ALICE].subjects
    assert subject == Subject("key", ALICE, Limits(requests_per_minute=60), "alice")


def test_a_pool_member_uses_its_account_for_the_accounts_check() -> None:
    # Without [gateway.auth] an [accounts.<id>] no key uses is a typo; a member counts.
    config = data()
    del config["gateway"]["auth"]
    config["pools"]["team"]["members"] = [
        {"account": "acct-b", "mode": "api_key", "api_key": {"env": "B_KEY"}}
    ]
    config["accounts"] = {"acct-b": {"limits": {"requests_per_minute": 5}}}
    member = parse(config).pools["team"].members[0]
    assert (member.id, member.mode, member.account) == ("account:acct-b", "api_key", "acct-b")
    config["accounts"]["acct-c"] = {"limits": {"requests_per_minute": 5}}
    with pytest.raises(ConfigError) as caught:
        parse(config)
    assert str(caught.value) == (
        "accounts.acct-c: no [[keys]] entry has account = 'acct-c'; did you mean 'acct-b'? "
        "(and without [gateway.auth] no runtime key can)"
    )


def test_a_pool_only_runtime_keys_name_waits_for_them() -> None:
    """With [gateway.auth], a pool no [[keys]] entry names is for runtime keys
    (``keyrelay keys new --pool``): kept, as an account only runtime keys use is."""
    config = data()
    config["pools"]["teams"] = {"members": [{"account": "acct-c"}]}
    pools = parse(config).pools
    assert sorted(pools) == ["team", "teams"]
    assert pools["teams"].members[0].id == "account:acct-c"


def test_pool_keys_and_credential_keys_side_by_side() -> None:
    config = data()
    config["keys"].append({"name": "bob", "hash": BOB, "account": "acct-a"})
    routes = parse(config).routes
    assert (routes[BOB].mode, routes[BOB].account, routes[BOB].pool) == ("oauth", "acct-a", None)
    assert routes[ALICE].mode == "pool"


def test_a_member_secret_from_a_file() -> None:
    config = data()
    config["pools"]["team"]["members"][2]["api_key"] = {"file": "/run/secrets/spare"}
    files = {"/run/secrets/spare": "sk-file-0123456789\n"}
    team = parse_gateway_config(config, ENV, files.__getitem__).pools["team"]
    assert team.members[2].api_key == "sk-file-0123456789"
    config["pools"]["team"]["members"].append(
        {"name": "again", "api_key": {"file": "/run/secrets/spare"}}
    )
    with pytest.raises(ConfigError) as caught:
        parse_gateway_config(config, ENV, files.__getitem__)
    assert str(caught.value) == (
        "pools.team.members[3].api_key: the same secret as members[2].api_key "
        "(file /run/secrets/spare)"
    )


Edit = Callable[[dict[str, Any]], object]


def team(**values: Any) -> Edit:
    return lambda config: config["pools"]["team"].update(values)


def member(index: int, **values: Any) -> Edit:
    return lambda config: config["pools"]["team"]["members"][index].update(values)


def add_member(**values: Any) -> Edit:
    return lambda config: config["pools"]["team"]["members"].append(values)


def key(**values: Any) -> Edit:
    return lambda config: config["keys"][0].update(values)


def drop(*path: str) -> Edit:
    def edit(config: dict[str, Any]) -> None:
        *parents, last = path
        for name in parents:
            config = config[name]
        del config[last]

    return edit


def both(*edits: Edit) -> Edit:
    return lambda config: [edit(config) for edit in edits]


SECRET_FORMS = '{ env = "VAR" } or { file = "/path" }'
BAD = [
    # the pool
    pytest.param(team(members=[]), "pools.team.members: required: at least one member", id="empty"),
    pytest.param(
        drop("pools", "team", "members"),
        "pools.team.members: required: at least one member",
        id="no members",
    ),
    pytest.param(
        lambda c: c["pools"].update(team=3), "pools.team: must be a table", id="not a table"
    ),
    pytest.param(
        team(members={"account": "acct-a"}),
        "pools.team.members: must be an array of tables ([[pools.team.members]])",
        id="members not a list",
    ),
    pytest.param(
        team(members=["acct-a"]), "pools.team.members[0]: must be a table", id="member not a table"
    ),
    pytest.param(
        team(stratgy="affinity"),
        "pools.team.stratgy: unknown key; did you mean 'strategy'?",
        id="unknown key",
    ),
    pytest.param(
        both(drop("pools", "team", "members"), team(member=[{"account": "a"}])),
        "pools.team.member: unknown key; did you mean 'members'?",
        id="unknown key before members",
    ),
    pytest.param(
        team(strategy="round-robin"),
        "pools.team.strategy: must be one of affinity, round_robin, got "
        "'round-robin'; did you mean 'round_robin'?",
        id="strategy",
    ),
    pytest.param(
        team(strategy="random"),
        "pools.team.strategy: must be one of affinity, round_robin, got 'random'",
        id="strategy unknown",
    ),
    pytest.param(
        team(strategy=1),
        "pools.team.strategy: must be a non-empty string, got 1",
        id="strategy type",
    ),
    pytest.param(
        team(default_cool_down_seconds=0),
        "pools.team.default_cool_down_seconds: must be a number >= 1, got 0",
        id="default cool-down 0",
    ),
    pytest.param(
        team(default_cool_down_seconds=3601),
        "pools.team.default_cool_down_seconds: must be a number from 1 to 3600, got 3601",
        id="default cool-down high",
    ),
    pytest.param(
        team(default_cool_down_seconds="30"),
        "pools.team.default_cool_down_seconds: must be a number >= 1, got '30'",
        id="default cool-down text",
    ),
    pytest.param(
        team(default_cool_down_seconds=float("nan")),
        "pools.team.default_cool_down_seconds: must be a number >= 1, got nan",
        id="default cool-down nan",
    ),
    pytest.param(
        team(max_cool_down_seconds=True),
        "pools.team.max_cool_down_seconds: must be a number >= 1, got True",
        id="max cool-down bool",
    ),
    pytest.param(
        team(max_cool_down_seconds=86401),
        "pools.team.max_cool_down_seconds: must be a number from 1 to 86400, got 86401",
        id="max cool-down high",
    ),
    pytest.param(
        team(max_cool_down_seconds=10),
        "pools.team.max_cool_down_seconds: must be at least default_cool_down_seconds (30), got 10",
        id="max below default",
    ),
    pytest.param(
        team(default_cool_down_seconds=120, max_cool_down_seconds=60),
        "pools.team.max_cool_down_seconds: must be at least "
        "default_cool_down_seconds (120), got 60",
        id="max below given default",
    ),
    pytest.param(
        drop("gateway", "limits"),
        "pools.team: a pool needs [gateway.limits]: its members' cool-downs are "
        "shared by every worker through that Redis (README: Limits and budgets)",
        id="no limits store",
    ),
    pytest.param(  # without [gateway.auth] (so with API-key members only): no runtime keys
        both(
            drop("gateway", "auth"),
            team(members=[{"name": "spare", "api_key": {"env": "SPARE_KEY"}}]),
            lambda c: c["pools"].update(
                teams={"members": [{"name": "other", "api_key": {"env": "OTHER_KEY"}}]}
            ),
        ),
        "pools.teams: no [[keys]] entry has pool = 'teams'; did you mean 'team'? "
        "(and without [gateway.auth] no runtime key can)",
        id="unused",
    ),
    # its members
    pytest.param(
        add_member(account="acct-a", name="again"),
        "pools.team.members[3]: the same member as members[0] (account:acct-a)",
        id="same account",
    ),
    pytest.param(
        add_member(account="acct-b", mode="api_key", api_key={"env": "OTHER_KEY"}),
        "pools.team.members[3]: the same member as members[1] (account:acct-b)",
        id="same account, other mode",
    ),
    pytest.param(
        add_member(name="spare", api_key={"env": "OTHER_KEY"}),
        "pools.team.members[3]: the same member as members[2] (key:spare)",
        id="same name",
    ),
    pytest.param(
        add_member(name="spare2", api_key={"env": "SPARE_KEY"}),
        "pools.team.members[3].api_key: the same secret as members[2].api_key (env SPARE_KEY)",
        id="same secret",
    ),
    pytest.param(
        add_member(account="acct-c", mode="api_key", api_key={"env": "B_KEY"}),
        "pools.team.members[3].api_key: the same secret as members[1].api_key (env B_KEY)",
        id="same secret, account member",
    ),
    pytest.param(
        add_member(name="b-again", api_key={"env": "B_KEY_AGAIN"}),
        "pools.team.members[3].api_key: the same API key as members[1].api_key "
        "(through another secret)",
        id="same key, other secret",
    ),
    pytest.param(
        add_member(api_key={"env": "OTHER_KEY"}),
        "pools.team.members[3].name: required for a member without an account (its "
        "id is key:<name>, stable across restarts and workers)",
        id="key without name",
    ),
    pytest.param(
        member(2, name=""),
        "pools.team.members[2].name: must be a non-empty string, got ''",
        id="empty name",
    ),
    pytest.param(
        add_member(name="nothing"),
        "pools.team.members[3]: names no credential: an account, an api_key or both",
        id="no credential",
    ),
    pytest.param(
        member(0, mode="oath"),
        "pools.team.members[0].mode: must be one of oauth, api_key, auto, got "
        "'oath'; did you mean 'oauth'?",
        id="unknown mode",
    ),
    pytest.param(
        member(0, mode="pool"),
        "pools.team.members[0].mode: must be one of oauth, api_key, auto, got 'pool'",
        id="mode pool",
    ),
    pytest.param(
        add_member(account="acct-c", mode="api_key"),
        "pools.team.members[3].api_key: mode 'api_key' needs an upstream key, named "
        f"explicitly ({SECRET_FORMS})",
        id="api_key mode without key",
    ),
    pytest.param(
        add_member(name="x", mode="auto", api_key={"env": "OTHER_KEY"}),
        "pools.team.members[3].account: required for mode 'auto'",
        id="auto without account",
    ),
    pytest.param(
        add_member(name="x", mode="oauth", api_key={"env": "OTHER_KEY"}),
        "pools.team.members[3].account: required for mode 'oauth'",
        id="oauth without account",
    ),
    pytest.param(
        team(members=[{"acount": "acct-a"}]),
        "pools.team.members[0].acount: unknown key; did you mean 'account'?",
        id="unknown member key",
    ),
    pytest.param(
        member(1, api_key={"env": "MISSING"}),
        "pools.team.members[1].api_key: environment variable MISSING is not set or empty",
        id="unset secret",
    ),
    pytest.param(
        member(2, api_key="sk-inline"),
        f"pools.team.members[2].api_key: a secret must be {SECRET_FORMS}, never inline",
        id="inline secret",
    ),
    pytest.param(
        drop("gateway", "auth"),
        "gateway.auth: required by pools.team.members[0] (mode 'oauth')",
        id="oauth needs auth",
    ),
    pytest.param(
        both(drop("gateway", "auth"), member(0, mode="api_key", api_key={"env": "OTHER_KEY"})),
        "gateway.auth: required by pools.team.members[1] (mode 'auto')",
        id="auto needs auth",
    ),
    # the keys that name it
    pytest.param(
        key(mode="oauth"),
        "keys[0].pool: a key names a pool or its own credential, not both: remove "
        "mode (key 'alice')",
        id="pool and mode",
    ),
    pytest.param(
        key(account="acct-a", api_key={"env": "B_KEY"}),
        "keys[0].pool: a key names a pool or its own credential, not both: remove "
        "account, api_key (key 'alice')",
        id="pool and credential",
    ),
    pytest.param(
        key(pool="tema"),
        "keys[0].pool: no [pools.tema]; did you mean 'team'? (key 'alice')",
        id="unknown pool",
    ),
    pytest.param(
        both(drop("pools"), key(pool="team")),
        "keys[0].pool: no [pools.team] (key 'alice')",
        id="no pools at all",
    ),
    pytest.param(
        key(pool=["team"]),
        "keys[0].pool: must be a non-empty string, got ['team']",
        id="pool not a string",
    ),
]


@pytest.mark.parametrize(("edit", "message"), BAD)
def test_a_bad_pool_is_one_error_naming_where(edit: Edit, message: str) -> None:
    config = data()
    edit(config)
    with pytest.raises(ConfigError) as caught:
        parse(config)
    assert str(caught.value) == message


def test_the_file_is_named_too(tmp_path: Path) -> None:
    config = data()
    config["pools"]["team"]["strategy"] = "afinity"
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps(config))
    with pytest.raises(ConfigError) as caught:
        load_gateway_config(str(path), ENV)
    assert str(caught.value) == (
        f"{path}: pools.team.strategy: must be one of affinity, round_robin, got 'afinity'; "
        "did you mean 'affinity'?"
    )
