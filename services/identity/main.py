"""Composition root of the identity service: builds every adapter, the servicer and the server."""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.metrics import Meter
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.identity.v1 import identity_service_pb2_grpc
from corral.libs import db
from corral.libs.app import Infrastructure, ServiceApp
from corral.libs.auth.jwt import TokenVerifier
from corral.libs.auth.revocation import RevocationList, RevocationStore
from corral.libs.config import Settings
from corral.libs.errors import Unauthenticated
from corral.libs.grpc.health import DependencyCheck
from corral.libs.grpc.interceptors import CallInfo
from corral.libs.grpc.server import ServiceRegistration
from corral.libs.ratelimit import trusted_networks
from corral.services.identity import tokens
from corral.services.identity.api import PUBLIC_METHODS, SERVICE_NAME, IdentityApi
from corral.services.identity.base import SYSTEM_CONTEXT, Clock, Config
from corral.services.identity.config import IdentitySettings, identity_settings
from corral.services.identity.domain import Role, now
from corral.services.identity.jwks_http import JwksHttpServer
from corral.services.identity.metrics import for_meter
from corral.services.identity.repository import IdentityUnitOfWork
from corral.services.identity.revocations import RevocationFeed
from corral.services.identity.service import IdentityService
from corral.services.identity.throttle import LoginThrottle

log = logging.getLogger("corral.identity")

NAME = "identity"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
OWN_KEYS_CACHE_SECONDS = 1.0  # identity reads its own key store: cheap, so re-read often


@dataclass
class IdentityApp(ServiceApp):
    jwks_http: JwksHttpServer | None = None
    identity: IdentityService | None = None


@dataclass(frozen=True)
class Dependencies:
    """What the identity server is built from: its settings, and the clock every use case,
    token and key check reads (tests drive it instead of sleeping)."""

    settings: IdentitySettings
    clock: Clock = now
    # Where revocations go (and identity's own verifier reads them); default: the
    # deployment's feed (Redis when configured, else this process's own).
    revocations: RevocationStore | None = None
    # Where its metrics go; default: the process's meter.
    meter: Meter | None = None


class TokenCheckHook:
    """After the shared verifier: refuse tokens identity knows to be revoked."""

    def __init__(self, identity: IdentityService) -> None:
        self._identity = identity

    async def before(self, call: CallInfo) -> None:
        if call.caller is not None:
            await self._identity.auth.check_access(call.caller)


class LocalJwksSource:
    """Identity verifies tokens against its own key store, not over HTTP to itself."""

    def __init__(self, identity: IdentityService) -> None:
        self._identity = identity

    async def fetch(self) -> dict[str, Any]:
        return {"keys": await self._identity.keys.jwks()}


async def open_database(
    settings: IdentitySettings, infra: Infrastructure | None, resources: AsyncExitStack
) -> AsyncEngine:
    """Like ``Infrastructure.database``, but in a configurable PostgreSQL schema."""
    schema = settings.identity_database_schema
    engine = db.create_engine(
        settings.database_url_for(NAME), schema=schema, pool_size=settings.database_pool_size
    )
    resources.push_async_callback(engine.dispose)
    if settings.migrate_on_start or infra is None:
        await db.migrate(engine, MIGRATIONS, schema=schema)
    if infra is not None:
        infra.checks.append(DependencyCheck("database", lambda: db.ping(engine)))
    return engine


def build_service(
    settings: IdentitySettings,
    engine: AsyncEngine,
    clock: Clock = now,
    revocations: RevocationStore | None = None,
    meter: Meter | None = None,
) -> IdentityService:
    """The use cases. Reads the key ring (``CORRAL_ENCRYPTION_KEYS``): production refuses to
    start without one."""
    return IdentityService(
        lambda: IdentityUnitOfWork(engine),
        Config(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            access_ttl=float(settings.identity_access_token_ttl_seconds),
            refresh_ttl=float(settings.identity_refresh_token_ttl_seconds),
            key_retirement=settings.key_retirement_seconds,
        ),
        tokens.Passwords(
            settings.identity_argon2_time_cost,
            settings.identity_argon2_memory_kib,
            settings.identity_argon2_parallelism,
        ),
        tokens.KeyCipher(settings.key_ring(), settings.identity_key_encryption_key),
        LoginThrottle(
            settings.identity_login_max_failures,
            settings.identity_login_max_failures_per_source,
            settings.identity_login_window_seconds,
        ),
        clock,
        RevocationFeed(revocations),
        for_meter(meter),
    )


