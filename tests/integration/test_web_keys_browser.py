"""Issue 11's browser test: a gateway key's whole life on the web page, used for real.

In chromium (as ``test_web_browser``): log in, create a key with a limit on ``/keys``,
read it from the one page that shows it (reloading that page shows it no more and
creates no other key), use it with the official SDK through a real
``keyrelay gateway serve`` process (``[gateway.auth]``: it follows runtime keys;
``[gateway.limits]`` as its Redis ACL user, on the auth service's Redis and prefix, so
its usage records are the ones the page reads), see its usage on the page, revoke it,
and the SDK then gets 401.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from playwright.async_api import BrowserContext, Page, expect

from keyrelay.auth.rpc.server import RunningServer, start_server
from tests.e2e.test_gateway_limits import PASSWORD, url_file
from tests.integration.test_web_browser import browser, screenshot
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayProcess, gateway_config_data
from tests.support.oidc import OidcServer, complete_login
from tests.support.redis_server import RedisServer, gateway_user
from tests.support.stack import ADMIN_TOKEN, PROVIDER
from tests.support.web import web_config

__all__ = ["browser"]  # the fixture, shared with test_web_browser

pytestmark = pytest.mark.slow

PREFIX = "webkeys:"  # the auth service's and the gateway's [gateway.limits] key_prefix
SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
LIVE_WITHIN = 2.0  # seconds; the bound is 1 s, measured by tests/e2e


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The auth service's Redis, with the gateway's ACL user for ``PREFIX``."""
    user = gateway_user(PREFIX, PASSWORD)
    server = RedisServer(tmp_path_factory.mktemp("web-keys"), acl_user=user).start()
    yield server
    server.stop()


@pytest.fixture
async def auth(
    shared_redis: RedisServer, web_oidc: OidcServer, web_port: int
) -> AsyncIterator[RunningServer]:
    """The auth service (gRPC and web) with the account "acct" connected."""
    with shared_redis.client() as client:
        client.flushall()  # a key and its usage from an earlier test
    config = web_config(shared_redis.url, web_oidc, prefix=PREFIX, web_port=web_port)
    running = await start_server(config)
    service = running.service
    flow = await service.start_flow("acct", PROVIDER, "")
    redirect = await asyncio.to_thread(complete_login, flow.authorize_url)
    await service.submit_code(flow.flow_id, redirect)
    yield running
    await running.stop(grace=0.5)


@pytest.fixture
async def gateway(
    tmp_path: Path, auth: RunningServer, shared_redis: RedisServer
) -> AsyncIterator[GatewayProcess]:
    upstream = await FakeUpstream().start()
    data = gateway_config_data(upstream.url, auth.port)
    data["gateway"]["limits"] = {
        "redis_url": {"file": url_file(tmp_path, shared_redis)},
        "key_prefix": PREFIX,
    }
    process = GatewayProcess.write(tmp_path, "gateway", data)
    process.spawn()
    try:
        # In a thread: the auth service it waits for runs on this event loop.
        await asyncio.to_thread(process.wait_ready)
        yield process
    finally:
        process.stop()
        await upstream.stop()


async def status_of(gateway: GatewayProcess, key: str) -> int:
    async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key=key, max_retries=0) as sdk:
        try:
            await sdk.messages.create(**SIMPLE)
        except anthropic.APIStatusError as exc:
            return exc.status_code
    return 200


async def until_status(gateway: GatewayProcess, key: str, status: int) -> None:
    deadline = time.monotonic() + LIVE_WITHIN
    while (seen := await status_of(gateway, key)) != status:
        assert time.monotonic() < deadline, f"still {seen}, not {status}, after {LIVE_WITHIN} s"
        await asyncio.sleep(0.05)


async def log_in(page: Page, base: str) -> None:
    await page.goto(f"{base}/login")
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(f"{base}/")


async def test_create_see_once_use_watch_and_revoke_a_key(
    browser: BrowserContext, auth: RunningServer, gateway: GatewayProcess
) -> None:
    assert auth.web is not None
    base = f"http://127.0.0.1:{auth.web.port}"
    page = await browser.new_page()
    await log_in(page, base)
    await page.get_by_role("link", name="Gateway keys").click()
    await expect(page).to_have_url(f"{base}/keys")

    await page.get_by_label("Name").fill("browser-key")
    await page.get_by_label("Account").fill("acct")
    await page.get_by_label("Requests/min").fill("100")
    await page.get_by_role("button", name="Create key").click()
    await expect(page.get_by_role("heading", name="The key, shown once")).to_be_visible()
    # POST, redirect, GET: the page showing the key is a GET, its address carries no key.
    assert page.url.startswith(f"{base}/keys/created?form="), page.url
    secret = (await page.locator("#new-key").text_content() or "").strip()
    assert secret.startswith("kr-"), secret
    assert secret not in page.url
    await screenshot(page, "key-created")

    # A reload re-sends no form: the key is not shown again and no other key is made.
    shown_at = page.url
    await page.reload()
    await expect(page.get_by_role("heading", name="Already shown")).to_be_visible()
    assert page.url == shown_at
    assert secret not in await page.content()
    keys, _ = await auth.service.list_keys(include_revoked=True)
    assert [k.name for k in keys] == ["browser-key"]
    await page.go_back()  # to the form page: a GET of /keys, not the POST again
    await expect(page).to_have_url(f"{base}/keys")
    await page.go_forward()
    await expect(page.get_by_role("heading", name="Already shown")).to_be_visible()
    assert len((await auth.service.list_keys(include_revoked=True))[0]) == 1

    await page.get_by_role("link", name="Back to the gateway keys").click()
    await expect(page).to_have_url(f"{base}/keys")
    row = page.locator("tr", has_text="browser-key")
    await expect(row).to_contain_text("100 requests/min")
    assert secret not in await page.content()  # never again

    await until_status(gateway, secret, 200)  # live on the gateway
    assert await status_of(gateway, secret) == 200

    # Its usage: the gateway records it as it finishes each request.
    deadline = time.monotonic() + 5
    while True:
        await page.reload()
        cells = await row.locator("td.num").all_text_contents()
        if cells and int(cells[0].replace(",", "")) >= 2:
            break
        assert time.monotonic() < deadline, cells
        await asyncio.sleep(0.1)
    assert int(cells[1].replace(",", "")) > 0  # tokens
    # An OAuth route is a subscription, not metered: its cost is 0 (tokens still count).
    assert cells[2] == "$0.0000"
    await screenshot(page, "key-usage")

    await row.get_by_role("link", name="Revoke browser-key").click()
    await page.get_by_role("button", name="Revoke browser-key").click()
    await expect(page).to_have_url(f"{base}/keys")
    await expect(page.get_by_role("status")).to_contain_text("Revoked gateway key browser-key")
    await expect(page.locator("tr", has_text="browser-key")).to_have_count(0)
    await until_status(gateway, secret, 401)
    assert secret not in await page.content()
