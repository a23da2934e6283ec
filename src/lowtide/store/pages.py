"""Cursor pagination over a project's rows, in insertion order (`seq`), as the list endpoints need."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Table, select
from sqlalchemy.engine import Row

from lowtide.store.database import Database, storable


async def page(
    db: Database,
    table: Table,
    query: Select[Any],
    *,
    project: str,
    after: str | None,
    limit: int,
    ascending: bool,
) -> tuple[list[Row[Any]], bool]:
    """Up to `limit` rows of `query` after the row whose id is `after`, and whether more follow.

    An unknown cursor (or one of another project) gives an empty last page, never a restart.
    """
    if not storable(after):
        return [], False
    async with db.read() as conn:
        if after:
            cursor = (
                await conn.execute(
                    select(table.c.seq).where(table.c.id == after, table.c.project == project)
                )
            ).scalar()
            if cursor is None:
                return [], False
            query = query.where(table.c.seq > cursor if ascending else table.c.seq < cursor)
        order = table.c.seq.asc() if ascending else table.c.seq.desc()
        rows = (await conn.execute(query.order_by(order).limit(limit + 1))).all()
    return list(rows[:limit]), len(rows) > limit
