"""TLS and mutual TLS on the auth service's gRPC port."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc import aio

from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import AuthFactory
from tests.support.certs import make_pki
from tests.support.stack import admin_md

# The test certificates name "localhost"; the channel dials 127.0.0.1.
OVERRIDE = (("grpc.ssl_target_name_override", "localhost"),)


async def list_accounts(channel: aio.Channel) -> auth_pb2.ListAccountsResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    reply: auth_pb2.ListAccountsResponse = await stub.ListAccounts(
        auth_pb2.ListAccountsRequest(), metadata=admin_md(), timeout=5
    )
    return reply


async def test_tls(make_auth: AuthFactory, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    running, _ = await make_auth.start(
        tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    )
    address = f"127.0.0.1:{running.port}"
    creds = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    async with aio.secure_channel(address, creds, options=OVERRIDE) as channel:
        assert list((await list_accounts(channel)).accounts) == []
    async with aio.insecure_channel(address) as channel:
        with pytest.raises(aio.AioRpcError) as info:
            await list_accounts(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(
    make_auth: AuthFactory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    running, _ = await make_auth.start(
        tls={
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            "client_ca_file": str(pki.ca_cert),
        }
    )
    address = f"127.0.0.1:{running.port}"
    with_cert = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    async with aio.secure_channel(address, with_cert, options=OVERRIDE) as channel:
        assert list((await list_accounts(channel)).accounts) == []
    without_cert = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    async with aio.secure_channel(address, without_cert, options=OVERRIDE) as channel:
        with pytest.raises(aio.AioRpcError) as info:
            await list_accounts(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
