"""The official anthropic SDK through the gateway: only base_url and api_key change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest

from keyrelay.auth.v1 import auth_pb2
from tests.e2e.conftest import Stack
from tests.support.fake_upstream import Chunker, bytewise, random_chunks, whole
from tests.support.gateway import OAUTH_KEY
from tests.support.stack import gateway_md

TOOLS: list[dict[str, Any]] = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 1},
]
MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_00", "name": "get_weather", "input": {"city": "X"}}
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_00", "content": "sunny"}],
    },
]


def tool_uses(content: Sequence[Any]) -> list[Any]:
    """The tool_use blocks of a message (the SDK's block union is too wide for mypy)."""
    return [block for block in content if block.type == "tool_use"]


async def current_token(stack: Stack) -> str:
    reply = await stack.auth_stub.GetToken(
        auth_pb2.GetTokenRequest(account_id="acct"), metadata=gateway_md()
    )
    return reply.access_token


def assert_transformed(stack: Stack, token: str) -> None:
    seen = stack.upstream.last()
    body = seen.json()
    # Auth: the account's OAuth token, never a gateway or client key.
    assert seen.header("authorization") == f"Bearer {token}"
    assert seen.header("x-api-key") is None
    assert all(OAUTH_KEY not in value for _, value in seen.headers)
    assert OAUTH_KEY.encode() not in seen.body
    # Profile: betas merged after the client's, header policy, query.
    assert seen.header("anthropic-beta") == "client-beta,shared-beta,profile-beta-1"
    assert seen.header("x-strip-me") is None
    assert seen.header("x-set-by-profile") == "yes"
    assert ("beta", "true") in seen.query
    # Body: preamble block first, then the client's system block as it was.
    assert body["system"][0] == {"type": "text", "text": "You are behind keyrelay."}
    assert body["system"][1] == {
        "type": "text",
        "text": "Be brief.",
        "cache_control": {"type": "ephemeral"},
    }
    assert [t["name"] for t in body["tools"]] == ["mcp_get_weather", "web_search"]
    assert body["tool_choice"] == {"type": "tool", "name": "mcp_get_weather"}
    assert body["messages"][1]["content"][0]["name"] == "mcp_get_weather"


def request_options() -> dict[str, Any]:
    return {
        "model": "claude-test-1",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": MESSAGES,
        "extra_headers": {
            "anthropic-beta": "client-beta,shared-beta",
            "x-strip-me": "secret-ish",
        },
    }


async def test_non_streaming_tool_use(stack: Stack) -> None:
    async with stack.client() as client:
        message = await client.messages.create(**request_options())
    found = tool_uses(message.content)
    assert [b.name for b in found] == ["get_weather"]
    assert found[0].input == {"name": "the name key inside input", "city": "Paris"}
    assert message.usage.input_tokens == 25
    assert_transformed(stack, await current_token(stack))


@pytest.mark.parametrize(
    "chunker", [whole, bytewise, random_chunks(1), random_chunks(7, 3)], ids=str
)
async def test_streaming_tool_use_under_any_chunking(stack: Stack, chunker: Chunker) -> None:
    stack.upstream.chunker = chunker
    async with stack.client() as client, client.messages.stream(**request_options()) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(f"h\u00e9llo \u4e16\u754c {i} " for i in range(3))
    found = tool_uses(final.content)
    assert [b.name for b in found] == ["get_weather"]
    assert found[0].input == {"name": "the name key inside input", "city": "Paris"}
    assert final.usage.output_tokens == 12
    assert_transformed(stack, await current_token(stack))


async def test_count_tokens_is_transformed_too(stack: Stack) -> None:
    async with stack.client() as client:
        counted = await client.messages.count_tokens(
            model="claude-test-1", messages=cast(Any, MESSAGES), tools=cast(Any, TOOLS)
        )
    assert counted.input_tokens == 42
    seen = stack.upstream.last()
    assert seen.path == "/v1/messages/count_tokens"
    assert [t["name"] for t in seen.json()["tools"]] == ["mcp_get_weather", "web_search"]


async def test_a_tool_really_named_with_the_prefix_round_trips(stack: Stack) -> None:
    options = request_options()
    options["tools"] = [{**TOOLS[0], "name": "mcp_x"}]
    options["tool_choice"] = {"type": "auto"}
    options["messages"] = MESSAGES[:1]
    async with stack.client() as client:
        message = await client.messages.create(**options)
        async with client.messages.stream(**options) as stream:
            final = await stream.get_final_message()
    assert stack.upstream.last().json()["tools"][0]["name"] == "mcp_mcp_x"
    for result in (message, final):
        assert [b.name for b in tool_uses(result.content)] == ["mcp_x"]


async def test_long_tool_names_get_an_alias_and_map_back(stack: Stack) -> None:
    long_name = "t" * 62
    options = request_options()
    options["tools"] = [{**TOOLS[0], "name": long_name}]
    options["tool_choice"] = {"type": "tool", "name": long_name}
    options["messages"] = MESSAGES[:1]
    async with stack.client() as client:
        message = await client.messages.create(**options)
    sent = stack.upstream.last().json()["tools"][0]["name"]
    assert sent.startswith("mcp_")
    assert len(sent.encode()) <= 64
    assert [b.name for b in tool_uses(message.content)] == [long_name]
