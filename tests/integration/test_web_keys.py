"""The web page's gateway keys (issue 11 item 1) over real HTTP: real service, real Redis.

List with limits and this month's usage, 50 keys a page; create (POST, 303, GET: the
key shown once, on the first view of the page the POST redirects to, and nowhere
else; a reload or a second submission of the form creates nothing); revoke after a
confirmation page; login and CSRF as for the other forms; the service's refusals
shown on the form, escaped. A key may route to a pool instead of an account ("Route to"),
checked by the service as CreateKey checks it.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
from urllib.parse import urlencode

import httpx
import pytest
from grpc import aio

from keyrelay.auth.core.gateway_keys import KeyRecord, Route
from keyrelay.auth.rpc.server import RunningServer
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.auth.web.keys_page import PAGE_SIZE, keys_page, page_of
from keyrelay.auth.web.sessions import REVEAL_TTL_SECONDS
from keyrelay.gateway.core.usage import Usage
from keyrelay.gateway.keys import key_hash
from keyrelay.gateway.limits_store import LimitsStore
from keyrelay.limit_rules import Budget, BudgetUnit, Limits, Period
from keyrelay.logs import JsonFormatter
from tests.integration.test_gateway_keys import everything_in_redis
from tests.integration.test_usage import key_subject, limits, record
from tests.integration.test_web import admin, anonymous
from tests.support.stack import admin_md, gateway_md
from tests.support.web import WebAdmin, form

__all__ = ["admin", "anonymous", "limits"]  # fixtures, shared with test_web and test_usage

NEW_KEY = re.compile(r'<code id="new-key">([^<]+)</code>')


async def filled_form(admin: WebAdmin, **values: str) -> dict[str, str]:
    """The page's create form, ``values`` over its defaults."""
    page = await admin.get("/keys")
    assert page.status_code == 200, page.text
    fields = {**form(page.text, "/keys"), "budget_unit": "usd", "budget_period": "month"}
    return {**fields, **values}


async def create(admin: WebAdmin, **values: str) -> httpx.Response:
    """Fills the page's create form and posts it; a created key's answer is a 303 to the
    page showing it, which is followed (its answer returned), as a browser does."""
    response = await admin.post("/keys", await filled_form(admin, **values))
    if response.status_code != 303:
        return response
    location = response.headers["location"]
    assert location.startswith("/keys/created?form="), location
    return await admin.get(location)


def secret_of(response: httpx.Response) -> str:
    found = NEW_KEY.search(response.text)
    assert found, response.text[:3000]
    return found.group(1)


def row_of(page: str, key_id: str) -> str:
    row = re.search(rf'<tr data-key="{re.escape(key_id)}">(.*?)</tr>', page, re.S)
    assert row, f"{key_id} is not listed: {page[:3000]}"
    return row.group(1)


async def only_key(web_server: RunningServer) -> KeyRecord:
    keys, _ = await web_server.service.list_keys(include_revoked=True)
    assert len(keys) == 1, keys
    return keys[0]


async def key_count(web_server: RunningServer) -> int:
    return len((await web_server.service.list_keys(include_revoked=True))[0])


# -- login and CSRF -----------------------------------------------------------------------


async def test_the_keys_pages_need_a_session(
    anonymous: WebAdmin, web_server: RunningServer
) -> None:
    for path in ("/keys", "/keys/revoke?key_id=gk-0123456789abcdef"):
        response = await anonymous.get(path)
        assert (response.status_code, response.headers["location"]) == (303, "/login"), path
    fields = {"csrf": "x", "name": "k", "account_id": "acct", "key_id": "gk-0123456789abcdef"}
    for path in ("/keys", "/keys/revoke"):
        response = await anonymous.post(path, fields)
        assert response.status_code == 401, path
        assert "log in" in response.text.lower()
    assert (await anonymous.login()).status_code == 303
    assert 'href="/keys"' in await anonymous.page()  # linked from the accounts page
    assert 'href="/keys"' in (await anonymous.get("/usage")).text
    assert (await web_server.service.list_keys())[0] == []


