"""The server factory every service uses.

``grpc.aio`` server + ``grpc.health.v1`` (readiness: per service and "", following dependency
health; liveness: the name ``liveness``, SERVING while the loop answers) + server
reflection + the Corral interceptor (+ OpenTelemetry). Binds port 0 for tests. Shutdown marks
every service NOT_SERVING, lets load balancers notice, tells each service to drain (end its
streams with a reconnect), then ``stop(grace)`` drains calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from corral.libs.grpc import reflection
from corral.libs.grpc.health import DependencyCheck, Readiness
from corral.libs.grpc.interceptors import CallHook, CorralServerInterceptor
from corral.libs.metrics import open_endpoint

log = logging.getLogger("corral.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The liveness probe's health service name: SERVING while the process and its event loop answer,
# whatever the dependencies say (readiness is the per-service name and "").
LIVENESS = "liveness"


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service: its full name (``corral.session.v1.SessionService``) and how to add it.
    ``on_drain`` runs when the server starts to stop (after NOT_SERVING, before in-flight calls
    are drained): a service ends its long-lived streams there, telling clients to reconnect."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    on_drain: Callable[[], Awaitable[None]] | None = None


@dataclass
class ServerConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 0
    hooks: Sequence[CallHook] = ()
    checks: Sequence[DependencyCheck] = ()
    health_interval: float = 5.0
    shutdown_grace: float = 10.0
    drain_delay: float = 0.0  # time between NOT_SERVING and stop, for health-checking proxies
    tracing: bool = True
    metrics: bool = True  # corral_rpc_server_* (libs/grpc/metrics.py)
    # Prometheus' /metrics (libs/metrics.py): None serves none; shared: the process's endpoint
    metrics_port: int | None = None
    metrics_shared: bool = True
    credentials: grpc.ServerCredentials | None = None  # TLS; None serves plaintext
    options: Sequence[tuple[str, object]] = field(
        default_factory=lambda: [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # A port is one process's: a second server binding it fails instead of sharing it
            # (gRPC sets SO_REUSEPORT by default), so a process named after its port is unique.
            ("grpc.so_reuseport", 0),
        ]
    )


class CorralServer:
    def __init__(self, config: ServerConfig, services: Sequence[ServiceRegistration]) -> None:
        self.config = config
        self.services = list(services)
        self.port: int = 0
        self.metrics_port: int | None = None  # bound once started, when an endpoint is served
        self._close_metrics: Callable[[], Awaitable[None]] | None = None
        self.health = HealthServicer()
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if config.tracing:
            interceptors.append(aio_server_interceptor())  # type: ignore[no-untyped-call]
        interceptors.append(CorralServerInterceptor(config.hooks, metrics=config.metrics))
        self._server = grpc.aio.server(interceptors=interceptors, options=list(config.options))
        for service in self.services:
            service.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [s.full_name for s in self.services]
        reflection.enable(self._server, names)
        self.readiness = Readiness(self.health, names, config.checks, config.health_interval)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        if self.config.credentials is not None:
            self.port = self._server.add_secure_port(address, self.config.credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"{self.config.name}: cannot bind {self.config.host}:{self.config.port}")
        await self._server.start()
        if self.config.metrics_port is not None:
            key = None if self.config.metrics_shared else f"service:{self.config.name}"
            self.metrics_port, self._close_metrics = await open_endpoint(
                self.config.host, self.config.metrics_port, "process" if key is None else key
            )
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.readiness.start()
        log.info("serving", extra={"service": self.config.name, "address": self.address})
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (so balancers stop sending), then each service's ``on_drain``
        (streams told to reconnect elsewhere), then drain in-flight calls."""
        await self.readiness.stop()
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay:
            await asyncio.sleep(self.config.drain_delay)
        for service in self.services:
            if service.on_drain is not None:
                try:
                    await service.on_drain()
                except Exception:
                    log.exception("draining a service failed", extra={"service": service.full_name})
        await self._server.stop(self.config.shutdown_grace if grace is None else grace)
        if self._close_metrics is not None:
            await self._close_metrics()
            self._close_metrics = None
        log.info("stopped", extra={"service": self.config.name})

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
