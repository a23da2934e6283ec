"""Upstream chunks: claims under a fenced lease, each step recorded as soon as it is known, and
results committed together with the chunk's end (and any retry chunk) in one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Integer, and_, bindparam, func, insert, or_, select, update

from lowtide.store.database import Database
from lowtide.store.rows import COUNT_COLUMNS, BatchRow, ChunkRow, Counts, ShardRow
from lowtide.store.schema import batches, one_of, shards, upstream_chunks
from lowtide.store.usage import UsageDelta, add_usage, day_of
from lowtide.vocabulary import BatchStatus, ChunkStatus


@dataclass(slots=True)
class ChunkClaim:
    chunk: ChunkRow
    batch: BatchRow
    epoch: int


def _held(claim: ChunkClaim):  # type: ignore[no-untyped-def]
    return and_(
        upstream_chunks.c.batch_id == claim.chunk.batch_id,
        upstream_chunks.c.idx == claim.chunk.idx,
        upstream_chunks.c.lease_epoch == claim.epoch,
    )


def _due_chunks_query():  # type: ignore[no-untyped-def]
    """Chunks due for their next step, soonest first; parameters: now, limit. Built once: every
    worker asks on every tick."""
    now = bindparam("now", type_=Float)
    due = and_(
        upstream_chunks.c.status != ChunkStatus.DONE,
        or_(upstream_chunks.c.next_at.is_(None), upstream_chunks.c.next_at <= now),
        or_(
            upstream_chunks.c.lease_owner.is_(None),
            upstream_chunks.c.lease_expires_at < now,
        ),
        one_of(batches.c.status, (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)),
    )
    return (
        select(upstream_chunks)
        .join(batches, batches.c.id == upstream_chunks.c.batch_id)
        .where(due)
        .order_by(upstream_chunks.c.next_at, upstream_chunks.c.batch_id)
        .limit(bindparam("limit", type_=Integer))
    )


_DUE_CHUNKS = _due_chunks_query()


async def claim_chunks(
    db: Database, worker: str, now: float, lease: float, limit: int
) -> list[ChunkClaim]:
    """Claim up to `limit` chunks that are due for their next step."""
    params = {"now": now, "limit": limit}
    # Look first without the write lock: on most servers no route uses provider batches.
    async with db.read() as conn:
        if (await conn.execute(_DUE_CHUNKS, params)).first() is None:
            return []
    claims: list[ChunkClaim] = []
    async with db.write() as conn:
        rows = (await conn.execute(_DUE_CHUNKS, params)).all()
        for row in rows:
            chunk = ChunkRow.from_row(row)
            epoch = chunk.lease_epoch + 1
            result = await conn.execute(
                update(upstream_chunks)
                .where(
                    upstream_chunks.c.batch_id == chunk.batch_id,
                    upstream_chunks.c.idx == chunk.idx,
                    upstream_chunks.c.lease_epoch == chunk.lease_epoch,
                )
                .values(lease_owner=worker, lease_expires_at=now + lease, lease_epoch=epoch)
            )
            if result.rowcount != 1:
                continue
            batch = (
                await conn.execute(select(batches).where(batches.c.id == chunk.batch_id))
            ).one()
            chunk.lease_epoch = epoch
            claims.append(ChunkClaim(chunk, BatchRow.from_row(batch), epoch))
    return claims


async def renew_chunk_lease(db: Database, claim: ChunkClaim, until: float) -> bool:
    async with db.write() as conn:
        result = await conn.execute(
            update(upstream_chunks).where(_held(claim)).values(lease_expires_at=until)
        )
    return result.rowcount == 1


async def batch_stop_reason(db: Database, batch_id: str) -> str | None:
    async with db.read() as conn:
        return (
            await conn.execute(select(batches.c.stop_reason).where(batches.c.id == batch_id))
        ).scalar()


async def record_step(db: Database, claim: ChunkClaim, **values: Any) -> bool:
    """Record what the provider now holds (ids, status) while the lease is still ours."""
    async with db.write() as conn:
        result = await conn.execute(update(upstream_chunks).where(_held(claim)).values(**values))
    if result.rowcount != 1:
        return False
    for name, value in values.items():
        setattr(claim.chunk, name, value)
    return True


async def release_chunk(db: Database, claim: ChunkClaim, next_at: float | None) -> None:
    async with db.write() as conn:
        await conn.execute(
            update(upstream_chunks)
            .where(_held(claim))
            .values(lease_owner=None, lease_expires_at=None, next_at=next_at)
        )


async def commit_chunk(
    db: Database,
    claim: ChunkClaim,
    *,
    result_key: str | None,
    counts: Counts,
    usage: list[UsageDelta],
    provider_status: str | None,
    follow_up: ChunkRow | None,
    now: float,
) -> bool:
    """The chunk's results, its usage in the ledger, and the chunk for the lines it sends
    again: all or nothing, and only while the lease is ours."""
    values: dict[str, Any] = {name: getattr(counts, name) for name in COUNT_COLUMNS}
    values.update(
        status=ChunkStatus.DONE,
        result_key=result_key,
        provider_status=provider_status,
        lease_owner=None,
        lease_expires_at=None,
    )
    async with db.write() as conn:
        result = await conn.execute(update(upstream_chunks).where(_held(claim)).values(**values))
        if result.rowcount != 1:
            return False
        await add_usage(conn, claim.batch.project, day_of(now), usage)
        if follow_up is not None:
            # One follow-up numbering at a time per batch (PostgreSQL; SQLite has one writer).
            await conn.execute(
                select(batches.c.id).where(batches.c.id == claim.chunk.batch_id).with_for_update()
            )
            top = (
                await conn.execute(
                    select(func.max(upstream_chunks.c.idx)).where(
                        upstream_chunks.c.batch_id == claim.chunk.batch_id
                    )
                )
            ).scalar()
            follow_up.idx = int(top or 0) + 1
            await conn.execute(insert(upstream_chunks).values(**follow_up.values()))
    return True


async def shards_of_chunk(db: Database, batch_id: str, idx: int) -> list[ShardRow]:
    """The shards whose lines a first-generation chunk sends, in input order."""
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(shards)
                .where(shards.c.batch_id == batch_id, shards.c.chunk == idx)
                .order_by(shards.c.idx)
            )
        ).all()
    return [ShardRow.from_row(r) for r in rows]


async def chunks_of(db: Database, batch_id: str) -> list[ChunkRow]:
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(upstream_chunks)
                .where(upstream_chunks.c.batch_id == batch_id)
                .order_by(upstream_chunks.c.idx)
            )
        ).all()
    return [ChunkRow.from_row(r) for r in rows]


async def chunks_of_batches(db: Database, batch_ids: list[str]) -> dict[str, list[ChunkRow]]:
    """The chunks of each of these batches (none for most batches: one indexed lookup)."""
    if not batch_ids:
        return {}
    found: dict[str, list[ChunkRow]] = {}
    async with db.read() as conn:
        rows = await conn.execute(
            select(upstream_chunks)
            .where(upstream_chunks.c.batch_id.in_(batch_ids))
            .order_by(upstream_chunks.c.batch_id, upstream_chunks.c.idx)
        )
        for row in rows:
            chunk = ChunkRow.from_row(row)
            found.setdefault(chunk.batch_id, []).append(chunk)
    return found