@pytest.mark.parametrize("csrf", [None, "", "wrong-token"])
async def test_key_forms_without_the_right_csrf_token_are_refused(
    admin: WebAdmin, web_server: RunningServer, csrf: str | None
) -> None:
    created = secret_of(await create(admin, name="kept", account_id="acct"))
    kept = await only_key(web_server)
    for path in ("/keys", "/keys/revoke"):
        data = {"name": "csrf-key", "account_id": "acct", "key_id": kept.key_id, "version": "1"}
        if csrf is not None:
            data["csrf"] = csrf
        response = await admin.post(path, data)
        assert response.status_code == 403, path
        assert "CSRF check failed" in response.text
    assert not (await only_key(web_server)).revoked  # not revoked, and no second key
    assert key_hash(created) == kept.key_sha256


# -- create: the key shown once -----------------------------------------------------------


async def test_create_shows_the_key_once_and_the_list_never(
    admin: WebAdmin, web_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fields = await filled_form(
        admin,
        name="team-a.ci",
        account_id="acct",
        requests_per_minute="60",
        tokens_per_minute="10000",
        concurrent_requests="5",
        budget_amount="12.5",
        expires_days="30",
    )
    posted = await admin.post("/keys", fields)
    # POST, redirect, GET: the POST's answer carries no key, in its body or its address.
    assert posted.status_code == 303
    shown_at = posted.headers["location"]
    assert shown_at == f"/keys/created?form={fields['form_id']}"
    assert "set-cookie" not in posted.headers
    assert "kr-" not in posted.text
    response = await admin.get(shown_at)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert "set-cookie" not in response.headers
    assert "script" not in response.headers["content-security-policy"]
    secret = secret_of(response)
    assert secret not in shown_at
    assert "Created gateway key team-a.ci" in response.text
    key = await only_key(web_server)
    assert key.key_sha256 == key_hash(secret)
    assert (key.name, key.route) == ("team-a.ci", Route("acct"))
    assert key.limits.requests_per_minute == 60
    assert key.limits.concurrent_requests == 5
    assert key.limits.budget is not None
    assert key.limits.budget == Budget(12_500_000, BudgetUnit.USD, Period.MONTH)
    assert 29 * 86_400 < key.expires_at - key.created_at <= 30 * 86_400

    listed = await admin.get("/keys")
    row = row_of(listed.text, key.key_id)
    assert "team-a.ci" in row
    assert "60 requests/min, 10,000 tokens/min, 5 concurrent, budget $12.50 a month" in row
    assert "in 719 h" in row or "in 720 h" in row  # the expiry
    assert listed.headers["cache-control"] == "no-store"
    # Shown once: in that one answer, and in no other page, address, cookie or log line.
    again = await admin.get(shown_at)
    assert again.status_code == 410
    assert "Already shown" in again.text
    assert sum(secret in page for page in admin.pages) == 1
    assert secret not in json.dumps(dict(admin.http.cookies))
    ours = [r for r in caplog.records if r.name.startswith(("keyrelay", "aiohttp"))]
    logs = "\n".join(JsonFormatter().format(r) for r in ours)
    assert key.key_id in logs  # the service logged the creation...
    assert "/keys/created" in logs  # ...and the web request, by its path only...
    assert secret not in logs  # ...without the key
    assert fields["form_id"] not in logs
    assert await key_count(web_server) == 1


async def test_a_key_without_limits_records_no_usage(admin: WebAdmin) -> None:
    response = await create(admin, name="unlimited", account_id="acct")
    assert response.status_code == 200
    page = (await admin.get("/keys")).text
    assert "no limits" in page
    assert "not recorded (no limits)" in page


async def test_this_months_usage_per_key(
    admin: WebAdmin, web_server: RunningServer, limits: LimitsStore
) -> None:
    secret = secret_of(await create(admin, name="metered", account_id="acct", budget_amount="5"))
    key = await only_key(web_server)
    subject = (key_subject(key_hash(secret)),)
    await record(limits, subject, usage=Usage(1000, 500, 0, 0), cost=0.5)
    await record(limits, subject, usage=Usage(100, 50, 0, 0), cost=0.25)
    row = row_of((await admin.get("/keys")).text, key.key_id)
    cells = re.findall(r'<td class="num">([^<]*)</td>', row)
    assert cells == ["2", "1,650", "$0.7500"]


# -- a reload, or the form sent again, creates nothing --------------------------------------


async def test_a_reload_shows_no_key_and_creates_none(
    admin: WebAdmin, web_server: RunningServer
) -> None:
    fields = await filled_form(admin, name="once", account_id="acct")
    posted = await admin.post("/keys", fields)
    shown_at = posted.headers["location"]
    secret = secret_of(await admin.get(shown_at))
    key = await only_key(web_server)

    for _ in range(3):  # the browser's reload of the page showing the key: a GET
        reloaded = await admin.get(shown_at)
        assert reloaded.status_code == 410
        assert "Already shown" in reloaded.text
        assert f"<code>{key.key_id}</code>" in reloaded.text
        assert f'href="/keys/revoke?key_id={key.key_id}"' in reloaded.text
        assert secret not in reloaded.text

    # The form sent again as it was (its one-time id and the session's CSRF token): the
    # way to the first one's key, no second key.
    for _ in range(2):
        again = await admin.post("/keys", fields)
        assert (again.status_code, again.headers["location"]) == (303, shown_at)
        assert (await admin.get(shown_at)).status_code == 410
    assert await key_count(web_server) == 1
    assert sum(secret in page for page in admin.pages) == 1

    # Without its one-time id (a form from elsewhere): refused, nothing created.
    bare = {k: v for k, v in fields.items() if k != "form_id"}
    for form_id in (None, "", "x" * 31, "<script>" * 4):
        data = bare if form_id is None else {**bare, "form_id": form_id}
        refused = await admin.post("/keys", data)
        assert refused.status_code == 400
        assert "No key was created" in refused.text
        assert "<script>" not in refused.text
    assert await key_count(web_server) == 1
    assert key_hash(secret) == key.key_sha256


async def test_a_double_submission_makes_one_key_and_shows_it(
    admin: WebAdmin, web_server: RunningServer
) -> None:
    """A double click: the browser follows the answer to the second POST only, so that
    one leads to the key too (shown once, whichever view comes first)."""
    fields = await filled_form(admin, name="double", account_id="acct")
    answers = await asyncio.gather(*(admin.post("/keys", fields) for _ in range(4)))
    locations = {(a.status_code, a.headers.get("location")) for a in answers}
    assert locations == {(303, f"/keys/created?form={fields['form_id']}")}
    assert await key_count(web_server) == 1
    views = [await admin.get(f"/keys/created?form={fields['form_id']}") for _ in range(2)]
    assert [v.status_code for v in views] == [200, 410]
    assert key_hash(secret_of(views[0])) == (await only_key(web_server)).key_sha256


async def test_a_refused_form_may_be_sent_again(admin: WebAdmin, web_server: RunningServer) -> None:
    fields = await filled_form(admin, name="retry", account_id="acct")
    refused = await admin.post("/keys", {**fields, "requests_per_minute": "0"})
    assert refused.status_code == 400
    assert form(refused.text, "/keys")["form_id"] != fields["form_id"]  # a new form
    assert await key_count(web_server) == 0
    # The old form (the browser's Back), corrected: its id created nothing, so it may.
    accepted = await admin.post("/keys", {**fields, "requests_per_minute": "5"})
    assert accepted.status_code == 303
    assert secret_of(await admin.get(accepted.headers["location"]))
    assert (await only_key(web_server)).limits == Limits(requests_per_minute=5)


async def test_the_key_is_shown_only_to_the_session_that_made_it(
    admin: WebAdmin, web_server: RunningServer
) -> None:
    assert web_server.web is not None
    fields = await filled_form(admin, name="mine", account_id="acct")
    shown_at = (await admin.post("/keys", fields)).headers["location"]
    other = WebAdmin(f"http://127.0.0.1:{web_server.web.port}")
    try:
        assert (await other.get(shown_at)).status_code == 303  # no session: log in first
        assert (await other.login()).status_code == 303
        for _ in range(2):
            response = await other.get(shown_at)
            assert response.status_code == 404
            assert "There is no new key to show here" in response.text
        # The same form's id from another session: nothing of the first's either.
        posted = await other.post(
            "/keys", {**fields, "csrf": form((await other.get("/keys")).text, "/keys")["csrf"]}
        )
        assert posted.status_code == 303
        other_key = secret_of(await other.get(posted.headers["location"]))
    finally:
        await other.aclose()
    secret = secret_of(await admin.get(shown_at))  # not taken by the other session
    assert secret != other_key
    assert await key_count(web_server) == 2


async def test_redis_holds_the_new_key_only_sealed_and_briefly(
    admin: WebAdmin, web_server: RunningServer, prefix: str
) -> None:
    fields = await filled_form(admin, name="sealed", account_id="acct")
    shown_at = (await admin.post("/keys", fields)).headers["location"]
    client = web_server.store.client
    reveals = [k async for k in client.scan_iter(match=f"{prefix}web:reveal:*")]
    assert len(reveals) == 1
    assert 0 < await client.pttl(reveals[0]) <= REVEAL_TTL_SECONDS * 1000
    before = await everything_in_redis(client, prefix)
    secret = secret_of(await admin.get(shown_at))
    for part in (secret, secret.removeprefix("kr-"), fields["form_id"]):
        assert part.encode() not in before
    assert [k async for k in client.scan_iter(match=f"{prefix}web:reveal:*")] == []
    assert secret.encode() not in await everything_in_redis(client, prefix)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "", "name must be 1-64 characters"),
        ("name", "x" * 65, "name must be 1-64 characters"),
        ("account_id", "", "route.account_id is required"),
        ("account_id", "-bad", "route.account_id must be 1-128 characters"),
        ("requests_per_minute", "sixty", "limits.requests_per_minute must be a whole number"),
        ("requests_per_minute", "0", "limits.requests_per_minute must be at least 1"),
        ("tokens_per_minute", "-5", "limits.tokens_per_minute must be at least 1"),
        ("tokens_per_minute", "1.5", "limits.tokens_per_minute must be a whole number"),
        ("concurrent_requests", "10000001", "limits.concurrent_requests must be at most"),
        ("requests_per_minute", "9" * 5000, "limits.requests_per_minute must be a whole number"),
        ("budget_amount", "-1", "limits.budget.amount must be more than 0"),
        ("budget_amount", "nan", "limits.budget.amount must be a number"),
        ("budget_amount", "inf", "limits.budget.amount must be a number"),
        ("budget_amount", "1e300", "limits.budget.amount must be at most"),
        ("expires_days", "0", "expires_at: the expiry must be 1 to 36500 days"),
        ("expires_days", "soon", "expires_at must be a whole number"),
    ],
)
async def test_bad_input_is_shown_on_the_form(
    admin: WebAdmin, web_server: RunningServer, field: str, value: str, message: str
) -> None:
    values = {"name": "bad-input", "account_id": "acct", field: value}
    response = await create(admin, **values)
    assert response.status_code == 400
    assert "Traceback" not in response.text
    assert 'class="flash error"' in response.text
    assert html.escape(message) in response.text
    marked = re.findall(r'name="(\w+)"[^>]*aria-invalid="true"', response.text)
    assert marked == [field]
    kept = form(response.text, "/keys")  # the form again, with what was typed
    assert kept[field] == value
    assert (await web_server.service.list_keys())[0] == []


