"""A tiny repository over the test migrations: the shape every service's repository takes."""

from __future__ import annotations

import sqlalchemy as sa

from corral.libs.db import UnitOfWork

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)


class NotesUnitOfWork(UnitOfWork):
    async def add(self, note_id: str, body: str) -> None:
        await self.connection.execute(notes.insert().values(id=note_id, body=body))

    async def get(self, note_id: str) -> str | None:
        row = (
            await self.connection.execute(sa.select(notes.c.body).where(notes.c.id == note_id))
        ).first()
        return None if row is None else str(row.body)
