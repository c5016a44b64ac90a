"""The floor under ``GetToken``: a bare grpc.aio server answering a constant reply.

No interceptor, no Redis, no decryption: what Python gRPC alone costs per call on
this machine. ``bench/auth_gettoken.py`` runs it under the same load as the real
replicas, so the distance between the two rows is what keyrelay adds.

Run: ``python bench/grpc_floor.py PORT`` (prints ``ready`` once serving).
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
from grpc import aio

from keyrelay.auth.v1 import auth_pb2


def constant_get_token() -> grpc.GenericRpcHandler:
    reply = auth_pb2.GetTokenResponse(
        access_token="floor-" + "x" * 40,
        token_type="Bearer",
        expires_at=int(time.time()) + 3600,
        generation=1,
    )

    async def get_token(
        _request: auth_pb2.GetTokenRequest, _context: object
    ) -> auth_pb2.GetTokenResponse:
        return reply

    return grpc.method_handlers_generic_handler(
        "keyrelay.auth.v1.AuthService",
        {
            "GetToken": grpc.unary_unary_rpc_method_handler(
                get_token,
                request_deserializer=auth_pb2.GetTokenRequest.FromString,
                response_serializer=auth_pb2.GetTokenResponse.SerializeToString,
            )
        },
    )


async def serve(port: int) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((constant_get_token(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