async def test_a_budget_unit_or_period_the_form_does_not_offer(admin: WebAdmin) -> None:
    response = await create(
        admin, name="b", account_id="acct", budget_amount="5", budget_unit="eur"
    )
    assert response.status_code == 400
    assert "limits.budget.unit must be one of usd, tokens" in response.text
    assert re.search(r'name="budget_unit" aria-invalid="true"', response.text)
    tokens = await create(
        admin, name="b", account_id="acct", budget_amount="1.5", budget_unit="tokens"
    )
    assert tokens.status_code == 400
    assert "limits.budget.amount must be an integer" in tokens.text


async def test_hostile_input_is_shown_escaped(admin: WebAdmin) -> None:
    hostile = {
        "name": "<script>alert(1)</script>",
        "account_id": '"><img src=x onerror=alert(2)>',
        "requests_per_minute": "<b>3</b>",
        "expires_days": "' autofocus onfocus='alert(4)",
    }
    response = await create(admin, **hostile)
    assert response.status_code == 400
    for value in hostile.values():
        assert value not in response.text
        assert html.escape(value, quote=True) in response.text
    assert "<script>" not in response.text
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


def test_stored_fields_are_rendered_escaped() -> None:
    """Validation keeps markup out of stored keys; the page does not rely on it."""
    evil = "<img src=x onerror=alert(1)>"
    key = KeyRecord(
        key_id='gk-"><script>',
        name=evil,
        key_sha256="sha256:" + "0" * 64,
        route=Route(evil, "oauth", evil, evil),
        limits=Limits(requests_per_minute=1),
        created_at=1,
        updated_at=1,
        expires_at=0,
        revoked_at=0,
        version=1,
    )
    page = keys_page(
        listing=page_of([key], 1), usage={}, month="2025-01", csrf='"csrf<', form_id="<f>", now=2
    )
    for raw in ("<img", "<script>", '"csrf<', "<f>"):
        assert raw not in page
    assert page.count(html.escape(evil)) >= 4
    assert "&quot;csrf&lt;" in page
    assert 'name="form_id" value="&lt;f&gt;" autocomplete="off"' in page


