"""HTTP calls to a provider's token and revocation endpoints (RFC 6749 §4.1.3, §6; RFC 7009).

Thin on purpose: it builds the form, sends it, and hands status and bytes to
``core.tokens.parse_token_response``, which decides what the answer means.
Foreign exceptions are translated in exactly one place (``_post``). Nothing
here retries: a retried code exchange or refresh can look like a replay to a
strict provider and revoke the whole grant.

A call that gets no answer is one of two failures (DESIGN §1.2.1), told apart
by whether the request's first byte was written (httpcore's trace of
``send_request_headers``), not by the exception's type:

* NOT_SENT: DNS, connect, TLS or pool failures: the provider never saw it;
* ANSWER_LOST: anything after that (read timeout, reset, a cut mid-answer, the
  call's time running out): the provider may have acted on it.

``send_timeout`` (``token_timeout_seconds``) bounds reaching the provider and
writing the request; the answer is waited for up to the ``answer_within``
seconds each call is given (the refresh attempt's deadline), never a shorter
per-read timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from keyrelay.auth.config import ProviderConfig
from keyrelay.auth.core.tokens import (
    FailureKind,
    TokenEndpointError,
    TokenSet,
    parse_token_response,
    retry_after_seconds,
)

log = logging.getLogger("keyrelay.auth.provider")

# Token answers are small; anything bigger is not a token response.
MAX_RESPONSE_BYTES = 1 << 20


# Reaching a provider takes milliseconds; a connect that hangs longer is a dead address.
MAX_CONNECT_SECONDS = 5.0


class ProviderClient:
    def __init__(self, http: httpx.AsyncClient, *, send_timeout: float) -> None:
        self._http = http
        self._send_timeout = send_timeout

    @classmethod
    def create(cls, send_timeout: float) -> ProviderClient:
        """``send_timeout``: the time to connect (at most MAX_CONNECT_SECONDS) and to
        write a request (``token_timeout_seconds``)."""
        timeout = httpx.Timeout(send_timeout, connect=min(MAX_CONNECT_SECONDS, send_timeout))
        http = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
        return cls(http, send_timeout=send_timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def exchange_code(
        self,
        provider: ProviderConfig,
        *,
        code: str,
        verifier: str,
        redirect_uri: str,
        now: float,
        answer_within: float,
    ) -> TokenSet:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": redirect_uri,
        }
        return await self._token_call(
            provider, form, now=now, requested_scopes=provider.scopes, answer_within=answer_within
        )

    async def refresh(
        self,
        provider: ProviderConfig,
        *,
        refresh_token: str,
        scopes: Sequence[str],
        now: float,
        answer_within: float,
    ) -> TokenSet:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_call(
            provider, form, now=now, requested_scopes=scopes, answer_within=answer_within
        )

    async def revoke(self, provider: ProviderConfig, *, token: str, token_type_hint: str) -> None:
        """RFC 7009. Raises TokenEndpointError when the provider did not confirm."""
        if provider.revoke_url is None:
            return
        form = {"token": token, "token_type_hint": token_type_hint}
        status, _body, _headers = await self._post(
            provider, provider.revoke_url, form, answer_within=self._send_timeout
        )
        if status != 200:
            raise TokenEndpointError(
                FailureKind.TRANSIENT, status=status, reason="the revocation was not confirmed"
            )

    async def _token_call(
        self,
        provider: ProviderConfig,
        form: dict[str, str],
        *,
        now: float,
        requested_scopes: Sequence[str],
        answer_within: float,
    ) -> TokenSet:
        status, body, headers = await self._post(
            provider, provider.token_url, form, answer_within=answer_within
        )
        return parse_token_response(
            status,
            headers.get("content-type"),
            body,
            now=now,
            requested_scopes=requested_scopes,
            retry_after=retry_after_seconds(headers.get("retry-after"), now),
        )

    async def _post(
        self, provider: ProviderConfig, url: str, form: Mapping[str, str], *, answer_within: float
    ) -> tuple[int, bytes, httpx.Headers]:
        """POSTs ``form``; the answer must be complete within ``answer_within`` seconds."""
        data = dict(form)
        auth: httpx.BasicAuth | None = None
        if provider.token_auth_method == "client_secret_basic" and provider.client_secret:
            auth = httpx.BasicAuth(provider.client_id, provider.client_secret)
        else:
            data["client_id"] = provider.client_id
            if provider.token_auth_method == "client_secret_post" and provider.client_secret:
                data["client_secret"] = provider.client_secret
        sent = False

        async def trace(event: str, _info: dict[str, Any]) -> None:
            nonlocal sent
            if event.endswith("send_request_headers.started"):
                sent = True

        per_call = httpx.Timeout(
            self._send_timeout,
            connect=min(MAX_CONNECT_SECONDS, self._send_timeout, answer_within),
            read=answer_within,
        )
        try:
            async with asyncio.timeout(answer_within):
                async with self._http.stream(
                    "POST",
                    url,
                    data=data,
                    auth=auth,
                    headers={"accept": "application/json"},
                    timeout=per_call,
                    extensions={"trace": trace},
                ) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            raise TokenEndpointError(
                                FailureKind.TRANSIENT,
                                status=response.status_code,
                                reason=f"more than {MAX_RESPONSE_BYTES} bytes in the answer",
                            )
                    return response.status_code, bytes(body), response.headers
        except (httpx.HTTPError, TimeoutError) as exc:
            what = (
                "no complete answer in time"
                if isinstance(exc, TimeoutError)
                else type(exc).__name__
            )
            if sent:
                raise TokenEndpointError.answer_lost(f"{url}: {what}") from exc
            raise TokenEndpointError.not_sent(f"cannot reach {url}: {what}") from exc
