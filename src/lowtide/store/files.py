"""File rows. A deleted or expired file is invisible at once; the sweeper frees its blob later."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from lowtide.store.database import Database
from lowtide.store.schema import batches, files

_UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")


def _visible(now: int):  # type: ignore[no-untyped-def]
    return and_(
        files.c.deleted_at.is_(None), or_(files.c.expires_at.is_(None), files.c.expires_at > now)
    )


async def insert_file(conn: AsyncConnection, row: dict[str, Any]) -> None:
    await conn.execute(insert(files).values(**row))


async def get_file(db: Database, project: str, file_id: str, now: int) -> dict[str, Any] | None:
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(files).where(
                    files.c.id == file_id, files.c.project == project, _visible(now)
                )
            )
        ).first()
    return dict(row._mapping) if row else None


async def list_files(
    db: Database,
    project: str,
    now: int,
    *,
    purpose: str | None,
    limit: int,
    after: str | None,
    ascending: bool,
) -> tuple[list[dict[str, Any]], bool]:
    query = select(files).where(files.c.project == project, _visible(now))
    if purpose:
        query = query.where(files.c.purpose == purpose)
    async with db.read() as conn:
        if after:
            cursor = (
                await conn.execute(
                    select(files.c.seq).where(files.c.id == after, files.c.project == project)
                )
            ).scalar()
            if cursor is None:  # unknown cursor: an empty last page, never a restart
                return [], False
            if cursor is not None:
                query = query.where(files.c.seq > cursor if ascending else files.c.seq < cursor)
        order = files.c.seq.asc() if ascending else files.c.seq.desc()
        rows = (await conn.execute(query.order_by(order).limit(limit + 1))).all()
    items = [dict(r._mapping) for r in rows[:limit]]
    return items, len(rows) > limit


async def soft_delete(db: Database, project: str, file_id: str, now: int) -> bool:
    async with db.write() as conn:
        result = await conn.execute(
            update(files)
            .where(files.c.id == file_id, files.c.project == project, _visible(now))
            .values(deleted_at=now)
        )
    return result.rowcount == 1


async def take_removable(db: Database, now: int, limit: int = 500) -> list[str]:
    """Delete rows of expired or deleted files that no unfinished batch reads; return blob keys."""
    in_use = exists().where(
        batches.c.input_file_id == files.c.id, batches.c.status.in_(_UNFINISHED)
    )
    gone = or_(files.c.deleted_at.is_not(None), files.c.expires_at <= now)
    async with db.write() as conn:
        rows = (
            await conn.execute(
                select(files.c.id, files.c.blob_key).where(gone, ~in_use).limit(limit)
            )
        ).all()
        if rows:
            await conn.execute(delete(files).where(files.c.id.in_([r.id for r in rows])))
    return [r.blob_key for r in rows]


async def blob_key_any(db: Database, file_id: str) -> str:
    """The blob of a file even if it was deleted after a batch started reading it."""
    async with db.read() as conn:
        key = (await conn.execute(select(files.c.blob_key).where(files.c.id == file_id))).scalar()
    if key is None:
        raise LookupError(f"file {file_id} has no row")
    return key


async def get_file_any_project(db: Database, file_id: str) -> dict[str, Any] | None:
    async with db.read() as conn:
        row = (await conn.execute(select(files).where(files.c.id == file_id))).first()
    return dict(row._mapping) if row else None


async def known_blob_keys(db: Database, keys: list[str]) -> set[str]:
    """Which of `keys` ("files/<file id>") a file row, deleted or not, still names."""
    ids = [k.rsplit("/", 1)[-1] for k in keys]
    async with db.read() as conn:
        rows = await conn.execute(select(files.c.blob_key).where(files.c.id.in_(ids)))
        return {r.blob_key for r in rows}