def test_a_key_naming_a_pool_shows_the_pool_where_the_account_goes() -> None:
    key = KeyRecord(
        key_id="gk-0123456789abcdef",
        name="team-bot",
        key_sha256="sha256:" + "0" * 64,
        route=Route("", "pool", "default", "default", "team"),
        limits=Limits(),
        created_at=1,
        updated_at=1,
        expires_at=0,
        revoked_at=0,
        version=1,
    )
    page = keys_page(
        listing=page_of([key], 1), usage={}, month="2025-01", csrf="c", form_id="f", now=2
    )
    assert (
        row_of(page, key.key_id).count(
            '<td>pool team <span class="muted">pool · default · default</span></td>'
        )
        == 1
    )


# -- a key for a pool ---------------------------------------------------------------------


async def rpc_keys(web_server: RunningServer) -> list[auth_pb2.GatewayKey]:
    """ListKeys over gRPC, as a gateway loads the keys (and as an admin lists them)."""
    async with aio.insecure_channel(f"127.0.0.1:{web_server.port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        as_gateway = await stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=gateway_md())
        as_admin = await stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin_md())
    assert list(as_gateway.keys) == list(as_admin.keys)
    return list(as_gateway.keys)


async def test_a_pool_key_from_the_form(admin: WebAdmin, web_server: RunningServer) -> None:
    page = (await admin.get("/keys")).text
    assert re.search(r'<select id="route" name="route"><option value="account" selected>', page)
    assert '<option value="pool">a pool</option>' in page
    assert '<input name="pool" value="" maxlength="64" size="16" list="pool-names">' in page
    assert '<datalist id="pool-names"></datalist>' in page  # no key names a pool yet

    response = await create(
        admin, name="team-bot", route="pool", pool="team.a_1-x", requests_per_minute="30"
    )
    assert response.status_code == 200, response.text[:3000]
    secret = secret_of(response)
    assert "Created gateway key team-bot" in response.text
    key = await only_key(web_server)
    assert key.key_sha256 == key_hash(secret)
    assert key.route == Route("", "pool", "default", "default", "team.a_1-x")
    assert key.limits == Limits(requests_per_minute=30)

    listed = (await admin.get("/keys")).text
    row = row_of(listed, key.key_id)
    assert '<td>pool team.a_1-x <span class="muted">pool · default · default</span></td>' in row
    assert "30 requests/min" in row
    # Offered to pick on the next key.
    assert '<datalist id="pool-names"><option value="team.a_1-x"></datalist>' in listed

    (rpc,) = await rpc_keys(web_server)
    assert (rpc.key_id, rpc.name, rpc.key_sha256) == (key.key_id, "team-bot", key.key_sha256)
    assert rpc.route == auth_pb2.KeyRoute(
        account_id="", mode="pool", profile="default", upstream="default", pool="team.a_1-x"
    )
    assert not rpc.route.account_id

    # An account key next to it still routes to its account, with no pool.
    secret_of(await create(admin, name="by-account", account_id="acct", pool=""))
    routes = {
        k.name: (k.route.account_id, k.route.mode, k.route.pool) for k in await rpc_keys(web_server)
    }
    assert routes == {"team-bot": ("", "pool", "team.a_1-x"), "by-account": ("acct", "oauth", "")}


