"""Builds and runs the auth service's gRPC server (``keyrelay auth serve``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from keyrelay.auth.config import AuthConfig, TlsConfig
from keyrelay.auth.core.refresh import Timings
from keyrelay.auth.core.store_failure import redis_address
from keyrelay.auth.events import EventHub
from keyrelay.auth.provider_client import ProviderClient
from keyrelay.auth.rpc.interceptors import AuthInterceptor, CallerAuthenticator
from keyrelay.auth.rpc.servicer import AuthServicer
from keyrelay.auth.service import AuthService
from keyrelay.auth.store.crypto import TokenCipher
from keyrelay.auth.store.redis_store import RedisStore
from keyrelay.auth.v1 import auth_pb2, auth_pb2_grpc
from keyrelay.auth.web.app import WebServer, start_web
from keyrelay.configfile import ConfigError
from keyrelay.tracing import NOOP_TRACER, Tracer, create_tracer

log = logging.getLogger("keyrelay.auth.server")
SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    service: AuthService
    store: RedisStore
    client: ProviderClient
    health: health_aio.HealthServicer
    tracer: Tracer = NOOP_TRACER
    owns_tracer: bool = False
    web: WebServer | None = None  # [auth.web]: probes, metrics, the connect page

    async def stop(self, grace: float = 5.0) -> None:
        """RPCs get ``grace`` seconds; a refresh whose token call is in flight is waited
        for until its answer or its deadline (refresh_deadline_seconds), whatever the
        grace: its answer may hold the only copy of a rotated refresh token."""
        await self.health.enter_graceful_shutdown()
        # The HTTP side stops with the gRPC server: both finish what is in flight.
        # WatchEvents streams never end by themselves: the event hub ends them
        # (UNAVAILABLE, the gateways resume on another replica) instead of the grace.
        await asyncio.gather(
            self.server.stop(grace),
            self.service.drain(),
            self.service.events.stop(),
            *([self.web.stop()] if self.web else []),
        )
        await self.client.aclose()
        await self.store.close()
        if self.owns_tracer:
            self.tracer.shutdown()


def timings_of(config: AuthConfig) -> Timings:
    return Timings(
        flow_ttl=config.flow_ttl_seconds,
        skew=config.skew_seconds,
        lock_ttl=config.lock_ttl_seconds,
        token_timeout=config.token_timeout_seconds,
        refresh_deadline=config.refresh_deadline_seconds,
        wait_for_refresh=config.wait_for_refresh_seconds,
        backoff_base=config.refresh_backoff_base_seconds,
        backoff_cap=config.refresh_backoff_cap_seconds,
        forced_refresh_cooldown=config.forced_refresh_cooldown_seconds,
    )


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    key = Path(tls.key_file).read_bytes()
    cert = Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def start_server(config: AuthConfig, *, tracer: Tracer | None = None) -> RunningServer:
    """Starts serving on ``config.listen`` (port 0 picks a free port; see ``.port``).

    ``tracer``: by default the one ``[auth.tracing]`` configures (stopped with the server).
    """
    owns_tracer = tracer is None
    if tracer is None:
        tracer = create_tracer(
            config.tracing, default_service_name="keyrelay-auth", config_key="auth.tracing"
        )
    cipher = TokenCipher(config.encryption_keys)
    store = RedisStore.from_url(
        config.redis_url,
        cipher,
        prefix=config.key_prefix,
        events_stream=config.events_stream,
        events_maxlen=config.events_maxlen,
    )
    client = ProviderClient.create(config.token_timeout_seconds)
    interceptor = AuthInterceptor(CallerAuthenticator(config.callers), tracer)
    service = AuthService(
        store,
        config.providers,
        client,
        timings_of(config),
        tracer=tracer,
        store_address=redis_address(config.redis_url),
        events=EventHub(
            store,
            queue_events=config.events_subscriber_queue,
            max_subscribers=config.events_max_subscribers,
            busy=interceptor.unary_calls.__bool__,
        ),
    )
    server = aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 1 << 20),
            # The gateways' keepalive pings (every 30 s) are welcome: gRPC's default
            # allows one per 5 min and answers more with GOAWAY too_many_pings, which
            # dropped every idle event stream every few minutes.
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                int(config.min_client_ping_interval_seconds * 1000),
            ),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(service), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if config.tls is not None:
            port = server.add_secure_port(config.listen, server_credentials(config.tls))
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError:  # grpc's "Failed to bind to address …"
        await client.aclose()
        await store.close()
        raise ConfigError(
            f"auth.listen: cannot listen on {config.listen!r} (not an address of this "
            "machine, or the port is in use)"
        ) from None
    await service.events.start()  # the replica's one reader of the event stream
    await server.start()
    # SERVING from start to drain, whether Redis answers or not: every replica shares
    # the one store, so taking them all out of the Service while it is down would only
    # cut gateways off from the replicas too (docs/decisions.md, "Outages").
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("auth service listening", extra={"address": config.listen, "port": port})
    web = None
    if config.web is not None:
        try:
            web = await start_web(config, service, store.client)
        except BaseException:
            await server.stop(0)
            await service.events.stop()
            await client.aclose()
            await store.close()
            raise
    return RunningServer(server, port, service, store, client, health, tracer, owns_tracer, web=web)


async def serve(config: AuthConfig) -> None:
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls")
    await running.stop(grace=10.0)
