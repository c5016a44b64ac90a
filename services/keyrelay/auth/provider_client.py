"""HTTP calls to a provider's token and revocation endpoints (RFC 6749 §4.1.3, §6; RFC 7009).

Thin on purpose: it builds the form, sends it, and hands status and bytes to
``core.tokens.parse_token_response``, which decides what the answer means.
Foreign exceptions are translated in exactly one place (``_post``). Nothing
here retries: a retried code exchange or refresh can look like a replay to a
strict provider and revoke the whole grant.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import httpx

from keyrelay.auth.core.tokens import TokenEndpointError, TokenSet, parse_token_response
from keyrelay.config import ProviderConfig

log = logging.getLogger("keyrelay.auth.provider")

# Token answers are small; anything bigger is not a token response.
MAX_RESPONSE_BYTES = 1 << 20


class ProviderClient:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    @classmethod
    def create(cls, timeout_seconds: float) -> ProviderClient:
        timeout = httpx.Timeout(timeout_seconds, connect=min(5.0, timeout_seconds))
        return cls(httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def exchange_code(
        self, provider: ProviderConfig, *, code: str, verifier: str, redirect_uri: str, now: float
    ) -> TokenSet:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": redirect_uri,
        }
        return await self._token_call(provider, form, now=now, requested_scopes=provider.scopes)

    async def refresh(
        self, provider: ProviderConfig, *, refresh_token: str, scopes: Sequence[str], now: float
    ) -> TokenSet:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_call(provider, form, now=now, requested_scopes=scopes)

    async def revoke(self, provider: ProviderConfig, *, token: str, token_type_hint: str) -> None:
        """RFC 7009. Raises TokenEndpointError when the provider did not confirm."""
        if provider.revoke_url is None:
            return
        form = {"token": token, "token_type_hint": token_type_hint}
        status, _body, _ctype = await self._post(provider, provider.revoke_url, form)
        if status != 200:
            raise TokenEndpointError.transport(f"revocation endpoint answered {status}")

    async def _token_call(
        self,
        provider: ProviderConfig,
        form: dict[str, str],
        *,
        now: float,
        requested_scopes: Sequence[str],
    ) -> TokenSet:
        status, body, content_type = await self._post(provider, provider.token_url, form)
        return parse_token_response(
            status, content_type, body, now=now, requested_scopes=requested_scopes
        )

    async def _post(
        self, provider: ProviderConfig, url: str, form: Mapping[str, str]
    ) -> tuple[int, bytes, str | None]:
        data = dict(form)
        auth: httpx.BasicAuth | None = None
        if provider.token_auth_method == "client_secret_basic" and provider.client_secret:
            auth = httpx.BasicAuth(provider.client_id, provider.client_secret)
        else:
            data["client_id"] = provider.client_id
            if provider.token_auth_method == "client_secret_post" and provider.client_secret:
                data["client_secret"] = provider.client_secret
        try:
            async with self._http.stream(
                "POST", url, data=data, auth=auth, headers={"accept": "application/json"}
            ) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise TokenEndpointError.transport(
                            f"{url} answered with more than {MAX_RESPONSE_BYTES} bytes"
                        )
                return response.status_code, bytes(body), response.headers.get("content-type")
        except httpx.TimeoutException as exc:
            raise TokenEndpointError.transport(
                f"timed out talking to {url} ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            raise TokenEndpointError.transport(f"cannot reach {url}: {type(exc).__name__}") from exc
