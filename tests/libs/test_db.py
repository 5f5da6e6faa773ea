"""The repository/migration machinery on real SQLite and real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from corral.libs import db
from tests.support.notes import NotesUnitOfWork

MIGRATIONS = Path(__file__).parent.parent / "support" / "migrations"


async def test_migrate_to_head_twice_and_unit_of_work(database_url: tuple[str, str]) -> None:
    url, schema = database_url
    engine = db.create_engine(url, schema=schema)
    try:
        await db.migrate(engine, MIGRATIONS, schema=schema)
        await db.migrate(engine, MIGRATIONS, schema=schema)  # idempotent: already at head
        assert await db.current_revision(engine) == "0002"

        async with NotesUnitOfWork(engine) as uow:
            await uow.add("n1", "kept")
            await uow.commit()
        async with NotesUnitOfWork(engine) as uow:
            await uow.add("n2", "rolled back: never committed")
        with pytest.raises(RuntimeError):
            async with NotesUnitOfWork(engine) as uow:
                await uow.add("n3", "rolled back: an error escaped")
                raise RuntimeError("boom")

        async with NotesUnitOfWork(engine) as uow:
            assert await uow.get("n1") == "kept"
            assert await uow.get("n2") is None
            assert await uow.get("n3") is None
            version = (
                await uow.connection.execute(sa.text("SELECT version FROM notes"))
            ).scalar_one()
            assert version == 1
    finally:
        await engine.dispose()


async def test_postgres_schema_isolates_services(postgres_url: str, pg_schema: str) -> None:
    """Each service's tables live in its own schema: another schema does not see them."""
    engine = db.create_engine(postgres_url, schema=pg_schema)
    other = db.create_engine(postgres_url, schema=f"{pg_schema}_other")
    try:
        await db.migrate(engine, MIGRATIONS, schema=pg_schema)
        async with engine.connect() as connection:
            tables = await connection.run_sync(
                lambda c: sa.inspect(c).get_table_names(schema=pg_schema)
            )
        assert "notes" in tables
        async with other.connect() as connection:
            with pytest.raises(sa.exc.ProgrammingError):
                await connection.execute(sa.text("SELECT * FROM notes"))
    finally:
        await engine.dispose()
        await other.dispose()
