"""Batch rows: create, read, list, cancel, live progress, and the outcome of validation."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from lowtide.store.database import Database, storable
from lowtide.store.pages import page
from lowtide.store.rows import COUNT_COLUMNS, BatchRow, ChunkRow, Counts, ShardRow
from lowtide.store.schema import batches, count_sums, segments, shards, upstream_chunks
from lowtide.store.webhooks import record_event
from lowtide.vocabulary import STOPPABLE, UNFINISHED, BatchStatus, ShardStatus, StopReason


async def insert_batch(db: Database, row: BatchRow) -> BatchRow | None:
    """Insert the row; if its idempotency key is already taken, return that batch instead."""
    key = row.idempotency_key
    same_key = select(batches).where(
        batches.c.project == row.project, batches.c.idempotency_key == key
    )
    try:
        async with db.write() as conn:
            if key is not None and (existing := (await conn.execute(same_key)).first()):
                return BatchRow.from_row(existing)
            await conn.execute(insert(batches).values(**row.values()))
    except IntegrityError:
        if key is None:
            raise
        # Two creates with one key raced (PostgreSQL): the unique index let one through.
        async with db.read() as conn:
            existing = (await conn.execute(same_key)).first()
        if existing is None:
            raise
        return BatchRow.from_row(existing)
    return None


async def get_batch(db: Database, project: str, batch_id: str) -> BatchRow | None:
    if not storable(batch_id):
        return None
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(batches).where(batches.c.id == batch_id, batches.c.project == project)
            )
        ).first()
    return BatchRow.from_row(row) if row else None


async def list_batches(
    db: Database,
    project: str,
    *,
    limit: int,
    after: str | None,
    before: str | None = None,
    endpoint: str | None = None,
) -> tuple[list[BatchRow], bool]:
    """Newest first; only those of `endpoint` if given."""
    query = select(batches).where(batches.c.project == project)
    if endpoint is not None:
        query = query.where(batches.c.endpoint == endpoint)
    rows, has_more = await page(
        db,
        batches,
        query,
        project=project,
        after=after,
        before=before,
        limit=limit,
        ascending=False,
    )
    return [BatchRow.from_row(r) for r in rows], has_more


async def delete_ended_batch(
    db: Database, project: str, batch_id: str
) -> tuple[BatchRow | None, bool]:
    """Remove an ended batch and what the runner kept of it; its files are the caller's to
    delete. Returns the row as it was (None: no such batch) and whether it is gone (an
    unfinished one stays)."""
    if not storable(batch_id):
        return None, False
    mine = and_(batches.c.id == batch_id, batches.c.project == project)
    async with db.write() as conn:
        found = (await conn.execute(select(batches).where(mine))).first()
        if found is None:
            return None, False
        row = BatchRow.from_row(found)
        ended = mine & batches.c.status.not_in(UNFINISHED)  # a retry may have just restarted it
        if (await conn.execute(delete(batches).where(ended))).rowcount != 1:
            return row, False
        for table in (shards, upstream_chunks, segments):
            await conn.execute(delete(table).where(table.c.batch_id == batch_id))
    return row, True


async def live_counts(db: Database, batch_ids: list[str]) -> dict[str, Counts]:
    """Counts and usage committed so far, summed over each running batch's shards and chunks."""
    if not batch_ids:
        return {}
    counts: dict[str, Counts] = {}
    async with db.read() as conn:
        for table in (shards, upstream_chunks):
            rows = (
                await conn.execute(
                    select(table.c.batch_id, *count_sums(table))
                    .where(table.c.batch_id.in_(batch_ids))
                    .group_by(table.c.batch_id)
                )
            ).all()
            for r in rows:
                counts[r.batch_id] = (
                    counts[r.batch_id] + Counts.of(r) if r.batch_id in counts else Counts.of(r)
                )
    return counts


async def request_cancel(db: Database, project: str, batch_id: str, now: int) -> BatchRow | None:
    """Move a running batch to cancelling; returns the row as it is afterwards."""
    if not storable(batch_id):
        return None
    async with db.write() as conn:
        await conn.execute(
            update(batches)
            .where(
                batches.c.id == batch_id,
                batches.c.project == project,
                batches.c.status.in_(STOPPABLE),
                batches.c.stop_reason.is_(None),  # an expired batch stays expired
            )
            .values(
                status=BatchStatus.CANCELLING, cancelling_at=now, stop_reason=StopReason.CANCELLED
            )
        )
        row = (
            await conn.execute(
                select(batches).where(batches.c.id == batch_id, batches.c.project == project)
            )
        ).first()
    return BatchRow.from_row(row) if row else None


async def stopped_among(db: Database, batch_ids: list[str]) -> list[str]:
    """Which of these batches were cancelled or expired since their shards were claimed."""
    if not batch_ids:
        return []
    async with db.read() as conn:
        rows = await conn.execute(
            select(batches.c.id).where(
                batches.c.id.in_(batch_ids), batches.c.stop_reason.is_not(None)
            )
        )
        return [r.id for r in rows]