NOT_BOTH = "route.pool: a key names a pool or its own credential, not both"
ACCOUNT_NO_POOL = "route.pool: this key routes to an account, so it names no pool"
BAD_POOL = "route.pool must be 1-64 characters of letters, digits and ._- starting with"


@pytest.mark.parametrize(
    ("values", "message", "marked"),
    [
        # "Route to" a pool with no pool named (nothing typed, or only blanks).
        ({"route": "pool", "pool": ""}, "route.mode 'pool' needs route.pool", "route"),
        ({"route": "pool", "pool": "   "}, "route.mode 'pool' needs route.pool", "route"),
        ({"route": "pool", "pool": "", "account_id": "acct"}, "route.mode 'pool'", "route"),
        # A pool and an account: never both, whichever was chosen.
        ({"route": "pool", "pool": "team", "account_id": "acct"}, NOT_BOTH, "pool"),
        ({"route": "account", "pool": "team", "account_id": "acct"}, ACCOUNT_NO_POOL, "pool"),
        ({"pool": "team", "account_id": "acct"}, ACCOUNT_NO_POOL, "pool"),  # no choice sent
        # "Route to" an account with only a pool typed: the account is what is missing.
        (
            {"route": "account", "pool": "team", "account_id": ""},
            "route.account_id is",
            "account_id",
        ),
        # The pool's name: the service's rule (as for a profile's name).
        ({"route": "pool", "pool": "p" * 65}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "p" * 5000}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "team a"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "team/../x"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "-team"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": ".team"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "team@x"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "t\u00e9am"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "\uff54eam"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "te\x00am"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "te\nam"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "<script>alert(1)</script>"}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": '"><img src=x onerror=alert(2)>'}, BAD_POOL, "pool"),
        ({"route": "pool", "pool": "' autofocus onfocus='alert(3)"}, BAD_POOL, "pool"),
        # A choice the form does not offer.
        ({"route": "api_key", "pool": "team"}, "route.mode: the form routes a key to", "route"),
        ({"route": "<b>pool</b>", "pool": "team"}, "route.mode: the form routes a key to", "route"),
    ],
)
async def test_a_bad_pool_is_shown_on_the_form_and_makes_no_key(
    admin: WebAdmin, web_server: RunningServer, values: dict[str, str], message: str, marked: str
) -> None:
    response = await create(admin, **{"name": "pool-key", "account_id": "", **values})
    assert response.status_code == 400, response.text[:3000]
    assert "Traceback" not in response.text
    assert 'class="flash error"' in response.text
    assert html.escape(message) in response.text
    assert re.findall(r'name="(\w+)"[^>]*aria-invalid="true"', response.text) == [marked]
    for value in values.values():  # what was typed: kept, escaped
        if any(c in value for c in "<>\"'"):
            assert value not in response.text
            assert html.escape(value, quote=True) in response.text
    assert "<script>" not in response.text
    kept = form(response.text, "/keys")
    assert kept["pool"] == values["pool"].strip()
    chosen = values.get("route", "account")
    if chosen in ("account", "pool"):  # the choice kept too
        assert f'<option value="{chosen}" selected>' in response.text
    assert await key_count(web_server) == 0
    assert await rpc_keys(web_server) == []


