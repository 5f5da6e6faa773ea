"""A service whose API is published but not built yet.

It runs on the full kit (database + migrations, health, reflection, authentication), and every
RPC answers UNIMPLEMENTED, so clients, probes and Envoy can be wired against it today. A
context replaces this with its own composition root when it gains behaviour.
"""

from __future__ import annotations

import importlib
from contextlib import AsyncExitStack
from typing import Any

from corral.libs.app import Infrastructure, ServiceApp
from corral.libs.config import Settings
from corral.libs.grpc.server import ServiceRegistration
from corral.services.registry import migrations_dir


async def build_unimplemented(
    name: str, service: str, settings: Settings, port: int | None
) -> ServiceApp:
    """``service`` is the proto service name, e.g. ``SessionService`` in ``corral.session.v1``."""
    pb2: Any = importlib.import_module(f"corral.{name}.v1.{name}_service_pb2")
    grpc_module: Any = importlib.import_module(f"corral.{name}.v1.{name}_service_pb2_grpc")
    servicer = getattr(grpc_module, f"{service}Servicer")()
    add = getattr(grpc_module, f"add_{service}Servicer_to_server")
    resources = AsyncExitStack()
    infra = Infrastructure(settings, name, resources)
    await infra.database(migrations_dir(name))
    registration = ServiceRegistration(
        pb2.DESCRIPTOR.services_by_name[service].full_name,
        lambda server: add(servicer, server),
    )
    server = infra.server([registration], verifier=infra.verifier(), port=port)
    return ServiceApp(name, server, resources)
