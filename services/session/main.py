"""Composition root of the session service."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from opentelemetry.metrics import Meter
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.identity.v1 import identity_service_pb2
from corral.libs.app import Infrastructure, ServiceApp
from corral.libs.audit import AuditWriter
from corral.libs.auth.jwt import JwksSource
from corral.libs.config import Settings
from corral.libs.crypto import KeyRing
from corral.libs.eventhub import EventHub
from corral.libs.grpc.client import create_channel
from corral.libs.grpc.identity import IdentityAudit, service_credentials
from corral.libs.grpc.server import ServiceRegistration
from corral.libs.ratelimit import Networks, trusted_networks
from corral.libs.tls import channel_credentials
from corral.runtime.v1 import runtime_service_pb2
from corral.services.session.adapters import (
    GrpcRuntime,
    GrpcStorage,
    IdentityLedger,
)
from corral.services.session.api import SessionApi
from corral.services.session.domain import now
from corral.services.session.metrics import for_meter
from corral.services.session.ports import Runtime, UsageLedger, WorkspaceStore
from corral.services.session.repository import SessionUnitOfWork
from corral.services.session.service import SessionService
from corral.session.v1 import session_service_pb2, session_service_pb2_grpc
from corral.storage.v1 import storage_service_pb2

log = logging.getLogger("corral.session")

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"]


def instance_name(port: int) -> str:
    """This process's name on the turns it runs: its host and port when the port is fixed (a
    process restarted in its place ends the turns of its previous run at once, without waiting
    for their leases), else a random one."""
    if not port:
        return ""
    return f"{socket.gethostname()[:50]}:{port}"


@dataclass(frozen=True)
class Wiring:
    service: SessionService
    registration: ServiceRegistration


def wire(
    engine: AsyncEngine,
    hub: EventHub,
    runtime: Runtime,
    ledger: UsageLedger,
    audit: AuditWriter,
    *,
    workspaces: WorkspaceStore,
    heartbeat_seconds: float,
    lease_seconds: float,
    clock: Callable[[], datetime] = now,
    key_ring: KeyRing | None = None,
    trusted_proxies: Networks | None = None,
    meter: Meter | None = None,
    default_turn_budget_usd_micros: int = 1_000_000,
    instance: str = "",
) -> Wiring:
    """The session service from its dependencies: the one place it is put together (``build``
    and the tests both use it). ``workspaces``: the storage service's; ``meter``: where its
    metrics go (default: the process's); ``instance``: this process's name on the turns it runs
    (default: a random one)."""
    service = SessionService(
        lambda: SessionUnitOfWork(engine),
        hub,
        runtime,
        ledger,
        audit,
        workspaces=workspaces,
        heartbeat_seconds=heartbeat_seconds,
        lease_seconds=lease_seconds,
        clock=clock,
        key_ring=key_ring,
        metrics=for_meter(meter),
        default_turn_budget_usd_micros=default_turn_budget_usd_micros,
        instance=instance,
    )
    api = SessionApi(service, trusted_proxies)
    registration = ServiceRegistration(
        SERVICE.full_name,
        lambda server: session_service_pb2_grpc.add_SessionServiceServicer_to_server(api, server),
        on_drain=service.drain,
    )
    return Wiring(service, registration)


async def build(
    settings: Settings, *, port: int | None = None, jwks: JwksSource | None = None
) -> ServiceApp:
    resources = AsyncExitStack()
    infra = Infrastructure(settings, "session", resources)
    engine = await infra.database(MIGRATIONS)
    hub = infra.event_hub()
    channels = {}
    for name, descriptor in (
        ("runtime", runtime_service_pb2.DESCRIPTOR.services_by_name["RuntimeService"]),
        ("identity", identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]),
        ("storage", storage_service_pb2.DESCRIPTOR.services_by_name["StorageService"]),
    ):
        channel = create_channel(
            settings.target_for(name),
            [descriptor],
            default_timeout=settings.default_deadline_seconds,
            token_provider=None,  # every call passes the token it acts with
            tracing=bool(settings.otel_exporter_otlp_endpoint),
            credentials=channel_credentials(settings),
        )
        resources.push_async_callback(channel.close, None)
        channels[name] = channel
    credentials = service_credentials(channels["identity"], settings.resolved_service_api_key())
    if credentials is None:
        log.warning(
            "no service credentials (CORRAL_SERVICE_API_KEY, or <data_dir>/service-api-key): the"
            " agent runtime and storage's workspaces answer internal services only, so every"
            " turn and every new session will be refused"
        )
    bound = settings.port_for("session") if port is None else port
    wired = wire(
        engine,
        hub,
        GrpcRuntime(channels["runtime"], credentials),
        IdentityLedger(channels["identity"], credentials),
        IdentityAudit(channels["identity"], credentials, service="session"),
        workspaces=GrpcStorage(channels["storage"], credentials),
        heartbeat_seconds=settings.session_heartbeat_seconds,
        lease_seconds=settings.session_turn_lease_seconds,
        key_ring=settings.key_ring(),
        trusted_proxies=trusted_networks(settings.trusted_proxies),
        meter=infra.meter(),
        default_turn_budget_usd_micros=round(settings.session_default_turn_budget_usd * 1e6),
        instance=instance_name(bound),
    )
    resources.push_async_callback(wired.service.close)
    # Turns left by a process that stopped are ended by the background sweep, which starts
    # with one as soon as the server has its port (a second process on this port fails to
    # bind first, so it never ends the turns of the one that holds it).
    server = infra.server([wired.registration], verifier=infra.verifier(jwks), port=port)
    return ServiceApp("session", server, resources, background=[wired.service.maintain])
