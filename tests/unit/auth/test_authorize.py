"""Building the authorize URL and recognising loopback redirects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from keyrelay.auth.core.authorize import (
    RESERVED_AUTHORIZE_PARAMS,
    build_authorize_url,
    is_loopback_redirect,
)

ENDPOINT = "https://auth.example/oauth/authorize"


def build(
    authorize_url: str = ENDPOINT,
    *,
    client_id: str = "client-1",
    redirect_uri: str = "http://127.0.0.1:8765/callback",
    scopes: Sequence[str] = ("read", "write"),
    state: str = "st",
    code_challenge: str = "ch",
    extra_params: Mapping[str, str] | None = None,
) -> str:
    if extra_params is None:
        return build_authorize_url(
            authorize_url,
            client_id=client_id,
            redirect_uri=redirect_uri,
            scopes=scopes,
            state=state,
            code_challenge=code_challenge,
        )
    return build_authorize_url(
        authorize_url,
        client_id=client_id,
        redirect_uri=redirect_uri,
        scopes=scopes,
        state=state,
        code_challenge=code_challenge,
        extra_params=extra_params,
    )


def test_reserved_params() -> None:
    assert {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    } == RESERVED_AUTHORIZE_PARAMS


def test_full_url() -> None:
    assert build() == (
        "https://auth.example/oauth/authorize?response_type=code&client_id=client-1"
        "&redirect_uri=http%3A%2F%2F127.0.0.1%3A8765%2Fcallback&scope=read%20write"
        "&state=st&code_challenge=ch&code_challenge_method=S256"
    )


def test_existing_query_is_kept_first() -> None:
    url = build("https://auth.example/authorize?tenant=t%201&audience=api")
    assert url.startswith("https://auth.example/authorize?tenant=t%201&audience=api&response_type=")
    assert parse_qsl(urlsplit(url).query)[:3] == [
        ("tenant", "t 1"),
        ("audience", "api"),
        ("response_type", "code"),
    ]


def test_empty_scopes_leave_scope_out() -> None:
    names = [name for name, _ in parse_qsl(urlsplit(build(scopes=())).query)]
    assert names == [
        "response_type",
        "client_id",
        "redirect_uri",
        "state",
        "code_challenge",
        "code_challenge_method",
    ]


def test_extra_params_come_last_in_order_and_encoded() -> None:
    url = build(extra_params={"prompt": "consent", "z": "a b&c=d", "access_type": "offline"})
    assert url.endswith(
        "&code_challenge_method=S256&prompt=consent&z=a%20b%26c%3Dd&access_type=offline"
    )


@pytest.mark.parametrize("name", sorted(RESERVED_AUTHORIZE_PARAMS))
def test_extra_params_may_not_override_reserved(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} are set by keyrelay itself"):
        build(extra_params={name: "x"})


@pytest.mark.parametrize("name", sorted(RESERVED_AUTHORIZE_PARAMS))
def test_endpoint_query_may_not_carry_reserved(name: str) -> None:
    with pytest.raises(ValueError, match=f"already has the query parameter\\(s\\) {name}"):
        build(f"{ENDPOINT}?{name}=x")


@pytest.mark.parametrize(
    ("authorize_url", "message"),
    [
        ("https://auth.example/authorize#frag", "must not have a #fragment"),
        ("/oauth/authorize", "absolute http"),
        ("auth.example/oauth/authorize", "absolute http"),
        ("ftp://auth.example/authorize", "absolute http"),
        ("https:///authorize", "absolute http"),
        ("", "absolute http"),
    ],
)
def test_unusable_endpoints(authorize_url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(authorize_url)


@pytest.mark.parametrize("scopes", [("",), ("read write",), ("read", "a\tb"), ("ok", "")])
def test_unusable_scopes(scopes: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="invalid scope"):
        build(scopes=scopes)


def test_http_endpoint_is_allowed_for_local_servers() -> None:
    assert build("http://localhost:9000/auth").startswith(
        "http://localhost:9000/auth?response_type"
    )


def test_values_that_cannot_be_encoded_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        build(client_id="\ud800")


text_values = st.text(max_size=40)
extra_names = st.text(min_size=1, max_size=20).filter(lambda s: s not in RESERVED_AUTHORIZE_PARAMS)


@given(
    client_id=text_values,
    redirect_uri=text_values,
    scopes=st.lists(st.text(alphabet="abcdefgh:/.", min_size=1, max_size=10), max_size=5),
    state=text_values,
    code_challenge=text_values,
    extra=st.dictionaries(extra_names, text_values, max_size=4),
)
def test_every_value_round_trips_through_the_url(
    client_id: str,
    redirect_uri: str,
    scopes: list[str],
    state: str,
    code_challenge: str,
    extra: dict[str, str],
) -> None:
    # Lone surrogates cannot be UTF-8 encoded, so no URL can carry them.
    everything = [client_id, redirect_uri, state, code_challenge, *extra, *extra.values()]
    assume(not any("\ud800" <= c <= "\udfff" for value in everything for c in value))
    url = build_authorize_url(
        ENDPOINT,
        client_id=client_id,
        redirect_uri=redirect_uri,
        scopes=scopes,
        state=state,
        code_challenge=code_challenge,
        extra_params=extra,
    )
    assert all("\x21" <= c <= "\x7e" for c in url)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == (
        "https",
        "auth.example",
        "/oauth/authorize",
        "",
    )
    expected = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        *([("scope", " ".join(scopes))] if scopes else []),
        ("state", state),
        ("code_challenge", code_challenge),
        ("code_challenge_method", "S256"),
        *extra.items(),
    ]
    assert parse_qsl(parts.query, keep_blank_values=True) == expected


@pytest.mark.parametrize(
    ("uri", "loopback"),
    [
        ("http://127.0.0.1:8765/callback", True),
        ("http://127.0.0.1/callback", True),
        ("http://[::1]:8765/callback", True),
        ("http://localhost:8765/callback", True),
        ("HTTP://LOCALHOST:1/", True),
        ("https://127.0.0.1:8765/callback", False),
        ("https://localhost/callback", False),
        ("http://127.0.0.2/callback", False),
        ("http://example.com/callback", False),
        ("http://localhost.example.com/callback", False),
        ("http://127.0.0.1.example.com/callback", False),
        ("http://127.0.0.1@example.com/callback", False),
        ("http://user@127.0.0.1/callback", False),
        ("http://127.0.0.1:notaport/callback", False),
        ("http://127.0.0.1:99999/callback", False),
        ("http://[::1/callback", False),
        ("http://[::2]/callback", False),
        ("127.0.0.1:8765/callback", False),
        ("//127.0.0.1/callback", False),
        ("com.example.app:/callback", False),
        ("", False),
    ],
)
def test_is_loopback_redirect(uri: str, loopback: bool) -> None:
    assert is_loopback_redirect(uri) is loopback


@given(st.text(max_size=100))
def test_is_loopback_redirect_never_raises(uri: str) -> None:
    assert isinstance(is_loopback_redirect(uri), bool)
