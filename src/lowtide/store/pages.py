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
    before: str | None = None,
) -> tuple[list[Row[Any]], bool]:
    """Up to `limit` rows of `query` after the row whose id is `after`, and whether more follow;
    or, with `before`, the `limit` rows just before that row (still in list order), and whether
    more come before them.

    An unknown cursor (or one of another project) gives an empty last page, never a restart.
    """
    if not storable(after) or not storable(before):
        return [], False
    backwards = before is not None
    async with db.read() as conn:
        if after or before:
            cursor = (
                await conn.execute(
                    select(table.c.seq).where(
                        table.c.id == (before if backwards else after), table.c.project == project
                    )
                )
            ).scalar()
            if cursor is None:
                return [], False
            forward = ascending != backwards  # which way seq runs from the cursor
            query = query.where(table.c.seq > cursor if forward else table.c.seq < cursor)
        order = table.c.seq.asc() if ascending != backwards else table.c.seq.desc()
        rows = (await conn.execute(query.order_by(order).limit(limit + 1))).all()
    page_rows = list(rows[:limit])
    if backwards:
        page_rows.reverse()
    return page_rows, len(rows) > limit
