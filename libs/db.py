"""Databases: one async SQLAlchemy engine per service from one URL, a unit of work, migrations.

``postgresql+asyncpg://`` (production; each service in its own schema through ``search_path``)
or ``sqlite+aiosqlite://`` (development; one file per service). Hot paths use SQLAlchemy Core on
the unit of work's connection, not ORM objects.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncTransaction,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from corral.libs.metrics import LATENCY_BUCKETS, meter


class _PoolStats:
    """What the pool metrics of one engine read: its service and how many wait right now."""

    __slots__ = ("attributes", "waiting")

    def __init__(self, service: str) -> None:
        self.attributes = {"service": service}
        self.waiting = 0


_pools: weakref.WeakKeyDictionary[Any, _PoolStats] = weakref.WeakKeyDictionary()


def _observe_pools(_: Any) -> Iterable[Any]:
    from opentelemetry.metrics import Observation

    for engine, stats in list(_pools.items()):
        pool = engine.pool
        in_use = getattr(pool, "checkedout", None)
        idle = getattr(pool, "checkedin", None)
        size = getattr(pool, "size", None)
        if callable(in_use):
            yield Observation(in_use(), {**stats.attributes, "state": "in_use"})
        if callable(idle):
            yield Observation(idle(), {**stats.attributes, "state": "idle"})
        if callable(size):
            yield Observation(size(), {**stats.attributes, "state": "size"})


def _observe_waiting(_: Any) -> Iterable[Any]:
    from opentelemetry.metrics import Observation

    for stats in list(_pools.values()):
        yield Observation(stats.waiting, stats.attributes)


_meter = meter("corral.db")
_meter.create_observable_gauge(
    "corral.db.pool.connections",
    [_observe_pools],
    description="database pool connections by state (in_use, idle, size)",
)
_meter.create_observable_gauge(
    "corral.db.pool.waiting",
    [_observe_waiting],
    description="units of work waiting for a pooled database connection",
)
_acquire = _meter.create_histogram(
    "corral.db.pool.acquire.duration",
    unit="s",
    description="time a unit of work waited for its database connection",
    explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
)


def instrument_engine(engine: AsyncEngine, service: str) -> None:
    """Report ``engine``'s pool under ``service`` (``corral_db_pool_*``)."""
    _pools[engine.sync_engine] = _PoolStats(service)


def is_sqlite(engine_or_url: AsyncEngine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, AsyncEngine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


def create_engine(url: str, *, schema: str | None = None, pool_size: int = 10) -> AsyncEngine:
    """Build the engine for one service. ``schema`` is that service's PostgreSQL schema."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    connect_args: dict[str, Any] = {}
    if schema:
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


class UnitOfWork:
    """One transaction: ``async with uow: ...; await uow.commit()``; no commit means rollback.

    Service-specific units of work subclass this and build their repositories on
    ``self.connection`` in :meth:`_bind`.
    """

    connection: AsyncConnection

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._transaction: AsyncTransaction | None = None

    def _bind(self) -> None:
        """Attach repositories to ``self.connection``."""

    async def __aenter__(self) -> Self:
        stats = _pools.get(self._engine.sync_engine)
        if stats is None:
            self.connection = await self._engine.connect()
        else:
            started = time.perf_counter()
            stats.waiting += 1
            try:
                self.connection = await self._engine.connect()
            finally:
                stats.waiting -= 1
                _acquire.record(time.perf_counter() - started, stats.attributes)
        self._transaction = await self.connection.begin()
        self._bind()
        return self

    async def commit(self) -> None:
        assert self._transaction is not None
        await self._transaction.commit()

    async def rollback(self) -> None:
        assert self._transaction is not None
        await self._transaction.rollback()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._transaction is not None and self._transaction.is_active:
                await self._transaction.rollback()
        finally:
            await self.connection.close()


def _alembic_config(script_location: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    return config


async def migrate(engine: AsyncEngine, script_location: Path, *, schema: str | None = None) -> None:
    """Upgrade one service's schema to head (creating its PostgreSQL schema first)."""
    config = _alembic_config(script_location)

    def upgrade(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        if schema and not is_sqlite(engine):
            await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await connection.run_sync(upgrade)


async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        from alembic.migration import MigrationContext

        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(read)


def run_alembic_env(context: EnvironmentContext, target_metadata: MetaData | None) -> None:
    """The body of every service's ``migrations/env.py``: migrate on the connection we pass."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations with `corral migrate`, which supplies the connection")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
