"""The auth service's web side in tests: a config with ``[auth.web]``, and an HTTP admin.

``web_config`` gives two providers at the same real OAuth server: ``testidp``, whose
allowed redirect URIs include the web callback (the provider sends the browser back),
and ``pasteidp``, which only knows a loopback URI nobody listens on (the person pastes
what the browser was sent to). ``WebAdmin`` is an admin using the page over real HTTP,
with cookies, following the forms the pages really contain.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from keyrelay.auth.config import AuthConfig, parse_auth_config
from tests.support.oidc import DEFAULT_REDIRECT_URI, OidcServer, _Form, _FormParser, _origin
from tests.support.stack import ADMIN_TOKEN, PROVIDER, auth_config_data, auth_env

PASTE_PROVIDER = "pasteidp"


def callback_uri(port: int) -> str:
    return f"http://127.0.0.1:{port}/callback"


def web_config(
    redis_url: str, oidc: OidcServer, *, prefix: str, web_port: int, **web: Any
) -> AuthConfig:
    data = auth_config_data(
        redis_url, oidc, prefix=prefix, web={"listen": f"127.0.0.1:{web_port}", **web}
    )
    callback_provider = data["providers"][PROVIDER]
    callback_provider["redirect_uris"] = [callback_uri(web_port), DEFAULT_REDIRECT_URI]
    data["providers"][PASTE_PROVIDER] = {
        **callback_provider,
        "redirect_uris": [DEFAULT_REDIRECT_URI],
    }
    return parse_auth_config(data, auth_env())


def forms(html: str) -> list[_Form]:
    parser = _FormParser()
    parser.feed(html)
    parser.close()
    return parser.forms


def form(html: str, action: str, **match: str) -> dict[str, str]:
    """The fields of the page's form posting to ``action`` (with these field values)."""
    for candidate in forms(html):
        if candidate.action == action and all(
            candidate.fields.get(k) == v for k, v in match.items()
        ):
            return dict(candidate.fields)
    raise AssertionError(f"no form for {action} {match} in the page:\n{html[:3000]}")


def links(html: str) -> list[str]:
    return [m.replace("&amp;", "&") for m in re.findall(r'<a href="([^"]+)"', html)]


def abort_at_provider(authorize_url: str, timeout: float = 10.0) -> str:
    """Opens the provider's login page and clicks its Cancel link; returns the redirect back."""
    provider = _origin(authorize_url)
    url = authorize_url
    with httpx.Client(follow_redirects=False, timeout=timeout) as client:
        response = client.get(url)
        cancelled = False
        for _ in range(10):
            if response.is_redirect:
                url = urljoin(url, response.headers["location"])
                if _origin(url) != provider:
                    return url
                response = client.get(url)
            elif not cancelled:
                cancel = [u for u in links(response.text) if "/abort" in u]
                assert cancel, f"no Cancel link on the provider's page: {response.text[:2000]}"
                url, cancelled = urljoin(url, cancel[0]), True
                response = client.get(url)
            else:
                break
    raise AssertionError(f"the provider did not redirect back after Cancel (last: {url})")


class WebAdmin:
    """An admin in a browser-like HTTP client: cookies kept, redirects not followed."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.AsyncClient(base_url=base_url, follow_redirects=False, timeout=30)
        self.pages: list[str] = []  # every body received, to search for secrets

    async def aclose(self) -> None:
        await self.http.aclose()

    async def get(self, path: str) -> httpx.Response:
        response = await self.http.get(path)
        self.pages.append(response.text)
        return response

    async def post(self, path: str, data: dict[str, str]) -> httpx.Response:
        response = await self.http.post(path, data=data)
        self.pages.append(response.text)
        return response

    async def login(self, token: str = ADMIN_TOKEN) -> httpx.Response:
        page = await self.get("/login")
        assert page.status_code == 200, page.text
        return await self.post("/login", {**form(page.text, "/login"), "token": token})

    async def page(self) -> str:
        response = await self.get("/")
        assert response.status_code == 200, (response.status_code, response.text)
        return response.text

    async def csrf(self) -> str:
        return form(await self.page(), "/connect")["csrf"]

    async def connect(self, account_id: str, provider: str = PROVIDER) -> httpx.Response:
        fields = form(await self.page(), "/connect")
        return await self.post(
            "/connect", {**fields, "account_id": account_id, "provider": provider}
        )

    async def follow_callback(self, redirect: str) -> httpx.Response:
        """The browser arriving back from the provider at the web callback."""
        parts = urlsplit(redirect)
        assert f"{parts.scheme}://{parts.netloc}" == self.base_url, redirect
        return await self.get(f"{parts.path}?{parts.query}")

    async def pending_authorize_url(self, account_id: str) -> str:
        page = await self.page()
        row = re.search(rf'<tr data-pending="{re.escape(account_id)}">(.*?)</tr>', page, re.S)
        assert row, f"no pending flow for {account_id}: {page[:3000]}"
        (url,) = links(row.group(1))
        return url

    async def paste(self, account_id: str, code: str) -> httpx.Response:
        page = await self.page()
        row = re.search(rf'<tr data-pending="{re.escape(account_id)}">(.*?)</tr>', page, re.S)
        assert row, f"no pending flow for {account_id}"
        fields = form(row.group(1), "/paste")
        return await self.post("/paste", {**fields, "code": code})

    async def disconnect(self, account_id: str) -> httpx.Response:
        fields = form(await self.page(), "/disconnect", account_id=account_id)
        return await self.post("/disconnect", fields)

    async def status_of(self, account_id: str) -> str:
        page = await self.page()
        row = re.search(rf'<tr data-account="{re.escape(account_id)}">(.*?)</tr>', page, re.S)
        assert row, f"{account_id} is not listed: {page[:3000]}"
        status = re.search(r'class="status (\w+)"', row.group(1))
        assert status
        return status.group(1)