# -- revoke -------------------------------------------------------------------------------


async def test_revoke_after_a_confirmation(admin: WebAdmin, web_server: RunningServer) -> None:
    secret_of(await create(admin, name="to-revoke", account_id="acct"))
    key = await only_key(web_server)
    listed = (await admin.get("/keys")).text
    assert f'href="/keys/revoke?key_id={key.key_id}"' in row_of(listed, key.key_id)

    confirm = await admin.get(f"/keys/revoke?key_id={key.key_id}")
    assert confirm.status_code == 200
    assert "Revoke to-revoke?" in confirm.text
    assert not (await only_key(web_server)).revoked  # a GET changes nothing
    fields = form(confirm.text, "/keys/revoke")
    assert (fields["key_id"], fields["version"]) == (key.key_id, str(key.version))

    done = await admin.post("/keys/revoke", fields)
    assert (done.status_code, done.headers["location"]) == (303, "/keys")
    page = (await admin.get("/keys")).text
    assert f"Revoked gateway key to-revoke ({key.key_id})." in page
    assert f'data-key="{key.key_id}"' not in page
    assert (await only_key(web_server)).revoked

    again = await admin.post("/keys/revoke", fields)
    assert again.status_code == 400
    assert "is revoked and cannot change" in again.text
    assert (await admin.get(f"/keys/revoke?key_id={key.key_id}")).status_code == 400


async def test_revoke_of_a_key_changed_since_the_page_was_shown(
    admin: WebAdmin, web_server: RunningServer
) -> None:
    secret_of(await create(admin, name="changing", account_id="acct"))
    key = await only_key(web_server)
    fields = form((await admin.get(f"/keys/revoke?key_id={key.key_id}")).text, "/keys/revoke")
    await web_server.service.revoke_key(key.key_id)  # e.g. the CLI, meanwhile
    response = await admin.post("/keys/revoke", fields)
    assert response.status_code == 400
    assert html.escape(f"gateway key {key.key_id} is revoked") in response.text


