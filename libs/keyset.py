"""List queries in SQL: a parsed filter as WHERE clauses, and keyset pagination.

The pure half (filter grammar, page tokens, the page-size clamp) is :mod:`corral.libs.listing`;
this module turns it into SQLAlchemy Core for every repository alike. A page is fetched with
``limit(size + 1)`` in ``(sort column, id)`` order, and :func:`corral.libs.listing.finish_page`
keeps ``size`` rows and makes the next token from the last one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from corral.libs.listing import Condition, ListQuery, Page

ColumnFor = Callable[[Condition], sa.ColumnElement[Any]]


def compare(column: sa.ColumnElement[Any], condition: Condition) -> sa.ColumnElement[bool]:
    """One condition on one column: ``= != < <= > >=``, or a prefix match (``value*``)."""
    if condition.prefix:
        return column.startswith(condition.value, autoescape=True)
    result: sa.ColumnElement[bool] = column.operate(_OPERATORS[condition.op], condition.value)
    return result


def where(
    table: sa.Table,
    conditions: Sequence[Condition],
    special: Callable[[Condition], sa.ColumnElement[bool] | None] | None = None,
) -> list[sa.ColumnElement[bool]]:
    """WHERE clauses for ``conditions`` on ``table``'s columns; ``special`` may answer for
    conditions that are not plain columns (e.g. ``labels.<key>``) and returns None otherwise."""
    clauses: list[sa.ColumnElement[bool]] = []
    for condition in conditions:
        clause = special(condition) if special is not None else None
        clauses.append(
            clause if clause is not None else compare(table.c[condition.column], condition)
        )
    return clauses


def label_condition(table: sa.Table) -> Callable[[Condition], sa.ColumnElement[bool] | None]:
    """The ``special`` of :func:`where` for a table whose ``labels`` column holds sorted JSON
    with standard separators: ``labels.<key> = value`` (or ``!=``) matches the exact pair;
    None for the plain columns."""

    def condition(cond: Condition) -> sa.ColumnElement[bool] | None:
        if not cond.column.startswith("labels."):
            return None
        pair = json.dumps({cond.column.removeprefix("labels."): cond.value})[1:-1]
        escaped = pair.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        matched = table.c.labels.like(f"%{escaped}%", escape="\\")
        return matched if cond.op == "=" else sa.not_(matched)

    return condition


def page_query(
    query: sa.Select[Any],
    sort: sa.ColumnElement[Any],
    tiebreak: sa.ColumnElement[Any],
    *,
    descending: bool,
    page: Page,
) -> sa.Select[Any]:
    """``query`` restricted to the rows after ``page.after``, ordered, with one row to spare."""
    if page.after is not None:
        value, ident = page.after
        if descending:
            query = query.where(sa.or_(sort < value, sa.and_(sort == value, tiebreak < ident)))
        else:
            query = query.where(sa.or_(sort > value, sa.and_(sort == value, tiebreak > ident)))
    order = (sort.desc(), tiebreak.desc()) if descending else (sort.asc(), tiebreak.asc())
    return query.order_by(*order).limit(page.size + 1)


def select_page(table: sa.Table, query: ListQuery) -> sa.Select[Any]:
    """One page of ``table``'s rows for a List ``query``: its conditions (``labels.<key>`` as
    well, when the table has ``labels``), in (order, id) order, with one row to spare."""
    special = label_condition(table) if "labels" in table.c else None
    select = sa.select(table).where(*where(table, query.conditions, special))
    return page_query(
        select, table.c[query.order], table.c.id, descending=query.descending, page=query.page
    )


_OPERATORS: dict[str, Any] = {
    "=": sa.sql.operators.eq,
    "!=": sa.sql.operators.ne,
    "<": sa.sql.operators.lt,
    "<=": sa.sql.operators.le,
    ">": sa.sql.operators.gt,
    ">=": sa.sql.operators.ge,
}