async def bootstrap(identity: IdentityService, settings: IdentitySettings) -> None:
    """First start in development: the default organization and a superuser."""
    email = settings.bootstrap_admin_email or "admin@corral.local"
    generated = await identity.accounts.bootstrap(email, settings.bootstrap_admin_password)
    if generated is not None:
        # Development only: `corral chat` and the start-up demo sign in with these.
        credentials = settings.data_dir / "admin-credentials"
        credentials.parent.mkdir(parents=True, exist_ok=True)
        credentials.touch(mode=0o600)
        credentials.write_text(f"{email}\n{generated}\n")
        print(
            f"\ncorral identity: created superuser {email} in organizations/default\n"
            f"  password: {generated}\n"
            "  (shown once; set CORRAL_BOOTSTRAP_ADMIN_PASSWORD to choose it)\n",
            file=sys.stderr,
            flush=True,
        )


async def bootstrap_service_credentials(
    identity: IdentityService, settings: IdentitySettings
) -> None:
    """Development: an internal service account whose API key the other services in this
    process use for the calls they make as themselves (ledger, audit). Production operators
    create one with `corral admin create-service-account --internal` and set
    CORRAL_SERVICE_API_KEY."""
    path = settings.data_dir / "service-api-key"
    if settings.service_api_key:
        return
    if path.exists():
        try:
            await identity.auth.exchange_api_key(SYSTEM_CONTEXT, path.read_text().strip())
            return
        except Unauthenticated:  # left over from an older database: make a new one
            pass
    account = await identity.service_accounts.create_service_account(
        SYSTEM_CONTEXT,
        "default",
        "Corral services",
        "the platform's own services",
        Role.ADMIN,
        "",
        internal=True,
    )
    _, plaintext = await identity.service_accounts.create_api_key(
        SYSTEM_CONTEXT, "default", account.id, "development", None, ""
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(plaintext)


async def sweep(identity: IdentityService, every: float) -> None:
    """Housekeeping: give back expired usage holds, forget login failures past the window."""
    while True:
        await asyncio.sleep(every)
        try:
            await identity.housekeeping()
        except Exception:
            log.exception("identity housekeeping failed")


async def build(settings: Settings, *, port: int | None = None) -> ServiceApp:
    """The identity server as ``corral serve identity`` runs it."""
    return await build_server(Dependencies(identity_settings(settings)), port=port)


async def build_server(deps: Dependencies, *, port: int | None = None) -> IdentityApp:
    """The composition root: every adapter, the use cases, the servicer, the gRPC server and
    the HTTP JWKS endpoint (the tests build their servers here too)."""
    config = deps.settings
    resources = AsyncExitStack()
    try:
        infra = Infrastructure(config, NAME, resources)
        engine = await open_database(config, infra, resources)
        revocations = deps.revocations or infra.revocation_store()
        identity = build_service(
            config, engine, deps.clock, revocations, deps.meter or infra.meter()
        )
        await identity.keys.ensure_signing_keys()
        if config.is_development:
            await bootstrap(identity, config)
            await bootstrap_service_credentials(identity, config)
        verifier = TokenVerifier(
            LocalJwksSource(identity),
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
            algorithms=config.jwt_algorithms,
            cache_seconds=OWN_KEYS_CACHE_SECONDS,
            min_refresh_seconds=OWN_KEYS_CACHE_SECONDS,
            clock=deps.clock,
            # Identity checks the feed too: a signed-out sign-in's (``sid``) access tokens.
            revocations=RevocationList(
                revocations, refresh_seconds=config.revocation_refresh_seconds
            ),
        )
        api = IdentityApi(identity, trusted_networks(config.trusted_proxies))
        registration = ServiceRegistration(
            SERVICE_NAME,
            lambda server: identity_service_pb2_grpc.add_IdentityServiceServicer_to_server(
                api, server
            ),
        )
        server = infra.server(
            [registration],
            verifier=verifier,
            public_methods=PUBLIC_METHODS,
            extra_hooks=[TokenCheckHook(identity)],
            port=port,
        )
        http = JwksHttpServer(
            identity.keys.jwks,
            host=config.host,
            port=config.identity_http_port,
            max_age=int(config.jwks_cache_seconds),
        )
        await http.start()
        resources.push_async_callback(http.stop)
    except BaseException:
        await resources.aclose()
        raise
    app = IdentityApp(NAME, server, resources, jwks_http=http, identity=identity)
    app.background.append(lambda: sweep(identity, config.identity_reservation_sweep_seconds))
    return app
