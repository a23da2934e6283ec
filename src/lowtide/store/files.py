"""File rows. A deleted or expired file is invisible at once; the sweeper frees its blob later."""

from __future__ import annotations

import weakref

from sqlalchemy import and_, delete, exists, insert, or_, select, update

from lowtide.store.database import Database, StoreConnection, storable
from lowtide.store.pages import page
from lowtide.store.rows import FileRow
from lowtide.store.schema import batches, files
from lowtide.vocabulary import UNFINISHED


def _visible(now: int):  # type: ignore[no-untyped-def]
    return and_(
        files.c.deleted_at.is_(None), or_(files.c.expires_at.is_(None), files.c.expires_at > now)
    )


async def insert_file(conn: StoreConnection, row: FileRow) -> None:
    await conn.execute(insert(files).values(**row.values()))


async def add_file(db: Database, row: FileRow) -> None:
    async with db.write() as conn:
        await insert_file(conn, row)


async def get_file(db: Database, project: str, file_id: str, now: int) -> FileRow | None:
    """The file if `project` owns it and it is neither deleted nor expired."""
    if not storable(file_id):
        return None
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(files).where(
                    files.c.id == file_id, files.c.project == project, _visible(now)
                )
            )
        ).first()
    return FileRow.from_row(row) if row else None


async def get_file_any_state(db: Database, file_id: str) -> FileRow | None:
    """The row even if deleted or expired, of any project: for workers, never for clients."""
    async with db.read() as conn:
        row = (await conn.execute(select(files).where(files.c.id == file_id))).first()
    return FileRow.from_row(row) if row else None


async def list_files(
    db: Database,
    project: str,
    now: int,
    *,
    purpose: str | None,
    limit: int,
    after: str | None,
    ascending: bool,
) -> tuple[list[FileRow], bool]:
    if not storable(purpose):
        return [], False
    query = select(files).where(files.c.project == project, _visible(now))
    if purpose:
        query = query.where(files.c.purpose == purpose)
    rows, has_more = await page(
        db, files, query, project=project, after=after, limit=limit, ascending=ascending
    )
    return [FileRow.from_row(r) for r in rows], has_more


async def soft_delete(db: Database, project: str, file_id: str, now: int) -> bool:
    if not storable(file_id):
        return False
    async with db.write() as conn:
        result = await conn.execute(
            update(files)
            .where(files.c.id == file_id, files.c.project == project, _visible(now))
            .values(deleted_at=now)
        )
    return result.rowcount == 1


async def take_removable(db: Database, now: int, limit: int = 500) -> list[str]:
    """Delete rows of expired or deleted files that no unfinished batch reads; return blob keys."""
    in_use = exists().where(batches.c.input_file_id == files.c.id, batches.c.status.in_(UNFINISHED))
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


async def known_file_ids(db: Database, file_ids: list[str]) -> set[str]:
    """Which of `file_ids` still have a row, deleted or not (the sweeper keeps their blobs)."""
    async with db.read() as conn:
        rows = await conn.execute(select(files.c.id).where(files.c.id.in_(file_ids)))
        return {r.id for r in rows}


async def blob_key_of(db: Database, file_id: str) -> str:
    """The blob of a file even if it was deleted after a batch started reading it.

    A file's blob key never changes, and every shard of a batch asks for its input's: the
    answer is remembered per database (a few recent files), not read again per shard."""
    known = _blob_keys.setdefault(db, {})
    key = known.get(file_id)
    if key is not None:
        return key
    row = await get_file_any_state(db, file_id)
    if row is None:
        raise LookupError(f"file {file_id} has no row")
    if len(known) >= 64:
        known.clear()
    known[file_id] = row.blob_key
    return row.blob_key


_blob_keys: weakref.WeakKeyDictionary[Database, dict[str, str]] = weakref.WeakKeyDictionary()
