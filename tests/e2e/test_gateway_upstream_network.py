"""The gateway on a production network: the upstream behind a TLS front that
demands a client certificate (mTLS, a private CA), reached only through an
egress proxy (HTTP ``CONNECT``) whose credentials come from a secret file.

SDK → gateway → ``EgressProxy`` → ``TlsFront`` → the fake Messages API, all on
loopback; non-stream and stream answers, and the proxy's refusal when the
credentials are wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import pytest

from keyrelay.gateway.config import parse_gateway_config
from tests.support.certs import Pki, make_pki
from tests.support.egress_proxy import EgressProxy, TlsFront
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import (
    API_KEY_KEY,
    RunningGateway,
    gateway_config_data,
    gateway_env,
    start_gateway,
)

SIMPLE: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
CREDENTIALS = "keyrelay-gw:egress-s3cret"


@dataclass
class Network:
    pki: Pki
    upstream: FakeUpstream
    front: TlsFront
    proxy: EgressProxy
    secrets: Path

    async def gateway(self, credentials: str) -> RunningGateway:
        secret = self.secrets / "egress-proxy"
        secret.write_text(credentials + "\n")
        data = gateway_config_data(f"https://localhost:{self.front.port}", None)
        data["keys"] = [key for key in data["keys"] if key["name"] == "apikey"]
        data["upstreams"]["default"].update(
            {
                "ca_file": str(self.pki.ca_cert),
                "cert_file": str(self.pki.client_cert),
                "key_file": str(self.pki.client_key),
                "proxy_url": self.proxy.url,
                "proxy_credentials": {"file": str(secret)},
            }
        )
        return await start_gateway(parse_gateway_config(data, gateway_env()))


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    pki = make_pki(tmp_path)
    upstream = await FakeUpstream().start()
    front = await TlsFront(pki, upstream.port, require_client_cert=True).start()
    proxy = await EgressProxy(credentials=CREDENTIALS).start()
    try:
        yield Network(pki, upstream, front, proxy, tmp_path)
    finally:
        await proxy.stop()
        await front.stop()
        await upstream.stop()


async def test_the_sdk_through_an_egress_proxy_to_an_mtls_upstream(network: Network) -> None:
    gateway = await network.gateway(CREDENTIALS)
    try:
        client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=API_KEY_KEY, max_retries=0)
        async with client:
            message = await client.messages.create(**SIMPLE)
            assert message.id == "msg_01"
            async with client.messages.stream(**SIMPLE) as stream:
                final = await stream.get_final_message()
            assert final.stop_reason == "end_turn"
    finally:
        await gateway.stop()
    # Both requests went through one tunnel, authenticated, to the TLS front,
    # which saw the gateway's client certificate.
    assert [(t.target, t.credentials) for t in network.proxy.tunnels] == [
        (f"localhost:{network.front.port}", CREDENTIALS)
    ]
    assert network.front.client_names == ["gateway"]
    assert [r.path for r in network.upstream.requests] == ["/v1/messages", "/v1/messages"]
    assert network.upstream.requests[0].header("x-api-key") == "sk-upstream-configured-key"
    assert network.upstream.requests[0].header("proxy-authorization") is None


async def test_refused_proxy_credentials_are_a_502_naming_the_key(network: Network) -> None:
    gateway = await network.gateway("keyrelay-gw:wrong")
    try:
        client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=API_KEY_KEY, max_retries=0)
        async with client:
            with pytest.raises(anthropic.APIStatusError) as caught:
                await client.messages.create(**SIMPLE)
    finally:
        await gateway.stop()
    assert caught.value.status_code == 502
    assert "CONNECT answered 407" in caught.value.message
    assert "upstreams.default.proxy_credentials" in caught.value.message
    assert "wrong" not in caught.value.message
    assert network.proxy.refused == [407]
    assert network.upstream.requests == []
