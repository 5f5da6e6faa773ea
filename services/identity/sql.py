"""What every identity repository shares: the connection, inserts that report a lost race,
upserts on both dialects, and one keyset-paged list query (the shared kit's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.libs import keyset, listing
from corral.libs.listing import Condition
from corral.services.identity.queries import ListQuery

T = TypeVar("T")
Row = sa.Row[Any]


class DuplicateKey(Exception):
    """A unique constraint refused a row (a concurrent create won)."""


class Repo:
    def __init__(self, connection: AsyncConnection) -> None:
        self.c = connection

    async def _one(self, query: sa.Select[Any]) -> Row | None:
        row: Row | None = (await self.c.execute(query)).first()
        return row

    async def _insert(self, table: sa.Table, values: dict[str, Any]) -> Any:
        try:
            return await self.c.execute(table.insert().values(**values))
        except sa.exc.IntegrityError as exc:
            raise DuplicateKey(str(exc.orig)) from exc

    def _upsert_ignore(self, table: sa.Table, values: dict[str, Any]) -> Any:
        insert = postgresql.insert if self.c.dialect.name == "postgresql" else sqlite.insert
        return insert(table).values(**values).on_conflict_do_nothing()

    async def _page(
        self,
        table: sa.Table,
        filters: list[sa.ColumnElement[bool]],
        query: ListQuery,
        read: Callable[[Row], T],
        id_column: str = "id",
        special: Callable[[Condition], sa.ColumnElement[bool] | None] | None = None,
    ) -> tuple[list[T], str, int]:
        """One page of ``table``'s rows that pass ``filters`` and ``query``'s conditions (read
        by ``read``), the next page's token, and how many rows match in all. ``special``
        turns conditions on what is not a column into clauses (see :func:`keyset.where`)."""
        filters = [*filters, *keyset.where(table, query.conditions, special)]
        sort, page = query.sort, query.page
        total = (
            await self.c.execute(sa.select(sa.func.count()).select_from(table).where(*filters))
        ).scalar_one()
        select = keyset.page_query(
            sa.select(table).where(*filters),
            table.c[sort],
            table.c[id_column],
            descending=query.descending,
            page=page,
        )
        rows = (await self.c.execute(select)).all()
        kept, token = listing.finish_page(
            rows, page, lambda r: (r._mapping[sort], r._mapping[id_column])
        )
        return [read(r) for r in kept], token, int(total)
