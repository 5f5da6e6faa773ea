"""The storage schema the migrations build is the one the code describes (tables.py), on
SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from corral.libs import db
from corral.services.storage.main import MIGRATIONS
from corral.services.storage.tables import metadata


async def test_migrations_match_the_tables(database_url: tuple[str, str]) -> None:
    url, schema = database_url
    engine = db.create_engine(url, schema=schema)
    try:
        await db.migrate(engine, MIGRATIONS, schema=schema)

        def differences(connection: Connection) -> list[Any]:
            return list(compare_metadata(MigrationContext.configure(connection), metadata))

        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()
