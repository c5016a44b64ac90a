"""``fast_json``: the stdlib's answers, through orjson only where orjson gives them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrelay.gateway.core import fast_json
from keyrelay.gateway.core.request_transform import (
    Profile,
    RequestShapeError,
    decode_json_body,
    transform_request,
)
from keyrelay.gateway.core.response_transform import inspect_response_json
from keyrelay.gateway.core.tool_names import ToolNameTable

BIG = 123456789012345678901234567890  # beyond 64 bits: orjson would read a float


def test_an_integer_beyond_64_bits_is_read_exactly() -> None:
    assert decode_json_body(f'{{"n": {BIG}, "m": -{BIG}}}'.encode()) == {"n": BIG, "m": -BIG}
    value, fast = fast_json.loads_flagged(f"[{2**64 - 1}, {-(2**63)}]".encode())
    assert value == [2**64 - 1, -(2**63)]
    assert not fast  # 19+ digits: the stdlib reads it


def test_a_big_integer_survives_a_rewritten_request_body() -> None:
    raw = json.dumps(
        {"model": "m", "metadata": {"n": BIG}, "messages": [], "tools": [{"name": "t"}]}
    ).encode()
    request = transform_request(
        decode_json_body(raw), [], Profile(tool_prefix="mcp_"), upstream_auth=("x-api-key", "k")
    )
    assert request.body_changed
    sent = json.loads(request.body_bytes(raw))
    assert sent["metadata"]["n"] == BIG
    assert sent["tools"] == [{"name": "mcp_t"}]


def test_a_lone_surrogate_escape_is_read_and_written_back_as_an_escape() -> None:
    raw = b'{"model": "m", "system": "\\ud800x", "messages": []}'
    body = decode_json_body(raw)
    assert body["system"] == "\ud800x"
    request = transform_request(
        body, [], Profile(system_preamble="P"), upstream_auth=("x-api-key", "k")
    )
    sent = request.body_bytes(raw)
    assert b'"\\ud800x"' in sent
    assert json.loads(sent)["system"][1] == {"type": "text", "text": "\ud800x"}


@pytest.mark.parametrize(
    "raw", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": [1, NaN]}']
)
def test_nan_and_infinity_are_refused(raw: bytes) -> None:
    with pytest.raises(RequestShapeError, match=r"NaN|Infinity"):
        decode_json_body(raw)


def test_errors_name_the_problem_as_the_stdlib_does() -> None:
    with pytest.raises(RequestShapeError, match="Expecting property name enclosed in double"):
        decode_json_body(b"{broken")
    with pytest.raises(RequestShapeError, match="JSON object"):
        decode_json_body(b'"a string"')
    with pytest.raises(RequestShapeError, match="JSON object"):
        decode_json_body(b"[1]")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1, "b": 2, "a": 3}',  # duplicate keys: the last wins, in the first one's place
        b'{"a": 1e400}',  # orjson refuses the overflow, the stdlib reads inf
        b'\xef\xbb\xbf{"a": 1}',  # a BOM
        '{"a": "é"}'.encode("utf-16"),
        b'{"phone": "12345678901234567890"}',  # a long digit run in a string
        b'{"a": ' + b"[" * 1100 + b"]" * 1100 + b"}",  # deeper than orjson's 1024
    ],
)
def test_what_the_stdlib_reads_is_read_the_same(raw: bytes) -> None:
    try:
        expected: Any = json.loads(raw)
    except RecursionError:
        with pytest.raises(RecursionError):
            fast_json.loads(raw)
        return
    assert fast_json.loads(raw) == expected
    assert list(fast_json.loads(raw)) == list(expected)


def test_dumps_keeps_the_stdlibs_nan_rules() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        fast_json.dumps({"a": float("inf"), "b": None}, fast=False, allow_nan=False)
    assert fast_json.dumps({"a": float("nan")}, fast=False, allow_nan=True) == b'{"a":NaN}'
    assert fast_json.dumps({"a": None, "é": [BIG]}, fast=False, allow_nan=False) == (
        f'{{"a":null,"é":[{BIG}]}}'.encode()
    )


def test_a_response_with_an_unmapped_surrogate_or_big_int_is_rewritten_exactly() -> None:
    table = ToolNameTable("mcp_")
    table.add("get")
    body = (
        f'{{"type":"message","n":{BIG},"stop_sequence":null,'
        '"content":[{"type":"tool_use","id":"\\udfff","name":"mcp_get","input":{}}]}'
    ).encode()
    out = json.loads(inspect_response_json(body, table).body)
    assert out["n"] == BIG
    assert out["stop_sequence"] is None
    assert out["content"][0] == {"type": "tool_use", "id": "\udfff", "name": "get", "input": {}}


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(_JSON)
def test_loads_and_dumps_agree_with_the_stdlib(value: Any) -> None:
    raw = json.dumps(value).encode()
    assert fast_json.loads(raw) == json.loads(raw)
    compact = fast_json.dumps(json.loads(raw), fast=False, allow_nan=False)
    assert json.loads(compact) == json.loads(raw)