@pytest.mark.parametrize(
    ("key_id", "status", "message"),
    [
        ("gk-0123456789abcdef", 404, "gateway key gk-0123456789abcdef not found"),
        ("<script>", 400, "key_id must look like gk-0123456789abcdef"),
    ],
)
async def test_revoke_of_an_unknown_key(
    admin: WebAdmin, key_id: str, status: int, message: str
) -> None:
    confirm = await admin.get(f"/keys/revoke?key_id={key_id}")
    assert (confirm.status_code, message in confirm.text) == (status, True)
    csrf = form((await admin.get("/keys")).text, "/keys")["csrf"]
    response = await admin.post("/keys/revoke", {"csrf": csrf, "key_id": key_id})
    assert response.status_code == status
    assert message in response.text
    assert "<script>" not in response.text


# -- paging -------------------------------------------------------------------------------


def listed_ids(page: str) -> list[str]:
    return re.findall(r'<tr data-key="([^"]+)">', page)


async def test_the_list_is_paged_newest_first(admin: WebAdmin, web_server: RunningServer) -> None:
    service = web_server.service
    made = [
        (await service.create_key(f"k{i:03d}", Route("acct"), Limits())).key.key_id
        for i in range(121)
    ]
    revoked = made.pop(60)
    await service.revoke_key(revoked)  # not listed, not counted
    # ListKeys' order reversed (by creation, to the millisecond: keys made in the same
    # one are in the order of their ids).
    listed, _ = await service.list_keys()
    newest_first = [k.key_id for k in reversed(listed)]
    assert sorted(newest_first) == sorted(made)

    pages = []
    for number in (1, 2, 3):
        response = await admin.get(f"/keys?page={number}")
        assert response.status_code == 200
        pages.append(response.text)
    assert [listed_ids(p) for p in pages] == [
        newest_first[:PAGE_SIZE],
        newest_first[PAGE_SIZE : 2 * PAGE_SIZE],
        newest_first[2 * PAGE_SIZE :],
    ]
    assert len(listed_ids(pages[2])) == 20
    assert revoked not in "".join(pages)
    first, middle, last = pages
    assert "Page 1 of 3" in first
    assert "keys 1&ndash;50 of 120, newest first" in first
    assert "keys 101&ndash;120 of 120" in last
    assert re.findall(r'<a href="(/keys\?page=\d+)" rel="(\w+)"', first) == [
        ("/keys?page=2", "next")
    ]
    assert re.findall(r'<a href="(/keys\?page=\d+)" rel="(\w+)"', middle) == [
        ("/keys?page=1", "prev"),
        ("/keys?page=3", "next"),
    ]
    assert re.findall(r'<a href="(/keys\?page=\d+)" rel="(\w+)"', last) == [
        ("/keys?page=2", "prev")
    ]
    assert listed_ids((await admin.get("/keys")).text) == listed_ids(first)
    # Every page has the create form (and its own one-time id).
    assert len({form(p, "/keys")["form_id"] for p in pages}) == 3


@pytest.mark.parametrize("page", ["4", "99", "9" * 19, "9" * 5000, "0004"])
async def test_a_page_past_the_last_shows_the_last(
    admin: WebAdmin, web_server: RunningServer, page: str
) -> None:
    for i in range(PAGE_SIZE + 1):
        await web_server.service.create_key(f"k{i}", Route("acct"), Limits())
    response = await admin.get(f"/keys?page={page}")
    assert response.status_code == 200
    assert "Page 2 of 2" in response.text
    assert len(listed_ids(response.text)) == 1


@pytest.mark.parametrize(
    "page", ["0", "000", "-1", "-99999999999", "abc", "1.5", "1e3", "+2", " 2", "\uff12", "2,3"]
)
async def test_a_page_number_the_links_never_have_is_refused(
    admin: WebAdmin, web_server: RunningServer, page: str
) -> None:
    await web_server.service.create_key("one", Route("acct"), Limits())
    response = await admin.get("/keys?" + urlencode({"page": page}))
    assert response.status_code == 400
    assert "page must be a whole number from 1" in response.text
    assert 'data-key="' not in response.text


async def test_one_page_of_keys_has_no_pager(admin: WebAdmin, web_server: RunningServer) -> None:
    for i in range(PAGE_SIZE):
        await web_server.service.create_key(f"k{i}", Route("acct"), Limits())
    page = (await admin.get("/keys?page=")).text
    assert len(listed_ids(page)) == PAGE_SIZE
    assert "Page 1 of" not in page
    assert 'rel="next"' not in page
