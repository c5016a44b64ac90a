"""The OAuth test server (tests/oidc, oidc-provider) and its harness, with plain httpx.

These tests also document the provider behaviour the product relies on: PKCE S256, a
refresh token on every code exchange, rotation on every refresh, grant revocation when a
rotated refresh token or an authorization code is presented twice, and the faults the
test-control API injects at the token endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.support.oidc import (
    CONFIDENTIAL_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REDIRECT_URI,
    PUBLIC_CLIENT_ID,
    LoginFlowError,
    OidcServer,
    complete_login,
)

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def server() -> Iterator[OidcServer]:
    with OidcServer.start() as oidc:
        yield oidc


@pytest.fixture(autouse=True)
def _clean_server(server: OidcServer) -> Iterator[None]:
    server.clear_fault()
    server.reset_stats()
    yield
    server.clear_fault()


# -- a minimal client, written out here on purpose (no project code) -----------------------


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)[:96]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


def authorize_url(
    server: OidcServer,
    *,
    client_id: str = PUBLIC_CLIENT_ID,
    challenge: str,
    state: str,
    scope: str = "openid offline_access",
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    extra: dict[str, str] | None = None,
) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **(extra or {}),
    }
    return f"{server.authorize_url}?{urlencode(params)}"


def client_auth(client_id: str) -> tuple[dict[str, str], httpx.BasicAuth | None]:
    """Form fields and HTTP auth for a token request by this client."""
    if client_id == CONFIDENTIAL_CLIENT_ID:
        return {}, httpx.BasicAuth(client_id, DEFAULT_CLIENT_SECRET)
    return {"client_id": client_id}, None


def login_for_code(
    server: OidcServer,
    *,
    client_id: str = PUBLIC_CLIENT_ID,
    login: str = "alice",
    scope: str = "openid offline_access",
    extra: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Runs the browser part of the flow; returns (code, verifier)."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    url = authorize_url(
        server, client_id=client_id, challenge=challenge, state=state, scope=scope, extra=extra
    )
    redirect = complete_login(url, login=login)
    assert redirect.startswith(DEFAULT_REDIRECT_URI + "?")
    query = parse_qs(urlsplit(redirect).query)
    assert query["state"] == [state]
    assert query["iss"] == [server.issuer]  # RFC 9207: the issuer comes back in the redirect
    return query["code"][0], verifier


def exchange_code(
    server: OidcServer, code: str, verifier: str, *, client_id: str = PUBLIC_CLIENT_ID
) -> httpx.Response:
    fields, auth = client_auth(client_id)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": DEFAULT_REDIRECT_URI,
        **fields,
    }
    return httpx.post(server.token_url, data=data, auth=auth, timeout=TIMEOUT)


def refresh(
    server: OidcServer,
    refresh_token: str,
    *,
    client_id: str = PUBLIC_CLIENT_ID,
    timeout: float = TIMEOUT,
) -> httpx.Response:
    fields, auth = client_auth(client_id)
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **fields}
    return httpx.post(server.token_url, data=data, auth=auth, timeout=timeout)


def connect(
    server: OidcServer,
    *,
    client_id: str = PUBLIC_CLIENT_ID,
    login: str = "alice",
    scope: str = "openid offline_access",
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    code, verifier = login_for_code(
        server, client_id=client_id, login=login, scope=scope, extra=extra
    )
    response = exchange_code(server, code, verifier, client_id=client_id)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def assert_invalid_grant(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"


# -- the flow -------------------------------------------------------------------------------


def test_discovery_endpoints(server: OidcServer) -> None:
    assert server.issuer == f"http://127.0.0.1:{server.port}"
    for url in (server.authorize_url, server.token_url, server.revoke_url, server.userinfo_url):
        assert url.startswith(server.issuer + "/")
    assert server.metadata["code_challenge_methods_supported"] == ["S256"]


def test_code_flow_userinfo_and_rotation(server: OidcServer) -> None:
    tokens = connect(server, login="bob", scope="openid profile offline_access")
    assert tokens["token_type"] == "Bearer"
    assert isinstance(tokens["access_token"], str)
    assert isinstance(tokens["refresh_token"], str)
    assert 3590 <= tokens["expires_in"] <= 3600
    # OpenID Connect Core §11: offline_access is dropped unless the request has
    # prompt=consent; this server issues a refresh token anyway.
    assert set(tokens["scope"].split()) == {"openid", "profile"}

    info = server.userinfo(tokens["access_token"])
    assert info.status_code == 200, info.text
    assert info.json()["sub"] == "bob"
    assert info.json()["name"] == "bob"

    refreshed = refresh(server, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    new = refreshed.json()
    assert new["refresh_token"] != tokens["refresh_token"]  # rotated on every refresh
    assert new["access_token"] != tokens["access_token"]
    assert server.userinfo(new["access_token"]).status_code == 200

    stats = server.stats()
    assert stats["token_calls"]["authorization_code"] == 1
    assert stats["token_calls"]["refresh_token"] == 1
    assert stats["faulted"] == 0
    assert stats["reuse_detected"] == 0


def test_refresh_token_without_offline_access(server: OidcServer) -> None:
    tokens = connect(server, scope="openid")
    assert tokens["scope"] == "openid"
    assert "refresh_token" in tokens
    assert refresh(server, tokens["refresh_token"]).status_code == 200


def test_offline_access_kept_with_prompt_consent(server: OidcServer) -> None:
    tokens = connect(server, scope="openid offline_access", extra={"prompt": "consent"})
    assert set(tokens["scope"].split()) == {"openid", "offline_access"}
    refreshed = refresh(server, tokens["refresh_token"])
    assert refreshed.status_code == 200
    assert set(refreshed.json()["scope"].split()) == {"openid", "offline_access"}


def test_refresh_token_reuse_revokes_the_grant(server: OidcServer) -> None:
    tokens = connect(server)
    first = refresh(server, tokens["refresh_token"])
    assert first.status_code == 200
    new = first.json()

    reused = refresh(server, tokens["refresh_token"])
    assert_invalid_grant(reused)
    # The whole grant is gone: the token issued by the rotation fails too.
    assert_invalid_grant(refresh(server, new["refresh_token"]))
    assert server.userinfo(new["access_token"]).status_code == 401

    stats = server.stats()
    assert stats["reuse_detected"] == 1
    assert stats["grants_revoked"] == 1
    assert stats["token_errors"]["invalid_grant"] == 2
    assert stats["token_calls"]["refresh_token"] == 3


def test_replayed_code_is_invalid_grant_and_revokes(server: OidcServer) -> None:
    code, verifier = login_for_code(server)
    first = exchange_code(server, code, verifier)
    assert first.status_code == 200
    assert_invalid_grant(exchange_code(server, code, verifier))
    assert_invalid_grant(refresh(server, first.json()["refresh_token"]))
    stats = server.stats()
    assert stats["code_replay_detected"] == 1
    assert stats["grants_revoked"] == 1


def test_wrong_verifier_is_invalid_grant(server: OidcServer) -> None:
    code, _ = login_for_code(server)
    other_verifier, _ = pkce_pair()
    assert_invalid_grant(exchange_code(server, code, other_verifier))


def test_revoke_user(server: OidcServer) -> None:
    tokens = connect(server, login="carol")
    other = connect(server, login="dave")
    assert server.revoke_user("carol") == 1
    assert_invalid_grant(refresh(server, tokens["refresh_token"]))
    assert server.userinfo(tokens["access_token"]).status_code == 401
    assert refresh(server, other["refresh_token"]).status_code == 200  # other users unaffected
    assert server.revoke_user("nobody") == 0
    assert server.stats()["grants_revoked"] == 1


def test_rfc7009_revocation(server: OidcServer) -> None:
    tokens = connect(server)
    response = httpx.post(
        server.revoke_url,
        data={
            "token": tokens["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": PUBLIC_CLIENT_ID,
        },
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert_invalid_grant(refresh(server, tokens["refresh_token"]))


def test_confidential_client_basic_auth(server: OidcServer) -> None:
    tokens = connect(server, client_id=CONFIDENTIAL_CLIENT_ID)
    assert server.userinfo(tokens["access_token"]).status_code == 200
    refreshed = refresh(server, tokens["refresh_token"], client_id=CONFIDENTIAL_CLIENT_ID)
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["refresh_token"] != tokens["refresh_token"]

    wrong = httpx.post(
        server.token_url,
        data={"grant_type": "refresh_token", "refresh_token": refreshed.json()["refresh_token"]},
        auth=httpx.BasicAuth(CONFIDENTIAL_CLIENT_ID, "wrong-secret"),
        timeout=TIMEOUT,
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    assert server.stats()["token_errors"]["invalid_client"] == 1


def test_login_error_is_reported(server: OidcServer) -> None:
    _, challenge = pkce_pair()
    url = authorize_url(
        server, challenge=challenge, state="s", redirect_uri="http://127.0.0.1:9/elsewhere"
    )
    with pytest.raises(LoginFlowError, match="redirect_uri"):
        complete_login(url)


# -- injected faults ------------------------------------------------------------------------


def test_fault_status503(server: OidcServer) -> None:
    tokens = connect(server)
    server.reset_stats()
    server.set_fault("status503", count=1)
    response = refresh(server, tokens["refresh_token"])
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    # count=1: the next request reaches the provider, and the token was never used.
    assert refresh(server, tokens["refresh_token"]).status_code == 200
    stats = server.stats()
    assert stats["token_calls"]["refresh_token"] == 2
    assert stats["faulted"] == 1
    assert stats["faulted_by_mode"] == {"status503": 1}


def test_fault_html502(server: OidcServer) -> None:
    tokens = connect(server)
    server.set_fault("html502")
    for _ in range(2):  # count=-1: until changed
        response = refresh(server, tokens["refresh_token"])
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("text/html")
        assert "<html>" in response.text
    server.clear_fault()
    assert refresh(server, tokens["refresh_token"]).status_code == 200


def test_fault_reset(server: OidcServer) -> None:
    tokens = connect(server)
    server.reset_stats()
    server.set_fault("reset", count=1)
    with pytest.raises(httpx.TransportError) as excinfo:
        refresh(server, tokens["refresh_token"])
    assert not isinstance(excinfo.value, httpx.TimeoutException)
    # Cut before the provider saw the request: the old refresh token is still unused.
    assert refresh(server, tokens["refresh_token"]).status_code == 200
    stats = server.stats()
    assert stats["faulted"] == 1
    assert stats["faulted_by_mode"] == {"reset": 1}
    assert stats["token_calls"]["refresh_token"] == 2
    assert stats["token_success"]["refresh_token"] == 1
    assert stats["reuse_detected"] == 0


def test_fault_hang(server: OidcServer) -> None:
    tokens = connect(server)
    server.set_fault("hang", count=1)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        refresh(server, tokens["refresh_token"], timeout=0.5)
    assert time.monotonic() - started < 3
    assert refresh(server, tokens["refresh_token"]).status_code == 200
    assert server.stats()["token_calls"]["refresh_token"] == 2


def test_fault_delay_then_real_answer(server: OidcServer) -> None:
    tokens = connect(server)
    server.set_fault("delay", delay_ms=600, count=1)
    started = time.monotonic()
    response = refresh(server, tokens["refresh_token"])
    assert time.monotonic() - started >= 0.6
    assert response.status_code == 200
    assert response.json()["refresh_token"] != tokens["refresh_token"]
    # The delayed request was processed: the old refresh token is now used up.
    assert_invalid_grant(refresh(server, tokens["refresh_token"]))
    stats = server.stats()
    assert stats["faulted_by_mode"] == {"delay": 1}
    assert stats["reuse_detected"] == 1


def test_fault_delay_response_rotates_before_the_answer(server: OidcServer) -> None:
    tokens = connect(server)
    server.reset_stats()
    stderr_before = server.stderr()
    server.set_fault("delay_response", delay_ms=1500, count=1)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        refresh(server, tokens["refresh_token"], timeout=0.5)
    assert time.monotonic() - started < 1.5  # the client gave up before the answer came
    # The provider handled the request before the delay: the old refresh token is used up.
    assert_invalid_grant(refresh(server, tokens["refresh_token"]))
    stats = server.stats()
    assert stats["reuse_detected"] == 1
    assert stats["faulted"] == 1
    assert stats["faulted_by_mode"] == {"delay_response": 1}
    assert stats["token_calls"]["refresh_token"] == 2
    assert stats["token_success"]["refresh_token"] == 1  # answered, though never delivered
    assert stats["token_errors"]["invalid_grant"] == 1

    # The held-back answer then meets a closed connection; the server carries on.
    time.sleep(max(0.0, started + 1.5 + 0.3 - time.monotonic()))
    assert server.running
    assert "error" not in server.stderr()[len(stderr_before) :].lower()
    assert refresh(server, connect(server)["refresh_token"]).status_code == 200


def test_fault_delay_response_answer_after_the_delay(server: OidcServer) -> None:
    tokens = connect(server)
    server.set_fault("delay_response", delay_ms=1000, count=1)
    started = time.monotonic()
    response = refresh(server, tokens["refresh_token"], timeout=5.0)
    assert time.monotonic() - started >= 1.0
    assert response.status_code == 200, response.text
    new = response.json()
    assert new["refresh_token"] != tokens["refresh_token"]
    assert server.userinfo(new["access_token"]).status_code == 200
    # count=1: the next request is answered at once.
    started = time.monotonic()
    assert refresh(server, new["refresh_token"]).status_code == 200
    assert time.monotonic() - started < 1.0
    stats = server.stats()
    assert stats["faulted_by_mode"] == {"delay_response": 1}
    assert stats["token_success"]["refresh_token"] == 2
    assert stats["reuse_detected"] == 0


def test_fault_reset_after_refresh_rotates_without_answer(server: OidcServer) -> None:
    tokens = connect(server)
    server.reset_stats()
    server.set_fault("reset_after", count=1)
    with pytest.raises(httpx.TransportError) as excinfo:
        refresh(server, tokens["refresh_token"])
    assert not isinstance(excinfo.value, httpx.TimeoutException)
    # The provider rotated the refresh token before the cut: presenting it again is reuse.
    assert_invalid_grant(refresh(server, tokens["refresh_token"]))
    stats = server.stats()
    assert stats["reuse_detected"] == 1
    assert stats["grants_revoked"] == 1
    assert stats["faulted"] == 1
    assert stats["faulted_by_mode"] == {"reset_after": 1}
    assert stats["token_calls"]["refresh_token"] == 2
    assert stats["token_success"]["refresh_token"] == 1  # answered, though never delivered
    assert stats["token_errors"]["invalid_grant"] == 1


def test_fault_reset_after_code_exchange_consumes_the_code(server: OidcServer) -> None:
    code, verifier = login_for_code(server)
    server.set_fault("reset_after", count=1)
    with pytest.raises(httpx.TransportError) as excinfo:
        exchange_code(server, code, verifier)
    assert not isinstance(excinfo.value, httpx.TimeoutException)
    # The provider consumed the code before the cut: presenting it again is a replay.
    assert_invalid_grant(exchange_code(server, code, verifier))
    stats = server.stats()
    assert stats["code_replay_detected"] == 1
    assert stats["grants_revoked"] == 1
    assert stats["faulted_by_mode"] == {"reset_after": 1}
    assert stats["token_calls"]["authorization_code"] == 2
    assert stats["token_success"]["authorization_code"] == 1


# -- short-lived access tokens --------------------------------------------------------------


def test_short_access_token_ttl() -> None:
    with OidcServer.start(access_token_ttl=2) as short:
        tokens = connect(short)
        assert tokens["expires_in"] <= 2
        assert short.userinfo(tokens["access_token"]).status_code == 200
        time.sleep(2.5)
        expired = short.userinfo(tokens["access_token"])
        assert expired.status_code == 401
        assert "invalid_token" in expired.headers["www-authenticate"]
        refreshed = refresh(short, tokens["refresh_token"])
        assert refreshed.status_code == 200
        assert short.userinfo(refreshed.json()["access_token"]).status_code == 200
    assert not short.running
