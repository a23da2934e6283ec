"""What the sweeper asks before it deletes a blob: does anything still name it?"""

from __future__ import annotations

from sqlalchemy import select

from lowtide.store.database import Database
from lowtide.store.schema import batches, segments, shards, upstream_chunks
from lowtide.vocabulary import TERMINAL


async def live_segment_keys(db: Database, batch_id: str, keys: list[str]) -> set[str]:
    """Which of `keys` a committed segment or chunk of this batch names, while the batch is
    unfinished.

    Nothing reads the others: segments of a finished batch were merged into its files, and a
    blob no segment row names was never committed.
    """
    async with db.read() as conn:
        status = (
            await conn.execute(select(batches.c.status).where(batches.c.id == batch_id))
        ).scalar()
        if status is None or status in TERMINAL:
            return set()
        rows = await conn.execute(
            select(segments.c.blob_key).where(
                segments.c.batch_id == batch_id, segments.c.blob_key.in_(keys)
            )
        )
        live = {r.blob_key for r in rows}
        chunks = upstream_chunks.c
        for column in (chunks.result_key, chunks.source_key, shards.c.prev_key):
            rows = await conn.execute(
                select(column).where(column.table.c.batch_id == batch_id, column.in_(keys))
            )
            live |= {r[0] for r in rows}
        return live
