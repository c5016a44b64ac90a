"""Builds and runs a gateway worker (``keyrelay gateway serve``)."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys

import uvicorn

from keyrelay.configfile import ConfigError, host_port
from keyrelay.gateway.config import FrontDoorConfig, GatewayConfig
from keyrelay.gateway.core.limits import (
    DescriptorBudgetError,
    descriptors_needed,
    nofile_soft_limit,
)
from keyrelay.gateway.http.app import GatewayApp
from keyrelay.gateway.http.front_door import front_door_protocol
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
            auth.target,
            ca_file=auth.ca_file,
            cert_file=auth.cert_file,
            key_file=auth.key_file,
            keepalive_seconds=auth.keepalive_seconds,
        )
        return TokenClient(
            channel,
            auth.token,
            skew=config.token_skew_seconds,
            rpc_timeout=auth.timeout_seconds,
            tracer=tracer,
        )

    return GatewayApp(config, token_client, tracer=tracer, access_writer=access_writer)


def uvicorn_config(
    app: GatewayApp, listen: str, *, http: type[asyncio.Protocol] | str | None = None
) -> uvicorn.Config:
    """``http``: the HTTP protocol, by default the front door (``gateway.http.
    front_door``: uvicorn's httptools protocol with the limits of ``app.config``);
    ``"httptools"``, uvicorn's own, only to compare them (``bench/gateway.py``)."""
    host, port = host_port(listen)  # checked when the config was parsed
    if app is None:  # a unit test checks host and port with no app: no limits to bind
        limits = FrontDoorConfig()
        http = http or "httptools"
    else:
        limits = app.config.front_door
        http = http or front_door_protocol(app.config, app.metrics.front_door)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=http,
        ws="none",  # no WebSocket is served: an Upgrade request is a plain one
        backlog=limits.listen_backlog,
        lifespan="on",
        access_log=False,  # one JSON line per request comes from the app itself
        log_config=None,
        server_header=False,
        # The app never reads the client address: no X-Forwarded-* rewriting per request.
        proxy_headers=False,
        timeout_keep_alive=75,  # longer than common load balancers' idle timeout
        timeout_graceful_shutdown=30,  # let in-flight streams finish on SIGTERM
    )


def reserve_descriptors(config: GatewayConfig) -> None:
    """Makes sure the process may open the file descriptors its limits need
    (client connections, pooled upstream connections, a reserve), raising its soft
    RLIMIT_NOFILE if needed: otherwise they would run out before max_connections
    is reached. A ``ConfigError`` when even the hard limit is too low."""
    upstreams = {route.upstream.name: route.upstream for route in config.routes.values()}
    upstreams |= config.upstreams  # runtime keys may name any of them
    needed = descriptors_needed(
        config.front_door.max_connections, sum(u.max_connections for u in upstreams.values())
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        target = nofile_soft_limit(soft, hard, needed)
    except DescriptorBudgetError as exc:
        raise ConfigError(str(exc)) from None
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info(
            "raised the soft file descriptor limit for the configured limits",
            extra={"nofile_was": soft, "nofile": target},
        )


def serve(config: GatewayConfig, *, http: type[asyncio.Protocol] | str | None = None) -> None:
    """``http``: see ``uvicorn_config``."""
    reserve_descriptors(config)
    # The access lines go to stderr as configure_logging's handler would write them,
    # in batches (at most 100 ms late; flushed at shutdown): no logging machinery
    # and no flush per request.
    access_writer = LineWriter(sys.stderr.buffer, interval=0.1)
    app = build_app(config, access_writer=access_writer)
    server = uvicorn.Server(uvicorn_config(app, config.listen, http=http))
    limits = config.front_door
    log.info(
        "gateway listening",
        extra={
            "address": config.listen,
            "max_connections": limits.max_connections,
            "max_header_bytes": limits.max_header_bytes,
            "max_header_count": limits.max_header_count,
        },
    )
    try:
        server.run()
    finally:
        access_writer.flush()  # also when the lifespan shutdown did not run
        app.tracer.shutdown()  # flushes spans still queued for the exporter
