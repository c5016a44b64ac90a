"""Parsing authorization codes as people paste them, and checking their state."""

from __future__ import annotations

import dataclasses
from urllib.parse import quote, quote_plus, urlencode

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from keyrelay.auth.core.codes import MAX_PASTED_LEN, PastedCode, parse_pasted_code, resolve_state
from keyrelay.auth.core.errors import InvalidArgument

VSCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
# Characters that the bare and code#state forms cannot carry unambiguously.
PLAIN = "".join(c for c in VSCHAR if c not in "#&=?%+")

plain_values = st.text(alphabet=PLAIN, min_size=1, max_size=60).filter(
    lambda s: not s.lower().startswith(("http://", "https://"))
)
vschar_values = st.text(alphabet=VSCHAR, min_size=1, max_size=60)
# Codes a broken provider might hand out: VSCHAR plus space and some non-ASCII.
awkward_values = st.text(alphabet=VSCHAR + " \u00e9\u2028", min_size=1, max_size=60)


@pytest.mark.parametrize(
    ("text", "code", "state"),
    [
        # bare
        ("abc123", "abc123", None),
        ("  abc123\n", "abc123", None),
        ("\tabc123\r\n", "abc123", None),
        ("4/0AbC-dEf_gHi.~x", "4/0AbC-dEf_gHi.~x", None),
        ("abc==", "abc==", None),  # base64 padding is not a query
        ("a=b", "a=b", None),
        ("x" * MAX_PASTED_LEN, "x" * MAX_PASTED_LEN, None),
        # code#state
        ("abc#xyz", "abc", "xyz"),
        ("abc==#xyz", "abc==", "xyz"),
        (" abc#xyz ", "abc", "xyz"),
        # full redirect URL
        ("https://app.example/cb?code=abc&state=xyz", "abc", "xyz"),
        ("https://app.example/cb?state=xyz&code=abc", "abc", "xyz"),
        ("HTTPS://APP.EXAMPLE/cb?code=abc&state=xyz", "abc", "xyz"),
        ("http://127.0.0.1:8765/callback?code=abc&state=xyz", "abc", "xyz"),
        ("http://[::1]:8765/callback?code=abc", "abc", None),
        ("https://app.example/cb?code=a%2Fb%2Bc%3D&state=s%3D%261", "a/b+c=", "s=&1"),
        ("https://app.example/cb?code=abc&state=", "abc", None),
        ("https://app.example/cb?code=abc&state=xyz&iss=https%3A%2F%2Fauth.example", "abc", "xyz"),
        ("https://app.example/cb?&code=abc&&state=xyz&", "abc", "xyz"),
        ("https://app.example/cb?code=abc&scope=a+b", "abc", None),  # "+" elsewhere is fine
        # parameters in the fragment
        ("https://app.example/cb#code=abc&state=xyz", "abc", "xyz"),
        ("https://app.example/cb?foo=1#code=abc&state=xyz", "abc", "xyz"),
        # the query wins when it has the code
        ("https://app.example/cb?code=abc&state=xyz#code=other&state=zzz", "abc", "xyz"),
        # query strings
        ("?code=abc&state=xyz", "abc", "xyz"),
        ("code=abc&state=xyz", "abc", "xyz"),
        ("state=xyz&code=abc", "abc", "xyz"),
        ("code=abc", "abc", None),
        ("#code=abc&state=xyz", "abc", "xyz"),
        ("code=a%2Bb", "a+b", None),
        ("code=abc#fragment", "abc", None),
        # an address pasted without its scheme
        ("app.example/cb?code=abc&state=xyz", "abc", "xyz"),
        ("app.example/cb#code=abc&state=xyz", "abc", "xyz"),
    ],
)
def test_accepted_forms(text: str, code: str, state: str | None) -> None:
    assert parse_pasted_code(text) == PastedCode(code=code, state=state)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no authorization code was given"),
        ("   ", "no authorization code was given"),
        ("\n\t\r ", "no authorization code was given"),
        ("x" * (MAX_PASTED_LEN + 1), f"more than the {MAX_PASTED_LEN}"),
        ("ab c", "a space or line break at position 3"),
        ("ab\ncd", "a space or line break at position 3"),
        ("ab\u00a0cd", "a space or line break"),
        ("ab\u2028cd", "a space or line break"),
        ("ab\x00cd", "an invisible control character at position 3"),
        ("ab\x7fcd", "an invisible control character"),
        ("ab\u200bcd", "an invisible control character"),  # zero-width space
        ("ab\ufeffcd", "an invisible control character"),
        ("https://app.example/cb?code=abc\nstate=x", "a space or line break"),
        ("abc#d e", "a space or line break"),
        # the provider said no
        (
            "https://app.example/cb?error=access_denied&error_description=The+user+denied+access",
            r"^the provider refused the authorization: access_denied \(The user denied access\); "
            r"start a new connection$",
        ),
        (
            "https://app.example/cb?code=abc&error=server_error",
            "refused the authorization: server_error; start a new connection",
        ),
        (
            "https://app.example/cb#error=access_denied&state=xyz",
            "refused the authorization: access_denied; start",
        ),
        ("?error=invalid_scope", "refused the authorization: invalid_scope; start"),
        ("error=access_denied&error_description=no%07bell", r"access_denied \(nobell\)"),
        # no code
        ("https://app.example/cb", "has no code parameter"),
        ("https://app.example/cb?state=xyz", "has no code parameter"),
        ("https://app.example/cb?foo=bar#baz", "has no code parameter"),
        ("https://app.example/cb?error=", "has no code parameter"),
        ("state=xyz", "has no code parameter"),
        ("?foo=bar", "has no code parameter"),
        ("?abc", "has no code parameter"),
        ("app.example/cb?state=xyz", "has no code parameter"),
        # code or state more than once, or empty
        ("https://app.example/cb?code=a&code=b", "more than one code parameter"),
        ("https://app.example/cb?code=a&code=a", "more than one code parameter"),
        ("code=a&code=", "more than one code parameter"),
        ("https://app.example/cb?code=&state=xyz", "code parameter in the pasted address is empty"),
        ("?code", "code parameter in the pasted text is empty"),
        ("code=&state=x", "is empty"),
        ("https://app.example/cb?code=a&state=x&state=y", "more than one state parameter"),
        ("https://app.example/cb?code=a&state=x&state=", "more than one state parameter"),
        # code#state
        ("abc#", "nothing after the '#'"),
        ("#abc", "nothing before the '#'"),
        ("#", "nothing before the '#'"),
        ("a#b#c", "more than one '#'"),
        ("a##b", "more than one '#'"),
        # characters outside VSCHAR
        ("abcé", "the code contains a character that cannot be part of an OAuth code"),
        ("abc#xyé", "the state contains a character that cannot be part of an OAuth state"),
        ("abc\ud800", "the code contains a character"),
        ("code=a%20b", r"position 2 \(a space, written '\+' or '%20' in an address\)"),
        ("code=a+b", r"position 2 \(a space"),
        ("code=%C3%A9", "the code contains a character"),
        ("code=%FF", "the code contains a character"),  # invalid UTF-8 after decoding
        ("code=a%00b", "the code contains a character"),
        ("code=abc&state=%0A", "the state contains a character"),
        ("https://app.example/cb?code=abc&state=x%7Fy", "the state contains a character"),
        # not a URL at all
        ("http://[::1/cb?code=abc", "not a valid URL"),
    ],
)
def test_rejected_forms(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_pasted_code(text)


@pytest.mark.parametrize(
    "text",
    [
        "https://app.example/cb?code=SECRET1&code=SECRET2",
        "https://app.example/cb?code=SECRET1&state=SECRET2&state=SECRET3",
        "SECRET1é",
        "SECRET1#SECRET2#SECRET3",
        "SECRET1#",
        "#SECRET1",
        "code=SECRET1+SECRET2",
        "SECRET1 SECRET2",
    ],
)
def test_messages_never_repeat_the_pasted_values(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_pasted_code(text)
    assert "SECRET" not in str(info.value)
    assert "SECRET" not in repr(info.value)


def test_provider_error_text_is_shortened() -> None:
    text = "?error=access_denied&error_description=" + "x" * 1000
    with pytest.raises(InvalidArgument) as info:
        parse_pasted_code(text)
    assert "x" * 199 + "…" in str(info.value)
    assert "x" * 200 not in str(info.value)


def test_repr_hides_code_and_state() -> None:
    pasted = PastedCode(code="SECRETCODE", state="SECRETSTATE")
    assert "SECRET" not in repr(pasted)
    assert repr(pasted) == "PastedCode(code=<10 chars>, state=<present>)"
    assert repr(PastedCode(code="c", state=None)) == "PastedCode(code=<1 chars>, state=None)"


def test_pasted_code_is_frozen() -> None:
    pasted = PastedCode(code="abc", state=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pasted.code = "other"  # type: ignore[misc]


# --- properties ------------------------------------------------------------------------------


@given(code=plain_values, state=plain_values)
def test_the_three_forms_agree(code: str, state: str) -> None:
    url = "https://app.example/callback?" + urlencode({"code": code, "state": state})
    assert parse_pasted_code(code) == PastedCode(code=code, state=None)
    assert parse_pasted_code(f"{code}#{state}") == PastedCode(code=code, state=state)
    assert parse_pasted_code(url) == PastedCode(code=code, state=state)


@given(
    code=awkward_values,
    state=st.none() | awkward_values,
    quote_via=st.sampled_from([quote_plus, quote]),
    in_fragment=st.booleans(),
    scheme=st.sampled_from(["https://app.example/callback", "http://127.0.0.1:8765/cb", ""]),
)
@example(code="a#b&c=d?e%f+g", state="s#&=?%+", quote_via=quote_plus, in_fragment=False, scheme="")
@example(code="a b", state=None, quote_via=quote_plus, in_fragment=False, scheme="")
def test_urlencoded_redirects_round_trip(
    code: str,
    state: str | None,
    quote_via: object,
    in_fragment: bool,
    scheme: str,
) -> None:
    params = {"code": code} if state is None else {"code": code, "state": state}
    query = urlencode(params, quote_via=quote_via)  # type: ignore[arg-type]
    text = f"{scheme}{'#' if in_fragment else '?'}{query}"
    if all(c in VSCHAR for c in code + (state or "")):
        assert parse_pasted_code(text) == PastedCode(code=code, state=state)
    else:
        with pytest.raises(InvalidArgument, match="contains a character"):
            parse_pasted_code(text)


@given(st.text(max_size=300))
@example("\ud800")
@example("code=%ED%A0%80")
@example("https://[")
@example("http://x:99999999/?code=a")
def test_arbitrary_text_only_raises_invalid_argument(text: str) -> None:
    try:
        pasted = parse_pasted_code(text)
    except InvalidArgument:
        return
    assert pasted.code
    assert all(c in VSCHAR for c in pasted.code)
    assert pasted.state is None or (pasted.state and all(c in VSCHAR for c in pasted.state))


paste_pieces = st.sampled_from(
    [
        "https://",
        "http://",
        "app.example/cb",
        "?",
        "#",
        "&",
        "=",
        "code",
        "state",
        "error",
        "error_description",
        "%",
        "%2",
        "%23",
        "%FF",
        "+",
        "abc",
        " ",
        "\x00",
        "é",
    ]
)


@given(st.lists(paste_pieces, max_size=20).map("".join))
def test_url_shaped_text_only_raises_invalid_argument(text: str) -> None:
    try:
        pasted = parse_pasted_code(text)
    except InvalidArgument:
        return
    assert pasted.code
    assert all(c in VSCHAR for c in pasted.code)


# --- resolve_state ---------------------------------------------------------------------------

EXPECTED = "expected-state"


@pytest.mark.parametrize(
    ("pasted_state", "explicit"),
    [
        (None, None),  # a bare code: bound to the verifier alone
        (None, ""),
        (EXPECTED, None),
        (EXPECTED, ""),
        (None, EXPECTED),
        (EXPECTED, EXPECTED),
    ],
)
def test_resolve_state_accepts(pasted_state: str | None, explicit: str | None) -> None:
    resolve_state(PastedCode(code="c", state=pasted_state), explicit, EXPECTED)


@pytest.mark.parametrize(
    ("pasted_state", "explicit", "message"),
    [
        ("other", None, "state mismatch: this code belongs to a different connection attempt"),
        ("other", "", "state mismatch"),
        (None, "other", "state mismatch"),
        ("other", "other", "state mismatch"),
        (EXPECTED + "x", None, "state mismatch"),
        (EXPECTED[:-1], None, "state mismatch"),
        ("other", EXPECTED, "differs from the state given separately"),
        (EXPECTED, "other", "differs from the state given separately"),
    ],
)
def test_resolve_state_rejects(
    pasted_state: str | None, explicit: str | None, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        resolve_state(PastedCode(code="c", state=pasted_state), explicit, EXPECTED)
    assert EXPECTED not in str(info.value)
    assert "other" not in str(info.value)


def test_resolve_state_full_message() -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_state(PastedCode(code="c", state="nope"), None, EXPECTED)
    assert str(info.value) == (
        "state mismatch: this code belongs to a different connection attempt; paste the "
        "code from the page this connection opened (this one is still waiting for it)"
    )


@given(code=plain_values, state=plain_values, expected=plain_values)
def test_pasted_state_is_checked_end_to_end(code: str, state: str, expected: str) -> None:
    url = "https://app.example/callback?" + urlencode({"code": code, "state": state})
    pasted = parse_pasted_code(url)
    if state == expected:
        resolve_state(pasted, None, expected)
    else:
        with pytest.raises(InvalidArgument, match="state mismatch"):
            resolve_state(pasted, None, expected)
