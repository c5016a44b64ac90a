"""The web page's gateway keys (issue 11 item 1) over real HTTP: real service, real Redis.

List with limits and this month's usage, create (the key shown once, in the answer
to the POST and nowhere else), revoke after a confirmation page; login and CSRF as
for the other forms; the service's refusals shown on the form, escaped.
"""

from __future__ import annotations

import html
import json
import logging
import re

import httpx
import pytest

from keyrelay.auth.core.gateway_keys import KeyRecord, Limits, Route
from keyrelay.auth.rpc.server import RunningServer
from keyrelay.auth.web.keys_page import keys_page
from keyrelay.gateway.core.usage import Usage
from keyrelay.gateway.keys import key_hash
from keyrelay.gateway.limits_store import LimitsStore
from keyrelay.logs import JsonFormatter
from tests.integration.test_usage import key_subject, limits, record
from tests.integration.test_web import admin, anonymous
from tests.support.web import WebAdmin, form

__all__ = ["admin", "anonymous", "limits"]  # fixtures, shared with test_web and test_usage

NEW_KEY = re.compile(r'<code id="new-key">([^<]+)</code>')


async def create(admin: WebAdmin, **values: str) -> httpx.Response:
    """Fills the page's create form (``values`` over its defaults) and posts it."""
    page = await admin.get("/keys")
    assert page.status_code == 200, page.text
    fields = {**form(page.text, "/keys"), "budget_unit": "usd", "budget_period": "month"}
    return await admin.post("/keys", {**fields, **values})


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
    response = await create(
        admin,
        name="team-a.ci",
        account_id="acct",
        requests_per_minute="60",
        tokens_per_minute="10000",
        concurrent_requests="5",
        budget_amount="12.5",
        expires_days="30",
    )
    # The answer to the POST itself, not a redirect: nothing to carry the key elsewhere.
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert "set-cookie" not in response.headers
    assert "script" not in response.headers["content-security-policy"]
    secret = secret_of(response)
    assert "Created gateway key team-a.ci" in response.text
    key = await only_key(web_server)
    assert key.key_sha256 == key_hash(secret)
    assert (key.name, key.route) == ("team-a.ci", Route("acct"))
    assert key.limits.requests_per_minute == 60
    assert key.limits.concurrent_requests == 5
    assert key.limits.budget is not None
    assert (key.limits.budget.amount, key.limits.budget.unit) == (12.5, "usd")
    assert 29 * 86_400 < key.expires_at - key.created_at <= 30 * 86_400

    listed = await admin.get("/keys")
    row = row_of(listed.text, key.key_id)
    assert "team-a.ci" in row
    assert "60 requests/min, 10,000 tokens/min, 5 concurrent, budget $12.50 a month" in row
    assert "in 719 h" in row or "in 720 h" in row  # the expiry
    assert listed.headers["cache-control"] == "no-store"
    # Shown once: in that one answer, and in no other page, cookie or log line.
    assert sum(secret in page for page in admin.pages) == 1
    assert secret not in json.dumps(dict(admin.http.cookies))
    ours = [r for r in caplog.records if r.name.startswith(("keyrelay", "aiohttp"))]
    logs = "\n".join(JsonFormatter().format(r) for r in ours)
    assert key.key_id in logs  # the service logged the creation...
    assert secret not in logs  # ...without the key
    assert key.key_sha256 not in response.headers.get("location", "")


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
    page = keys_page(records=[key], usage={}, month="2025-01", csrf='"csrf<', now=2)
    for raw in ("<img", "<script>", '"csrf<'):
        assert raw not in page
    assert page.count(html.escape(evil)) >= 4
    assert "&quot;csrf&lt;" in page


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
