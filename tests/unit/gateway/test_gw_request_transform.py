"""Request transforms: headers, betas, query, system preamble, tool prefixing."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.gateway.core.request_transform import (
    Profile,
    RequestShapeError,
    decode_json_body,
    encode_json_body,
    merge_query,
    transform_body,
    transform_headers,
    transform_request,
)

BEARER = ("authorization", "Bearer upstream-oauth-token")
PREFIXED = Profile(tool_prefix="mcp_")

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"name": {"type": "string"}}},
}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
BASH = {"type": "bash_20250124", "name": "bash"}


def request(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    }
    body.update(fields)
    return body


def headers_dict(headers: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        assert name not in out, f"duplicate header {name}"
        out[name] = value
    return out


# -- headers ------------------------------------------------------------------------


def test_client_keys_are_never_forwarded() -> None:
    client = [
        ("Host", "gateway.local"),
        ("X-Api-Key", "gw-key-secret"),
        ("Authorization", "Bearer gw-key-secret"),
        ("anthropic-version", "2023-06-01"),
        ("Content-Type", "application/json"),
        ("Content-Length", "123"),
        ("User-Agent", "Anthropic/Python 0.69.0"),
    ]
    out = transform_headers(client, Profile(), upstream_auth=BEARER)
    assert out == [
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
        ("user-agent", "Anthropic/Python 0.69.0"),
        ("authorization", "Bearer upstream-oauth-token"),
    ]
    assert all("gw-key-secret" not in value for _, value in out)


def test_api_key_mode_sets_x_api_key() -> None:
    out = transform_headers(
        {"x-api-key": "gw-key", "authorization": "Bearer gw-key"},
        Profile(),
        upstream_auth=("x-api-key", "sk-ant-upstream"),
    )
    assert out == [("x-api-key", "sk-ant-upstream")]


def test_hop_by_hop_and_connection_listed_headers_are_dropped() -> None:
    client = [
        ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic abc"),
        ("x-private", "secret"),
        ("Expect", "100-continue"),
        ("Accept-Encoding", "gzip"),
        ("Content-Encoding", "gzip"),
        ("accept", "application/json"),
    ]
    out = transform_headers(client, Profile(), upstream_auth=BEARER)
    assert out == [("accept", "application/json"), BEARER]


@pytest.mark.parametrize(
    ("client", "profile_betas", "expected"),
    [
        ([], (), None),
        ([("anthropic-beta", "a")], (), "a"),
        ([], ("oauth-2025-04-20",), "oauth-2025-04-20"),
        ([("anthropic-beta", "a,b")], ("c",), "a,b,c"),
        ([("anthropic-beta", "a, b"), ("Anthropic-Beta", "b ,c")], ("c", "d", "a"), "a,b,c,d"),
        ([("anthropic-beta", " , ,")], ("x",), "x"),
        ([("anthropic-beta", "z")], ("y", "y"), "z,y"),
    ],
)
def test_beta_merge(
    client: list[tuple[str, str]], profile_betas: tuple[str, ...], expected: str | None
) -> None:
    out = headers_dict(
        transform_headers(client, Profile(betas=profile_betas), upstream_auth=BEARER)
    )
    assert out.get("anthropic-beta") == expected


def test_strip_and_set_headers() -> None:
    profile = Profile(
        strip_headers=("X-Stainless-OS", "anthropic-beta"),
        set_headers=(("User-Agent", "keyrelay"), ("x-extra", "1")),
        betas=("oauth-2025-04-20",),
    )
    client = {
        "x-stainless-os": "Linux",
        "user-agent": "curl/8",
        "anthropic-beta": "client-beta",
        "anthropic-version": "2023-06-01",
    }
    out = headers_dict(transform_headers(client, profile, upstream_auth=BEARER))
    assert out == {
        "anthropic-version": "2023-06-01",
        # Stripping the client's betas leaves only the profile's.
        "anthropic-beta": "oauth-2025-04-20",
        "user-agent": "keyrelay",
        "x-extra": "1",
        "authorization": "Bearer upstream-oauth-token",
    }


@pytest.mark.parametrize(
    "profile_kwargs",
    [
        {"set_headers": (("Authorization", "Bearer x"),)},
        {"set_headers": (("x-api-key", "k"),)},
        {"set_headers": (("host", "h"),)},
        {"set_headers": (("bad name", "v"),)},
        {"set_headers": (("x-ok", "a\r\nb"),)},
        {"set_headers": (("x-ok", "caf\u00e9 \u2603"),)},  # beyond latin-1
        {"strip_headers": ("",)},
        {"betas": ("a,b",)},
        {"betas": ("",)},
        {"system_preamble": ""},
        {"tool_prefix": ""},
        {"tool_prefix": "p" * 49},
    ],
)
def test_profile_validation(profile_kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Profile(**profile_kwargs)


def test_profile_normalises() -> None:
    profile = Profile(
        betas=["a"],  # type: ignore[arg-type]
        strip_headers=["X-Foo"],  # type: ignore[arg-type]
        set_headers=[("X-Bar", "1")],  # type: ignore[arg-type]
        query=[("beta", "true")],  # type: ignore[arg-type]
    )
    assert profile.betas == ("a",)
    assert profile.strip_headers == ("x-foo",)
    assert profile.set_headers == (("x-bar", "1"),)
    assert profile.query == (("beta", "true"),)
    same = Profile(
        betas=("a",),
        strip_headers=("x-foo",),
        set_headers=(("x-bar", "1"),),
        query=(("beta", "true"),),
    )
    assert hash(profile) == hash(same)


def test_upstream_auth_header_injection_is_refused() -> None:
    with pytest.raises(ValueError):
        transform_headers([], Profile(), upstream_auth=("authorization", "Bearer a\r\nx-evil: 1"))


_header_names = st.sampled_from(
    ["x-api-key", "X-API-KEY", "authorization", "Authorization", "anthropic-version",
     "anthropic-beta", "content-type", "x-custom", "connection", "host"]
)  # fmt: skip
_header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_header_names, _header_values), max_size=10))
def test_client_auth_headers_never_reach_upstream(client: list[tuple[str, str]]) -> None:
    out = transform_headers(client, Profile(betas=("b1",)), upstream_auth=BEARER)
    auth = [(n, v) for n, v in out if n in ("x-api-key", "authorization")]
    assert auth == [BEARER]
    assert all(n == n.lower() for n, _ in out)
    assert sum(n == "anthropic-beta" for n, _ in out) == 1


# -- query ---------------------------------------------------------------------------


def test_query_merge() -> None:
    assert merge_query([("beta", "true")], Profile()) == (("beta", "true"),)
    profile = Profile(query=(("beta", "true"), ("x", "1")))
    assert merge_query([("beta", "false"), ("y", "2"), ("beta", "0")], profile) == (
        ("y", "2"),
        ("beta", "true"),
        ("x", "1"),
    )
    assert merge_query([], profile) == (("beta", "true"), ("x", "1"))


# -- system preamble -------------------------------------------------------------------

PREAMBLE = Profile(system_preamble="You are Claude Code, Anthropic's official CLI for Claude.")
PREAMBLE_BLOCK = {"type": "text", "text": PREAMBLE.system_preamble}
CACHED = {"type": "text", "text": "Long rules", "cache_control": {"type": "ephemeral"}}


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        (None, [PREAMBLE_BLOCK]),
        ("", [PREAMBLE_BLOCK]),
        ("Be terse.", [PREAMBLE_BLOCK, {"type": "text", "text": "Be terse."}]),
        ([], [PREAMBLE_BLOCK]),
        ([CACHED], [PREAMBLE_BLOCK, CACHED]),
        (
            [{"type": "text", "text": "a"}, CACHED],
            [PREAMBLE_BLOCK, {"type": "text", "text": "a"}, CACHED],
        ),
    ],
)
def test_system_preamble(system: Any, expected: list[Any]) -> None:
    body = request() if system is None else request(system=system)
    out, table, changed = transform_body(body, PREAMBLE)
    assert changed
    assert table is None
    assert out["system"] == expected
    if isinstance(system, list):
        # Existing blocks are kept as they are (same objects, cache_control included).
        assert all(a is b for a, b in zip(out["system"][1:], system, strict=True))


def test_system_null_is_like_absent() -> None:
    out, _, _ = transform_body(request(system=None), PREAMBLE)
    assert out["system"] == [PREAMBLE_BLOCK]


@pytest.mark.parametrize("system", [42, {"type": "text", "text": "x"}, True])
def test_system_of_the_wrong_type(system: Any) -> None:
    with pytest.raises(RequestShapeError, match="system must be"):
        transform_body(request(system=system), PREAMBLE)


# -- tool prefix ----------------------------------------------------------------------


def test_custom_tools_prefixed_server_tools_untouched() -> None:
    custom_typed = {**WEATHER, "name": "lookup", "type": "custom"}
    body = request(tools=[WEATHER, WEB_SEARCH, BASH, custom_typed, {**WEATHER, "name": "mcp_x"}])
    out, table, changed = transform_body(body, PREFIXED)
    assert changed
    assert table is not None
    assert [t["name"] for t in out["tools"]] == [
        "mcp_get_weather",
        "web_search",
        "bash",
        "mcp_lookup",
        "mcp_mcp_x",
    ]
    assert out["tools"][1] is WEB_SEARCH
    assert out["tools"][2] is BASH
    # Everything but the name is kept, including a "name" property in the schema.
    assert out["tools"][0]["input_schema"] is WEATHER["input_schema"]
    assert out["tools"][3]["type"] == "custom"
    assert table.items() == [
        ("get_weather", "mcp_get_weather"),
        ("lookup", "mcp_lookup"),
        ("mcp_x", "mcp_mcp_x"),
    ]


def test_type_null_counts_as_custom() -> None:
    out, _, _ = transform_body(request(tools=[{**WEATHER, "type": None}]), PREFIXED)
    assert out["tools"][0]["name"] == "mcp_get_weather"


def test_server_tools_without_a_name_are_fine() -> None:
    toolset = {"type": "mcp_toolset", "mcp_server_name": "docs"}
    out, table, changed = transform_body(request(tools=[toolset]), PREFIXED)
    assert not changed
    assert out["tools"][0] is toolset
    assert table is not None
    assert len(table) == 0


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "tool", "name": "get_weather"}, {"type": "tool", "name": "mcp_get_weather"}),
        (
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {"type": "tool", "name": "mcp_get_weather", "disable_parallel_tool_use": True},
        ),
        ({"type": "tool", "name": "web_search"}, {"type": "tool", "name": "web_search"}),
        ({"type": "tool", "name": "undefined"}, {"type": "tool", "name": "undefined"}),
        ({"type": "auto"}, {"type": "auto"}),
        ({"type": "any"}, {"type": "any"}),
        ({"type": "none"}, {"type": "none"}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out, _, _ = transform_body(request(tools=[WEATHER, WEB_SEARCH], tool_choice=choice), PREFIXED)
    assert out["tool_choice"] == expected


def test_history_tool_use_blocks() -> None:
    tool_input = {"name": "Paris", "mcp_name": "mcp_get_weather"}
    messages = [
        {"role": "user", "content": "Weather in Paris, and run ls?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": 'Calling "name": get_weather'},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": tool_input},
                {"type": "tool_use", "id": "toolu_2", "name": "bash", "input": {"command": "ls"}},
                {"type": "tool_use", "id": "toolu_3", "name": "old_tool", "input": {}},
                {
                    "type": "server_tool_use",
                    "id": "srvtoolu_1",
                    "name": "web_search",
                    "input": {"query": "q"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_use", "id": "toolu_x", "name": "user_side", "input": {}},
            ],
        },
        {"role": "assistant", "content": "plain string content"},
    ]
    body = request(tools=[WEATHER, BASH], messages=messages)
    original = copy.deepcopy(body)
    out, table, changed = transform_body(body, PREFIXED)
    assert changed
    assert table is not None
    assert body == original  # the input is never mutated
    blocks = out["messages"][1]["content"]
    assert [b.get("name") for b in blocks] == [
        None,
        "mcp_get_weather",
        "bash",  # a typed tool of this request keeps its name
        "mcp_old_tool",  # not defined any more: still prefixed, and mapped back
        "web_search",
    ]
    assert blocks[0] is messages[1]["content"][0]  # type: ignore[index]
    assert blocks[1]["input"] is tool_input  # a "name" inside input is never touched
    assert blocks[4] is messages[1]["content"][4]  # type: ignore[index]
    assert out["messages"][0] is messages[0]
    assert out["messages"][2] is messages[2]  # only assistant messages are rewritten
    assert out["messages"][3] is messages[3]
    assert table.to_client("mcp_old_tool") == "old_tool"


def test_history_without_tools_is_prefixed() -> None:
    messages = [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}],
        }
    ]
    out, table, _ = transform_body(request(messages=messages), PREFIXED)
    assert out["messages"][0]["content"][0]["name"] == "mcp_x"
    assert table is not None
    assert table.items() == [("x", "mcp_x")]


def test_nothing_to_prefix_keeps_the_body() -> None:
    body = request(tools=[WEB_SEARCH])
    out, table, changed = transform_body(body, PREFIXED)
    assert out is body
    assert not changed
    assert table is not None
    result = transform_request(body, {}, PREFIXED, upstream_auth=BEARER)
    original = json.dumps(body).encode()
    assert result.body_bytes(original) is original


def test_no_profile_changes_nothing() -> None:
    body = request(tools=[WEATHER], system="s")
    out, table, changed = transform_body(body, Profile())
    assert out is body
    assert table is None
    assert not changed


def test_long_and_multibyte_names_get_aliases() -> None:
    long_name = "ツール" * 8  # 72 bytes
    body = request(
        tools=[{**WEATHER, "name": long_name}],
        tool_choice={"type": "tool", "name": long_name},
        messages=[
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": long_name, "input": {}}],
            },
        ],
    )
    out, table, _ = transform_body(body, PREFIXED)
    assert table is not None
    alias = "mcp_d39abf37454ef93a"
    assert out["tools"][0]["name"] == alias
    assert out["tool_choice"]["name"] == alias
    assert out["messages"][1]["content"][0]["name"] == alias
    assert table.to_client(alias) == long_name


def test_alias_collision_is_a_shape_error() -> None:
    long_name = "ツール" * 8
    body = request(tools=[{**WEATHER, "name": long_name}, {**WEATHER, "name": "d39abf37454ef93a"}])
    with pytest.raises(RequestShapeError, match="both be sent upstream"):
        transform_body(body, PREFIXED)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": {"name": "x"}}, "tools must be an array"),
        ({"tools": ["x"]}, r"tools\[0\] must be an object"),
        ({"tools": [{"description": "no name"}]}, r"tools\[0\].name must be a non-empty string"),
        ({"tools": [WEATHER, {"name": 7}]}, r"tools\[1\].name"),
        ({"tools": [{"name": ""}]}, r"tools\[0\].name"),
        ({"tools": [{"name": "x", "type": 3}]}, r"tools\[0\].type must be a string"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name must be a string"),
        ({"messages": "hello"}, "messages must be an array"),
        ({"messages": ["hello"]}, r"messages\[0\] must be an object"),
        ({"messages": [{"role": "assistant", "content": ["x"]}]}, r"messages\[0\].content\[0\]"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t"}]}]},
            r"messages\[0\].content\[0\].name",
        ),
    ],
)
def test_shape_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestShapeError, match=message):
        transform_body(request(**fields), PREFIXED)


@pytest.mark.parametrize("body", [[], "x", 1, None])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(RequestShapeError, match="JSON object"):
        transform_body(body, Profile())


def test_shapes_are_only_checked_where_read() -> None:
    # Without tool_prefix the gateway does not look at tools or messages.
    body = request(tools="nonsense", messages="nonsense")
    out, _, changed = transform_body(body, Profile())
    assert out is body
    assert not changed


# -- whole request, JSON in and out --------------------------------------------------------


def test_transform_request() -> None:
    profile = Profile(
        betas=("oauth-2025-04-20",),
        query=(("beta", "true"),),
        system_preamble="You are Claude Code.",
        tool_prefix="mcp_",
    )
    body = request(tools=[WEATHER], system=[CACHED])
    result = transform_request(
        body,
        [("x-api-key", "gw"), ("anthropic-beta", "prompt-caching-2024-07-31")],
        profile,
        upstream_auth=BEARER,
        query=[("beta", "false")],
    )
    assert result.headers == [
        ("anthropic-beta", "prompt-caching-2024-07-31,oauth-2025-04-20"),
        BEARER,
    ]
    assert result.query == (("beta", "true"),)
    assert result.body_changed
    assert result.tool_names is not None
    sent = json.loads(result.body_bytes(b"ignored"))
    assert sent["system"] == [{"type": "text", "text": "You are Claude Code."}, CACHED]
    assert sent["tools"][0]["name"] == "mcp_get_weather"


def test_decode_json_body() -> None:
    assert decode_json_body(b'{"a": 1}') == {"a": 1}
    assert decode_json_body('{"é": "ü"}'.encode()) == {"é": "ü"}
    with pytest.raises(RequestShapeError, match="not valid JSON"):
        decode_json_body(b"{")
    with pytest.raises(RequestShapeError, match="not valid JSON"):
        decode_json_body(b'{"a": NaN}')
    with pytest.raises(RequestShapeError, match="not valid JSON"):
        decode_json_body(b"\xff\xfe\xfd")
    with pytest.raises(RequestShapeError, match="not valid JSON"):
        decode_json_body(b"[" * 100_000)
    with pytest.raises(RequestShapeError, match="JSON object"):
        decode_json_body(b"[1]")


def test_encode_json_body() -> None:
    assert encode_json_body({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()
    lone = json.loads('{"t": "\\ud800x"}')
    encoded = encode_json_body(lone)
    assert encoded == b'{"t":"\\ud800x"}'
    assert json.loads(encoded) == lone
