"""Builds and runs a gateway worker (``keyrelay gateway serve``)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from keyrelay.config import GatewayConfig, host_port
from keyrelay.gateway.http.app import GatewayApp
from keyrelay.gateway.tokens import TokenClient, open_channel
from keyrelay.logs import LineWriter
from keyrelay.tracing import Tracer, create_tracer

log = logging.getLogger("keyrelay.gateway.server")


def build_app(
    config: GatewayConfig, *, tracer: Tracer | None = None, access_writer: LineWriter | None = None
) -> GatewayApp:
    """``tracer``: by default the one ``[gateway.tracing]`` configures;
    ``access_writer``: see ``GatewayApp`` (by default through ``logging``)."""
    if tracer is None:
        tracer = create_tracer(
            config.tracing, default_service_name="keyrelay-gateway", config_key="gateway.tracing"
        )
    auth = config.auth
    if auth is None:
        return GatewayApp(config, None, tracer=tracer, access_writer=access_writer)

    def token_client() -> TokenClient:
        channel = open_channel(
            auth.target, ca_file=auth.ca_file, cert_file=auth.cert_file, key_file=auth.key_file
        )
        return TokenClient(
            channel,
            auth.token,
            skew=config.token_skew_seconds,
            rpc_timeout=auth.timeout_seconds,
            tracer=tracer,
        )

    return GatewayApp(config, token_client, tracer=tracer, access_writer=access_writer)


def uvicorn_config(app: GatewayApp, listen: str) -> uvicorn.Config:
    host, port = host_port(listen)  # checked when the config was parsed
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # one JSON line per request comes from the app itself
        log_config=None,
        server_header=False,
        # The app never reads the client address: no X-Forwarded-* rewriting per request.
        proxy_headers=False,
        timeout_keep_alive=75,  # longer than common load balancers' idle timeout
        timeout_graceful_shutdown=30,  # let in-flight streams finish on SIGTERM
    )


def serve(config: GatewayConfig) -> None:
    # The access lines go to stderr as configure_logging's handler would write them,
    # in batches (at most 100 ms late; flushed at shutdown): no logging machinery
    # and no flush per request.
    access_writer = LineWriter(sys.stderr.buffer, interval=0.1)
    app = build_app(config, access_writer=access_writer)
    server = uvicorn.Server(uvicorn_config(app, config.listen))
    log.info("gateway listening", extra={"address": config.listen})
    try:
        server.run()
    finally:
        access_writer.flush()  # also when the lifespan shutdown did not run
        app.tracer.shutdown()  # flushes spans still queued for the exporter
