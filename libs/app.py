"""Running services: the pieces every composition root shares, and graceful process shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Meter
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.libs import db
from corral.libs.auth.jwt import HttpJwksSource, JwksSource, TokenVerifier
from corral.libs.auth.revocation import (
    LOCAL,
    RedisRevocations,
    RevocationList,
    RevocationStore,
)
from corral.libs.config import Settings
from corral.libs.crypto import KeyRingError
from corral.libs.grpc.health import DependencyCheck
from corral.libs.grpc.interceptors import AuthenticationHook, CallHook
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration
from corral.libs.listing import PageTokenKeyHook
from corral.libs.metrics import configure_metrics, meter
from corral.libs.tls import server_credentials

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from corral.libs.eventhub import EventHub
    from corral.libs.ratelimit import RateLimitHook

log = logging.getLogger("corral.app")


@dataclass
class ServiceApp:
    """A built service: its server plus whatever must be closed when it stops."""

    name: str
    server: CorralServer
    resources: AsyncExitStack = field(default_factory=AsyncExitStack)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> int:
        port = await self.server.start()
        self._tasks = [asyncio.create_task(job()) for job in self.background]
        return port

    async def stop(self, grace: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.server.stop(grace)
        finally:
            await self.resources.aclose()


class Infrastructure:
    """Builds the adapters a service needs from settings; closes them with the service."""

    def __init__(self, settings: Settings, name: str, resources: AsyncExitStack) -> None:
        self.settings = settings
        self.name = name
        self.resources = resources
        self.checks: list[DependencyCheck] = []
        self._redis: aioredis.Redis | None = None
        self._event_hub: EventHub | None = None
        if settings.metrics_enabled:
            # One provider per process: the first service configures it for all.
            configure_metrics("corral", settings.otel_exporter_otlp_endpoint)

    def meter(self) -> Meter:
        """This service's meter (``corral.<service>``) for its domain metrics."""
        return meter(f"corral.{self.name}")

    async def database(self, migrations: Path | None) -> AsyncEngine:
        engine = db.create_engine(
            self.settings.database_url_for(self.name),
            schema=self.name,
            pool_size=self.settings.database_pool_size,
        )
        self.resources.push_async_callback(engine.dispose)
        db.instrument_engine(engine, self.name)
        if migrations is not None and self.settings.migrate_on_start:
            await db.migrate(engine, migrations, schema=self.name)
        self.checks.append(DependencyCheck("database", lambda: db.ping(engine)))
        return engine

    def redis(self) -> aioredis.Redis | None:
        """The service's Redis client (one per service), or None when none is configured."""
        if self._redis is not None or not self.settings.redis_url:
            return self._redis
        from corral.libs.redis import create_redis, ping

        client = create_redis(self.settings.redis_url, self.name)
        self.resources.push_async_callback(client.aclose)
        self.checks.append(DependencyCheck("redis", lambda: ping(client)))
        self._redis = client
        return client

    def event_hub(self) -> EventHub:
        """The service's live event fan-out (one per service): Redis Streams, shared by every
        replica, when Redis is configured, else in this process. Closed before the Redis client."""
        if self._event_hub is not None:
            return self._event_hub
        from corral.libs.eventhub import InMemoryHub, RedisStreamHub

        redis = self.redis()
        hub: EventHub = InMemoryHub() if redis is None else RedisStreamHub(redis)
        self.resources.push_async_callback(hub.close)
        self._event_hub = hub
        return hub

    def rate_limit_hook(self, redis: aioredis.Redis | None) -> RateLimitHook:
        """Per-caller limits from settings; shared by replicas through Redis when configured,
        else held in this process (each replica then enforces the limit on its own)."""
        from corral.libs.ratelimit import (
            InMemoryRateLimiter,
            RateLimiter,
            RateLimitHook,
            RedisRateLimiter,
            StaticLimits,
            trusted_networks,
        )

        settings = self.settings
        limiter: RateLimiter = InMemoryRateLimiter() if redis is None else RedisRateLimiter(redis)
        return RateLimitHook(
            limiter,
            StaticLimits(
                settings.rate_limit_per_minute,
                settings.rate_limit_anonymous_per_minute,
                settings.rate_limit_service_per_minute,
            ),
            burst=settings.rate_limit_burst,
            scope=self.name,
            trusted_proxies=trusted_networks(settings.trusted_proxies),
        )

    def revocation_store(self) -> RevocationStore:
        """Where identity publishes revocations and every verifier reads them: Redis (shared by
        every replica) when configured, else this process's own feed."""
        redis = self.redis()
        return LOCAL if redis is None else RedisRevocations(redis)

    def _page_token_hook(self) -> list[CallHook]:
        """Page tokens signed with a key every replica derives from the deployment's key ring.
        A service without keys in production lists nothing that needs them (identity and
        session refuse to start without keys on their own)."""
        try:
            key = self.settings.key_ring().derive("corral page tokens")
        except KeyRingError:
            return []
        return [PageTokenKeyHook(key)]

    def verifier(self, source: JwksSource | None = None) -> TokenVerifier:
        settings = self.settings
        return TokenVerifier(
            source or HttpJwksSource(settings.jwks_endpoint()),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=settings.jwt_algorithms,
            cache_seconds=settings.jwks_cache_seconds,
            revocations=RevocationList(
                self.revocation_store(), refresh_seconds=settings.revocation_refresh_seconds
            ),
        )

    def server(
        self,
        services: Sequence[ServiceRegistration],
        *,
        verifier: TokenVerifier,
        public_methods: Sequence[str] = (),
        extra_hooks: Sequence[CallHook] = (),
        port: int | None = None,
    ) -> CorralServer:
        settings = self.settings
        metrics_port, own_port = settings.metrics_port_for(self.name)
        hooks: list[CallHook] = [
            AuthenticationHook(verifier, public_methods),
            self.rate_limit_hook(self.redis()),
            *self._page_token_hook(),
            *extra_hooks,
        ]
        return CorralServer(
            ServerConfig(
                name=self.name,
                host=settings.host,
                port=settings.port_for(self.name) if port is None else port,
                hooks=hooks,
                checks=self.checks,
                health_interval=settings.health_check_interval_seconds,
                shutdown_grace=settings.shutdown_grace_seconds,
                # Spans only when they go somewhere: no exporter, no per-call tracing cost.
                tracing=bool(settings.otel_exporter_otlp_endpoint),
                metrics=settings.metrics_enabled,
                metrics_port=metrics_port if settings.metrics_enabled else None,
                metrics_shared=not own_port,
                credentials=server_credentials(settings),
            ),
            services,
        )


async def run_until_signalled(
    apps: Sequence[ServiceApp],
    grace: float,
    on_started: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start every app, wait for SIGINT/SIGTERM, then stop them all gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    started: list[ServiceApp] = []
    try:
        for app in apps:
            await app.start()
            started.append(app)
        if on_started is not None:
            await on_started()
        await stop.wait()
        log.info("shutting down", extra={"grace_seconds": grace})
    finally:
        await asyncio.gather(
            *(app.stop(grace) for app in reversed(started)), return_exceptions=True
        )
