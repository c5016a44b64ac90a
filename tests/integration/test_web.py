"""The web connect page over real HTTP: real service, real Redis, the real OAuth server."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis

from keyrelay.auth.rpc.server import RunningServer
from keyrelay.logs import JsonFormatter
from tests.support.oidc import (
    DEFAULT_REDIRECT_URI,
    OidcServer,
    PasteForm,
    as_pasted,
    complete_login,
)
from tests.support.redis_server import RedisServer
from tests.support.stack import ADMIN_TOKEN, GATEWAY_TOKEN, PROVIDER
from tests.support.web import (
    PASTE_PROVIDER,
    WebAdmin,
    abort_at_provider,
    callback_uri,
    form,
)


@pytest.fixture
async def anonymous(web_server: RunningServer) -> AsyncIterator[WebAdmin]:
    assert web_server.web is not None
    client = WebAdmin(f"http://127.0.0.1:{web_server.web.port}")
    yield client
    await client.aclose()


@pytest.fixture
async def admin(anonymous: WebAdmin) -> WebAdmin:
    response = await anonymous.login()
    assert response.status_code == 303, response.text
    return anonymous


async def connect_via_callback(admin: WebAdmin, account_id: str) -> str:
    """Connect → provider (login, consent) → callback; returns the callback address."""
    started = await admin.connect(account_id)
    assert started.status_code == 302, started.text
    redirect = complete_login(started.headers["location"])
    done = await admin.follow_callback(redirect)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/"
    return redirect


# -- probes -------------------------------------------------------------------------------


async def test_probes_and_metrics_need_no_login(anonymous: WebAdmin) -> None:
    health = await anonymous.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    assert (await anonymous.get("/readyz")).status_code == 200
    metrics = await anonymous.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE python_info gauge" in metrics.text


# -- logging in ---------------------------------------------------------------------------


async def test_pages_need_a_session(anonymous: WebAdmin) -> None:
    response = await anonymous.get("/")
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    for path in ("/connect", "/paste", "/cancel", "/disconnect", "/logout"):
        response = await anonymous.post(path, {"csrf": "x", "account_id": "a"})
        assert response.status_code == 401, path
        assert "log in" in response.text.lower()
    anonymous.http.cookies.set("keyrelay_session", "made-up-session-id")
    assert (await anonymous.get("/")).status_code == 303


async def test_login_sets_a_strict_httponly_session_cookie(anonymous: WebAdmin) -> None:
    response = await anonymous.login()
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith("keyrelay_session=")
    )
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in attributes  # plain http on loopback; https public_url sets it
    assert ADMIN_TOKEN not in cookie
    assert "Accounts" in await anonymous.page()


@pytest.mark.parametrize(
    ("token", "status", "message"),
    [
        ("not-a-token-of-this-service", 401, "Unknown token."),
        (ADMIN_TOKEN + "x", 401, "Unknown token."),
        (GATEWAY_TOKEN, 403, "This token has the gateway role"),
        ("", 400, "Enter an admin token."),
    ],
)
async def test_login_refuses_tokens_that_are_not_admin_tokens(
    anonymous: WebAdmin, token: str, status: int, message: str
) -> None:
    response = await anonymous.login(token)
    assert response.status_code == status
    assert message in response.text
    assert "keyrelay_session" not in response.headers.get("set-cookie", "")
    assert (await anonymous.get("/")).status_code == 303


async def test_login_form_needs_its_csrf_cookie(anonymous: WebAdmin) -> None:
    page = await anonymous.get("/login")
    fields = form(page.text, "/login")
    fresh = httpx.AsyncClient(base_url=anonymous.base_url, follow_redirects=False)
    async with fresh:  # a post from elsewhere: the field, but not the cookie
        response = await fresh.post("/login", data={**fields, "token": ADMIN_TOKEN})
    assert response.status_code == 403
    assert "CSRF" in response.text
    wrong = await anonymous.post("/login", {"csrf": "wrong", "token": ADMIN_TOKEN})
    assert wrong.status_code == 403


async def test_logout_ends_the_session_everywhere(admin: WebAdmin) -> None:
    cookie = admin.http.cookies["keyrelay_session"]
    response = await admin.post("/logout", {"csrf": await admin.csrf()})
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert (await admin.get("/")).status_code == 303
    admin.http.cookies.set("keyrelay_session", cookie)  # a copy of the old cookie
    assert (await admin.get("/")).status_code == 303


# -- CSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/connect", "/paste", "/cancel", "/disconnect", "/logout"])
@pytest.mark.parametrize("csrf", [None, "", "wrong-token"])
async def test_posts_without_the_right_csrf_token_are_refused(
    admin: WebAdmin, web_server: RunningServer, path: str, csrf: str | None
) -> None:
    data = {"account_id": "csrf-acct", "provider": PROVIDER, "code": "x", "flow": "x"}
    if csrf is not None:
        data["csrf"] = csrf
    response = await admin.post(path, data)
    assert response.status_code == 403
    assert "CSRF check failed" in response.text
    # Nothing happened: still logged in, no flow started.
    assert 'data-pending="csrf-acct"' not in await admin.page()


# -- connecting ---------------------------------------------------------------------------


async def test_connect_through_the_web_callback(
    admin: WebAdmin, web_server: RunningServer, web_oidc: OidcServer, web_port: int
) -> None:
    started = await admin.connect("web-1")
    assert started.status_code == 302
    authorize = urlsplit(started.headers["location"])
    assert started.headers["location"].startswith(web_oidc.authorize_url)
    assert parse_qs(authorize.query)["redirect_uri"] == [callback_uri(web_port)]
    redirect = complete_login(started.headers["location"])
    done = await admin.follow_callback(redirect)
    assert (done.status_code, done.headers["location"]) == (303, "/")
    page = await admin.page()
    assert "Connected web-1 at testidp." in page
    assert await admin.status_of("web-1") == "CONNECTED"
    assert 'data-pending="web-1"' not in page
    token = await web_server.service.get_token("web-1")
    assert web_oidc.userinfo(token.access_token).status_code == 200
    # The flash is shown once.
    assert "Connected web-1" not in await admin.page()


async def test_callback_in_a_browser_without_the_session_cookie_finishes_on_a_page(
    admin: WebAdmin, web_server: RunningServer
) -> None:
    started = await admin.connect("web-2")
    redirect = complete_login(started.headers["location"])
    parts = urlsplit(redirect)
    # SameSite=Strict: a redirect chain from the provider's site carries no session cookie.
    elsewhere = WebAdmin(admin.base_url)
    try:
        response = await elsewhere.get(f"{parts.path}?{parts.query}")
    finally:
        await elsewhere.aclose()
    assert response.status_code == 200
    assert "Connected web-2 at testidp." in response.text
    assert '<meta http-equiv="refresh" content="0;url=/">' in response.text
    assert "Connected web-2 at testidp." in await admin.page()  # the flash went to the session
    assert await admin.status_of("web-2") == "CONNECTED"


async def test_provider_refusal_in_the_callback_is_shown_and_ends_the_flow(
    admin: WebAdmin, web_server: RunningServer, redis_server: RedisServer, prefix: str
) -> None:
    started = await admin.connect("web-3")
    redirect = abort_at_provider(started.headers["location"])
    assert "error=access_denied" in redirect
    response = await admin.follow_callback(redirect)
    assert response.status_code == 400
    assert "the provider refused the authorization: access_denied" in response.text
    assert "End-User aborted interaction" in response.text
    assert 'data-pending="web-3"' not in await admin.page()
    with pytest.raises(Exception, match="never connected"):
        await web_server.service.get_account("web-3")
    with redis.Redis.from_url(redis_server.url) as client:  # the flow was cancelled
        assert list(client.scan_iter(match=f"{prefix}flow:*")) == []
        assert list(client.scan_iter(match=f"{prefix}web:state:*")) == []


async def test_callback_with_an_unknown_state_is_a_state_mismatch(admin: WebAdmin) -> None:
    response = await admin.get("/callback?code=abc&state=not-a-state-we-issued")
    assert response.status_code == 400
    assert "state mismatch" in response.text
    bare = await admin.get("/callback?error=access_denied&error_description=No+thanks")
    assert bare.status_code == 400
    assert "access_denied (No thanks)" in bare.text


async def test_callback_after_the_flow_expired(
    admin: WebAdmin, web_server: RunningServer, redis_server: RedisServer, prefix: str
) -> None:
    started = await admin.connect("web-4")
    redirect = complete_login(started.headers["location"])
    with redis.Redis.from_url(redis_server.url) as client:
        flows = list(client.scan_iter(match=f"{prefix}flow:*"))
        assert len(flows) == 1
        client.delete(*flows)  # what the flow's TTL does
    response = await admin.follow_callback(redirect)
    assert response.status_code == 404
    assert "flow not found: it expired" in response.text


async def test_a_replayed_callback_connects_once(
    admin: WebAdmin, web_server: RunningServer
) -> None:
    redirect = await connect_via_callback(admin, "web-5")
    generation = (await web_server.service.get_account("web-5")).generation
    again = await admin.follow_callback(redirect)
    assert again.status_code == 400
    assert "state mismatch" in again.text
    assert (await web_server.service.get_account("web-5")).generation == generation


@pytest.mark.parametrize("paste_form", ["url", "code#state", "bare"])
async def test_paste_box_for_a_provider_that_does_not_redirect_here(
    admin: WebAdmin, web_server: RunningServer, web_oidc: OidcServer, paste_form: PasteForm
) -> None:
    started = await admin.connect("paste-1", PASTE_PROVIDER)
    assert (started.status_code, started.headers["location"]) == (303, "/")
    url = await admin.pending_authorize_url("paste-1")
    assert parse_qs(urlsplit(url).query)["redirect_uri"] == [DEFAULT_REDIRECT_URI]
    response = await admin.paste("paste-1", as_pasted(complete_login(url), paste_form))
    assert (response.status_code, response.headers["location"]) == (303, "/")
    page = await admin.page()
    assert "Connected paste-1 at pasteidp." in page
    assert 'data-pending="paste-1"' not in page
    assert await admin.status_of("paste-1") == "CONNECTED"
    token = await web_server.service.get_token("paste-1")
    assert web_oidc.userinfo(token.access_token).status_code == 200


async def test_a_malformed_paste_keeps_the_flow_usable(admin: WebAdmin) -> None:
    await admin.connect("paste-2", PASTE_PROVIDER)
    url = await admin.pending_authorize_url("paste-2")
    bad = await admin.paste("paste-2", "https://127.0.0.1:8765/callback?state=x")
    assert bad.status_code == 400
    assert "has no code parameter" in bad.text
    assert 'data-pending="paste-2"' in bad.text
    assert (await admin.paste("paste-2", complete_login(url))).status_code == 303
    assert await admin.status_of("paste-2") == "CONNECTED"


async def test_a_code_the_provider_refuses(admin: WebAdmin) -> None:
    await admin.connect("paste-3", PASTE_PROVIDER)
    response = await admin.paste("paste-3", "not-a-code-the-provider-issued")
    assert response.status_code == 400
    assert "the provider refused the code: invalid_grant" in response.text
    assert 'data-pending="paste-3"' not in response.text  # used up: start again


async def test_cancel_a_waiting_connection(admin: WebAdmin, web_server: RunningServer) -> None:
    await admin.connect("paste-4", PASTE_PROVIDER)
    row = (await admin.page()).split('data-pending="paste-4"', 1)[1]
    response = await admin.post("/cancel", form(row, "/cancel"))
    assert response.status_code == 303
    page = await admin.page()
    assert "Cancelled connecting paste-4." in page
    assert 'data-pending="paste-4"' not in page
    gone = await admin.post("/cancel", form(row, "/cancel"))
    assert gone.status_code == 404
    assert "not waiting for a code any more" in gone.text


@pytest.mark.parametrize(
    ("account_id", "provider", "status", "message"),
    [
        ("ok-id", "nosuchidp", 404, "unknown provider 'nosuchidp' (configured: pasteidp, testidp)"),
        ("-starts-badly", PROVIDER, 400, "account_id must be 1-128 characters"),
        ("x" * 129, PROVIDER, 400, "account_id must be 1-128 characters"),
        ("", PROVIDER, 400, "account_id must be"),
    ],
)
async def test_connect_errors_are_shown_on_the_page(
    admin: WebAdmin, account_id: str, provider: str, status: int, message: str
) -> None:
    response = await admin.connect(account_id, provider)
    assert response.status_code == status
    assert html.escape(message) in response.text
    assert 'class="flash error"' in response.text
    assert "Traceback" not in response.text


async def test_script_in_an_account_id_is_shown_escaped(admin: WebAdmin) -> None:
    response = await admin.connect('<script>alert("x")</script>')
    assert response.status_code == 400
    assert "<script>" not in response.text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in response.text
    assert "script-src" not in response.headers["content-security-policy"]  # none allowed
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


# -- disconnecting ------------------------------------------------------------------------


async def test_disconnect_button(
    admin: WebAdmin, web_server: RunningServer, web_oidc: OidcServer
) -> None:
    await connect_via_callback(admin, "web-6")
    token = await web_server.service.get_token("web-6")
    response = await admin.disconnect("web-6")
    assert (response.status_code, response.headers["location"]) == (303, "/")
    page = await admin.page()
    assert "Disconnected web-6." in page
    assert await admin.status_of("web-6") == "DISCONNECTED"
    record = await web_server.service.get_account("web-6")
    assert not record.connected
    assert record.disconnect_reason == "user"
    assert web_oidc.userinfo(token.access_token).status_code == 401  # revoked at the provider


async def test_disconnect_of_an_unknown_account(admin: WebAdmin) -> None:
    fields = {"csrf": await admin.csrf(), "account_id": "never-was"}
    response = await admin.post("/disconnect", fields)
    assert response.status_code == 404
    assert "account &#x27;never-was&#x27; was never connected" in response.text


# -- secrets ------------------------------------------------------------------------------


async def test_no_token_or_code_in_pages_or_logs(
    admin: WebAdmin, web_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    redirect = await connect_via_callback(admin, "secret-1")
    await admin.connect("secret-2", PASTE_PROVIDER)
    pasted = complete_login(await admin.pending_authorize_url("secret-2"))
    assert (await admin.paste("secret-2", pasted)).status_code == 303
    await admin.page()
    secrets = [ADMIN_TOKEN, GATEWAY_TOKEN, admin.http.cookies["keyrelay_session"]]
    for url in (redirect, pasted):
        secrets.append(parse_qs(urlsplit(url).query)["code"][0])
    for account in ("secret-1", "secret-2"):
        record = await web_server.service.get_account(account)
        tokens = web_server.store.decrypt_tokens(record)
        assert tokens.refresh_token is not None  # the test provider always issues one
        secrets += [tokens.access_token, tokens.refresh_token]
    # The service's own log lines (not those of this test's HTTP clients).
    ours = [r for r in caplog.records if r.name.startswith(("keyrelay", "aiohttp"))]
    logs = "\n".join(JsonFormatter().format(r) for r in ours)
    # The access log was captured...
    assert any(json.loads(line).get("path") == "/callback" for line in logs.splitlines())
    assert "code=" not in logs  # ...without its query string
    for secret in secrets:
        assert secret
        assert secret not in logs
        assert not any(secret in page for page in admin.pages)