async def finish_validation(
    db: Database,
    batch_id: str,
    epoch: int,
    now: int,
    *,
    shard_rows: list[ShardRow],
    chunk_rows: list[ChunkRow] | None = None,
    total: int,
    model: str | None,
    errors: list[dict[str, Any]] | None,
    estimated_tokens: int = 0,
) -> bool:
    """Store the shard plan and start the batch, or fail it with its errors, in one step."""
    guard = and_(
        batches.c.id == batch_id,
        batches.c.lease_epoch == epoch,
        batches.c.status == BatchStatus.VALIDATING,
        batches.c.stop_reason.is_(None),
    )
    release = {"lease_owner": None, "lease_expires_at": None}
    if errors:
        values: dict[str, Any] = {
            "status": BatchStatus.FAILED,
            "failed_at": now,
            "errors": orjson.dumps({"object": "list", "data": errors}).decode(),
        }
    else:
        values = {
            "status": BatchStatus.IN_PROGRESS,
            "in_progress_at": now,
            "total": total,
            "model": model,
            "estimated_tokens": estimated_tokens,
        }
    async with db.write() as conn:
        result = await conn.execute(update(batches).where(guard).values(**values, **release))
        if result.rowcount != 1:
            return False
        for start in range(0, len(shard_rows), 500):
            chunk = shard_rows[start : start + 500]
            await conn.execute(insert(shards), [s.values() for s in chunk])
        if chunk_rows:
            await conn.execute(insert(upstream_chunks), [c.values() for c in chunk_rows])
        if errors:  # the batch failed: its webhook event, in the same transaction
            await record_event(conn, batch_id, BatchStatus.FAILED, now)
    return True


async def request_rerun(
    db: Database, project: str, batch_id: str, now: int, selection: str, expires_at: int
) -> BatchRow | None:
    """Move an ended batch back to in_progress with the lines to run again; None if it is not
    (or no longer) a completed, expired or cancelled batch of this project."""
    if not storable(batch_id):
        return None
    ended = (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
    values: dict[str, Any] = {
        name: None
        for name in (
            "finalizing_at",
            "completed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
            "stop_reason",
            "paused_reason",
            "lease_owner",
            "lease_expires_at",
        )
    }
    async with db.write() as conn:
        result = await conn.execute(
            update(batches)
            .where(
                batches.c.id == batch_id,
                batches.c.project == project,
                batches.c.status.in_(ended),
            )
            .values(
                status=BatchStatus.IN_PROGRESS,
                in_progress_at=now,
                expires_at=expires_at,
                retries=batches.c.retries + 1,
                retry_request=selection,
                **values,
            )
        )
        if result.rowcount != 1:
            return None
        row = (await conn.execute(select(batches).where(batches.c.id == batch_id))).one()
    return BatchRow.from_row(row)


async def start_rerun(db: Database, batch_id: str, epoch: int, previous: dict[int, str]) -> bool:
    """Every shard runs again over its previous results; the batch's earlier files are let go
    (they stay as files). One step, and only while the planner holds the batch's lease."""
    async with db.write() as conn:
        result = await conn.execute(
            update(batches)
            .where(
                batches.c.id == batch_id,
                batches.c.lease_epoch == epoch,
                batches.c.retry_request.is_not(None),
            )
            .values(
                retry_request=None,
                output_file_id=None,
                error_file_id=None,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        if result.rowcount != 1:
            return False
        zero = {name: 0 for name in COUNT_COLUMNS}
        for idx, key in previous.items():
            await conn.execute(
                update(shards)
                .where(shards.c.batch_id == batch_id, shards.c.idx == idx)
                .values(
                    status=ShardStatus.PENDING,
                    committed=0,
                    prev_key=key,
                    lease_owner=None,
                    lease_expires_at=None,
                    lease_epoch=shards.c.lease_epoch + 1,
                    **zero,
                )
            )
    return True


async def set_paused_reason(db: Database, batch_id: str, reason: str | None) -> None:
    """Why the batch's lines wait (a route refused, a budget spent); None when they run again."""
    async with db.write() as conn:
        await conn.execute(
            update(batches).where(batches.c.id == batch_id).values(paused_reason=reason)
        )


async def enqueued_tokens(db: Database, project: str, *, besides: str) -> int:
    """Estimated input tokens of the project's unfinished batches, other than `besides`."""
    async with db.read() as conn:
        total = (
            await conn.execute(
                select(func.coalesce(func.sum(batches.c.estimated_tokens), 0)).where(
                    batches.c.project == project,
                    batches.c.status.in_(UNFINISHED),
                    batches.c.id != besides,
                )
            )
        ).scalar()
    return int(total or 0)
