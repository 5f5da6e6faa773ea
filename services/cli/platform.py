"""The CLI's commands that run the platform: ``dev``, ``serve``, ``migrate``, ``health``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.libs import db
from corral.libs.app import ServiceApp, run_until_signalled
from corral.libs.config import SERVICE_NAMES, Settings
from corral.libs.envoy import EdgeError, start_edge
from corral.libs.web_console import start_console
from corral.services import registry
from corral.services.cli.chat import demo


def services(names: Sequence[str]) -> list[str]:
    chosen = list(names) or list(SERVICE_NAMES)
    unknown = [n for n in chosen if n not in SERVICE_NAMES]
    if unknown:
        raise SystemExit(
            f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}"
        )
    return chosen


async def check_health(targets: dict[str, str], wait: float = 3.0) -> dict[str, str]:
    """Ask each service's ``grpc.health.v1`` endpoint; returns name -> status name."""
    results: dict[str, str] = {}
    for name, target in targets.items():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=wait)
                results[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                results[name] = f"UNREACHABLE ({exc.code().name})"
    return results


async def serve(settings: Settings, names: list[str], *, banner: bool) -> None:
    apps: list[ServiceApp] = []
    for name in names:
        apps.append(await registry.build(name, settings))

    async def announce() -> None:
        edge = None
        if settings.edge_enabled:
            try:
                edge = await start_edge(settings, apps)
            except EdgeError as exc:  # e.g. the port is taken: the services still run
                print(
                    f"\nthe edge (Envoy) did not start: {exc}. Is port {settings.edge_port} in use?"
                    " Set CORRAL_EDGE_PORT, or CORRAL_EDGE_ENABLED=false.",
                    file=sys.stderr,
                )
        console = (
            await start_console(settings, apps, edge.url)
            if edge and settings.console_enabled
            else None
        )
        status = await check_health({app.name: app.server.address for app in apps})
        width = max(len(n) for n in status)
        print(
            "\nCorral is up (development mode: SQLite under"
            f" {settings.data_dir.resolve()}, in-process event hub)\n",
            file=sys.stderr,
        )
        for app in apps:
            print(
                f"  {app.name:<{width}}  {app.server.address:<16} health: {status[app.name]}",
                file=sys.stderr,
            )
        if edge is not None:
            print(f"  {'edge':<{width}}  {edge.url}  (gRPC, grpc-web, REST)", file=sys.stderr)
        if console is not None:
            print(
                f"  {'console':<{width}}  {console}  (web console: open it in a browser)",
                file=sys.stderr,
            )
        offline = not settings.anthropic_api_key.get_secret_value()
        if offline and "session" in status and "runtime" in status:
            print("\n  a first agent turn, streamed as a client sees it:\n", file=sys.stderr)
            try:
                demo_session = await demo(settings)
                print(f"\n  (session {demo_session})", file=sys.stderr)
            except Exception as exc:  # the platform still runs; say what went wrong
                print(f"\n  the start-up demo failed: {exc!r}", file=sys.stderr)
        credentials = settings.data_dir / "admin-credentials"
        sign_in = (
            f"sign in as the bootstrap admin: {credentials} (email, password)"
            if credentials.exists()
            else "sign in with CORRAL_BOOTSTRAP_ADMIN_EMAIL / _PASSWORD"
        )
        print(
            f"\n  {sign_in}\n"
            "  chat:  .venv/bin/corral chat        (Ctrl-C interrupts a turn)\n"
            + (
                f"  list:  .venv/bin/buf curl --list-services --protocol grpc"
                f' --http2-prior-knowledge -H "authorization: Bearer $TOKEN" {edge.url}'
                "    (server reflection; README: Over gRPC)\n"
                if edge is not None
                else ""
            )
            + "  stop:  Ctrl-C\n",
            file=sys.stderr,
            flush=True,
        )

    await run_until_signalled(apps, settings.shutdown_grace_seconds, announce if banner else None)


async def migrate(settings: Settings, names: list[str]) -> None:
    for name in names:
        engine = db.create_engine(settings.database_url_for(name), schema=name)
        try:
            await db.migrate(engine, registry.migrations_dir(name), schema=name)
            print(f"{name}: at {await db.current_revision(engine)}")
        finally:
            await engine.dispose()
