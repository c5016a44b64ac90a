"""The web connect page in a real headless browser (Debian's chromium, driven by Playwright).

Log in, connect an account through the real OAuth server's login and consent pages,
come back to the list, disconnect. Playwright's async API runs on the test's own event
loop, beside the in-process auth service. Without chromium the test is skipped on a
developer's machine and fails under CI (``CI`` set): CI installs it (``make browser``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from keyrelay.auth.rpc.server import RunningServer
from tests.support.oidc import DEFAULT_REDIRECT_URI
from tests.support.stack import ADMIN_TOKEN

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The background-networking flags matter on a closed network: without them chromium
# opens many connections at once that are refused.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("KEYRELAY_SCREENSHOTS")  # a folder: keep screenshots there

pytestmark = pytest.mark.slow


def require_chromium() -> None:
    if Path(CHROMIUM).is_file():
        return
    message = f"chromium is not installed ({CHROMIUM}); install it with `make browser`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    require_chromium()
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        try:
            yield context
        finally:
            await context.close()


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


async def test_connect_and_disconnect_in_a_browser(
    browser: BrowserContext, web_server: RunningServer
) -> None:
    assert web_server.web is not None
    base = f"http://127.0.0.1:{web_server.web.port}"
    page = await browser.new_page()

    await page.goto(f"{base}/")
    await expect(page).to_have_url(f"{base}/login")
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(f"{base}/")
    await expect(page.get_by_role("heading", name="Connect an account")).to_be_visible()

    await page.get_by_label("Account id").fill("browser-1")
    await page.get_by_label("Provider").select_option("testidp")
    await page.get_by_role("button", name="Connect", exact=True).click()

    # The real provider's development login and consent pages.
    await page.locator('input[name="login"]').fill("alice")
    await page.locator('input[name="password"]').fill("any-password")
    await page.get_by_role("button", name="Sign-in").click()
    await page.get_by_role("button", name="Continue").click()

    await expect(page).to_have_url(f"{base}/")
    await expect(page.get_by_role("status")).to_have_text("Connected browser-1 at testidp.")
    row = page.locator('tr[data-account="browser-1"]')
    await expect(row.locator(".status")).to_have_text("CONNECTED")
    await expect(row).to_contain_text("openid")
    await screenshot(page, "connected")
    assert (await web_server.service.get_account("browser-1")).connected

    await row.get_by_role("button", name="Disconnect").click()
    await expect(page.get_by_role("status")).to_have_text("Disconnected browser-1.")
    await expect(row.locator(".status")).to_have_text("DISCONNECTED")
    await expect(row).to_contain_text("user")  # the disconnect reason
    await screenshot(page, "disconnected")
    record = await web_server.service.get_account("browser-1")
    assert not record.connected
    assert record.disconnect_reason == "user"
    assert ADMIN_TOKEN not in await page.content()


async def test_paste_box_in_a_browser(browser: BrowserContext, web_server: RunningServer) -> None:
    """For a provider that sends the browser elsewhere: copy its address, paste it here."""
    assert web_server.web is not None
    base = f"http://127.0.0.1:{web_server.web.port}"
    page = await browser.new_page()
    await page.goto(f"{base}/login")
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_label("Account id").fill("browser-2")
    await page.get_by_label("Provider").select_option("pasteidp")
    await page.get_by_role("button", name="Connect", exact=True).click()
    pending = page.locator('tr[data-pending="browser-2"]')
    await expect(pending).to_be_visible()
    await screenshot(page, "pending")

    # The provider's pages in a second tab; its redirect goes to a port nobody serves.
    provider_tab = await browser.new_page()
    await provider_tab.goto(await pending.get_by_role("link").get_attribute("href") or "")
    await provider_tab.locator('input[name="login"]').fill("alice")
    await provider_tab.locator('input[name="password"]').fill("any-password")
    await provider_tab.get_by_role("button", name="Sign-in").click()
    async with provider_tab.expect_request(
        lambda r: r.url.startswith(DEFAULT_REDIRECT_URI)
    ) as sent:
        await provider_tab.get_by_role("button", name="Continue").click()
    redirect = (await sent.value).url  # what the person copies from the address bar
    await provider_tab.close()

    await pending.get_by_label("Code for browser-2").fill(redirect)
    await pending.get_by_role("button", name="Submit code").click()
    await expect(page.get_by_role("status")).to_have_text("Connected browser-2 at pasteidp.")
    await expect(page.locator('tr[data-account="browser-2"] .status')).to_have_text("CONNECTED")
