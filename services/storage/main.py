"""Composition root of the storage service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from corral.identity.v1 import identity_service_pb2
from corral.libs.app import Infrastructure, ServiceApp
from corral.libs.audit import AuditWriter
from corral.libs.auth.jwt import JwksSource
from corral.libs.config import Settings
from corral.libs.grpc.client import create_channel
from corral.libs.grpc.identity import IdentityAudit, service_credentials
from corral.libs.grpc.server import ServiceRegistration
from corral.libs.ratelimit import Networks, trusted_networks
from corral.libs.tls import channel_credentials
from corral.services.storage.adapters import IdentityStorageLedger
from corral.services.storage.api import StorageApi
from corral.services.storage.archives import WorkspaceArchiver
from corral.services.storage.base import Limits, Storage
from corral.services.storage.blob_local import LocalBlobStore
from corral.services.storage.blob_s3 import S3BlobStore, S3Config
from corral.services.storage.blobs import BlobStore
from corral.services.storage.domain import now
from corral.services.storage.ports import ArchivePacker, StorageLedger
from corral.services.storage.repository import StorageUnitOfWork
from corral.services.storage.service import StorageService
from corral.services.storage.workspace_fs import WorkspaceFiles
from corral.storage.v1 import storage_service_pb2, storage_service_pb2_grpc

log = logging.getLogger("corral.storage")

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE = storage_service_pb2.DESCRIPTOR.services_by_name["StorageService"]


@dataclass(frozen=True)
class Wiring:
    service: StorageService
    registration: ServiceRegistration


def compose(
    engine: AsyncEngine,
    files: WorkspaceFiles,
    blobs: BlobStore,
    ledger: StorageLedger,
    audit: AuditWriter,
    *,
    limits: Limits,
    packer: ArchivePacker | None = None,
    clock: Callable[[], datetime] = now,
    trusted_proxies: Networks | None = None,
    replica: str | None = None,
    sweep_interval_seconds: float = 60.0,
) -> Wiring:
    """The storage service from its dependencies: the one place it is put together (``build``
    and the tests both use it)."""
    storage = Storage(
        uow=lambda: StorageUnitOfWork(engine),
        files=files,
        blobs=blobs,
        ledger=ledger,
        audit_writer=audit,
        limits=limits,
        packer=packer,
        clock=clock,
    )
    service = StorageService(
        storage, sweep_interval_seconds=sweep_interval_seconds, replica=replica
    )
    api = StorageApi(service, trusted_proxies)
    registration = ServiceRegistration(
        SERVICE.full_name,
        lambda server: storage_service_pb2_grpc.add_StorageServiceServicer_to_server(api, server),
    )
    return Wiring(service, registration)


async def blob_store(settings: Settings, resources: AsyncExitStack) -> BlobStore:
    """The blob store ``CORRAL_STORAGE_BLOB`` names: the local filesystem under the storage
    root (the embedded default), or an S3-compatible bucket (closed with the service)."""
    if settings.storage_blob == "s3":
        config = S3Config.from_settings(settings)
        return await resources.enter_async_context(S3BlobStore.connect(config))
    return LocalBlobStore(settings.storage_dir() / "blobs")


async def build(
    settings: Settings, *, port: int | None = None, jwks: JwksSource | None = None
) -> ServiceApp:
    resources = AsyncExitStack()
    infra = Infrastructure(settings, "storage", resources)
    engine = await infra.database(MIGRATIONS)
    channel = create_channel(
        settings.target_for("identity"),
        [identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]],
        default_timeout=settings.default_deadline_seconds,
        token_provider=None,
        tracing=bool(settings.otel_exporter_otlp_endpoint),
        credentials=channel_credentials(settings),
    )
    resources.push_async_callback(channel.close, None)
    credentials = service_credentials(channel, settings.resolved_service_api_key())
    if credentials is None:
        log.warning(
            "no service credentials (CORRAL_SERVICE_API_KEY, or <data_dir>/service-api-key):"
            " storage cannot hold quota or write audit entries with identity"
        )
    wired = compose(
        engine,
        WorkspaceFiles(
            settings.storage_dir(), agent=(settings.runtime_agent_uid, settings.runtime_agent_gid)
        ),
        await blob_store(settings, resources),
        IdentityStorageLedger(channel, credentials),
        IdentityAudit(channel, credentials, service="storage"),
        limits=Limits(settings.storage_max_file_bytes, settings.storage_max_workspace_bytes),
        # An archive is never larger than the largest workspace the service accepts.
        packer=WorkspaceArchiver(max_bytes=settings.storage_max_workspace_bytes),
        trusted_proxies=trusted_networks(settings.trusted_proxies),
    )
    resources.push_async_callback(wired.service.close)
    server = infra.server([wired.registration], verifier=infra.verifier(jwks), port=port)
    return ServiceApp(
        "storage",
        server,
        resources,
        background=[wired.service.sweeper.run, wired.service.storage.outbox.run],
    )
