"""Coordination between workers: claims, leases with fencing numbers, commits.

Every claim is a compare-and-set on a row's `lease_epoch`, so it is safe with any number of
workers on one database. A worker commits only while the epoch it claimed is still the row's
epoch: a worker that was paused past its lease and woke up finds the epoch moved on and its
commit refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import and_, case, delete, exists, func, insert, or_, select, tuple_, update

from lowtide.store.database import Database
from lowtide.store.schema import batches, segments, shards

_SUMS = (
    "completed",
    "failed",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
)


@dataclass(slots=True)
class BatchTask:
    batch: dict[str, Any]
    kind: str  # "validate" | "finalize"
    epoch: int


@dataclass(slots=True)
class ShardClaim:
    batch_id: str
    idx: int
    epoch: int
    first_request: int
    request_count: int
    first_line: int
    byte_start: int
    byte_end: int
    committed: int
    endpoint: str
    input_file_id: str
    priority: str = "normal"
    created_at: int = 0
    expires_at: int = 0


@dataclass(slots=True)
class SegmentStats:
    count: int
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int


def _lease_free(table, now: float):  # type: ignore[no-untyped-def]
    return or_(table.c.lease_owner.is_(None), table.c.lease_expires_at < now)


async def mark_expired(db: Database, now: float) -> list[str]:
    """Flag batches whose completion window has closed; their shards stop and finalize runs."""
    every_shard_done = ~exists().where(shards.c.batch_id == batches.c.id, shards.c.status != "done")
    due = and_(
        batches.c.status.in_(("validating", "in_progress")),
        batches.c.stop_reason.is_(None),
        batches.c.expires_at <= int(now),
        # a batch whose every line finished completes, even if finalize has not started yet
        ~and_(batches.c.status == "in_progress", every_shard_done),
    )
    async with db.write() as conn:
        ids = list((await conn.execute(select(batches.c.id).where(due))).scalars())
        if ids:
            await conn.execute(
                update(batches).where(batches.c.id.in_(ids), due).values(stop_reason="expired")
            )
    return ids


async def claim_batch_task(db: Database, worker: str, now: float, lease: float) -> BatchTask | None:
    """Claim one batch that needs validating or finalizing."""
    live_shard = exists().where(
        shards.c.batch_id == batches.c.id,
        shards.c.status == "running",
        shards.c.lease_expires_at >= now,
    )
    unfinished_shard = exists().where(shards.c.batch_id == batches.c.id, shards.c.status != "done")
    validate = and_(batches.c.status == "validating", batches.c.stop_reason.is_(None))
    finalize = or_(
        and_(batches.c.status == "validating", batches.c.stop_reason.is_not(None)),
        and_(
            batches.c.status.in_(("in_progress", "cancelling")),
            batches.c.stop_reason.is_not(None),
            ~live_shard,
        ),
        and_(batches.c.status == "in_progress", batches.c.stop_reason.is_(None), ~unfinished_shard),
        batches.c.status == "finalizing",
    )
    async with db.write() as conn:
        row = (
            await conn.execute(
                select(batches)
                .where(_lease_free(batches, now), or_(validate, finalize))
                .order_by(batches.c.seq)
                .limit(1)
            )
        ).first()
        if row is None:
            return None
        batch = dict(row._mapping)
        kind = (
            "validate"
            if batch["status"] == "validating" and not batch["stop_reason"]
            else "finalize"
        )
        epoch = batch["lease_epoch"] + 1
        values: dict[str, Any] = {
            "lease_owner": worker,
            "lease_expires_at": now + lease,
            "lease_epoch": epoch,
        }
        if kind == "finalize" and batch["status"] in ("in_progress", "validating"):
            values.update(status="finalizing", finalizing_at=int(now))
        result = await conn.execute(
            update(batches)
            .where(batches.c.id == batch["id"], batches.c.lease_epoch == batch["lease_epoch"])
            .values(**values)
        )
        if result.rowcount != 1:
            return None
        if kind == "finalize":
            # Fence out any shard worker still holding a lease on this batch.
            await conn.execute(
                update(shards)
                .where(shards.c.batch_id == batch["id"], shards.c.status == "running")
                .values(status="pending", lease_owner=None, lease_epoch=shards.c.lease_epoch + 1)
            )
        batch.update(values)
    return BatchTask(batch=batch, kind=kind, epoch=epoch)


async def renew_batch_lease(db: Database, batch_id: str, epoch: int, until: float) -> bool:
    async with db.write() as conn:
        result = await conn.execute(
            update(batches)
            .where(batches.c.id == batch_id, batches.c.lease_epoch == epoch)
            .values(lease_expires_at=until)
        )
    return result.rowcount == 1


async def release_batch_lease(
    db: Database, batch_id: str, epoch: int, retry_at: float | None = None
) -> None:
    """Give the batch task back; with `retry_at`, nobody takes it again before then."""
    async with db.write() as conn:
        await conn.execute(
            update(batches)
            .where(batches.c.id == batch_id, batches.c.lease_epoch == epoch)
            .values(lease_owner=None if retry_at is None else "backoff", lease_expires_at=retry_at)
        )


async def finish_validation(
    db: Database,
    batch_id: str,
    epoch: int,
    now: int,
    *,
    shard_rows: list[dict[str, Any]],
    total: int,
    model: str | None,
    errors: list[dict[str, Any]] | None,
) -> bool:
    """Store the shard plan and start the batch, or fail it with its errors, in one step."""
    async with db.write() as conn:
        guard = and_(
            batches.c.id == batch_id,
            batches.c.lease_epoch == epoch,
            batches.c.status == "validating",
            batches.c.stop_reason.is_(None),
        )
        release = {"lease_owner": None, "lease_expires_at": None}
        if errors:
            values = {
                "status": "failed",
                "failed_at": now,
                "errors": orjson.dumps({"object": "list", "data": errors}).decode(),
                **release,
            }
            return (await conn.execute(update(batches).where(guard).values(**values))).rowcount == 1
        values = {
            "status": "in_progress",
            "in_progress_at": now,
            "total": total,
            "model": model,
            **release,
        }
        if (await conn.execute(update(batches).where(guard).values(**values))).rowcount != 1:
            return False
        for start in range(0, len(shard_rows), 500):
            await conn.execute(insert(shards), shard_rows[start : start + 500])
    return True


async def claim_shards(
    db: Database,
    worker: str,
    now: float,
    lease: float,
    limit: int,
    *,
    idle_batches_only: bool = False,
) -> list[ShardClaim]:
    """Claim up to `limit` runnable shards: every batch's first shard before any batch's second.

    Among shards of equal rank, higher priority goes first, then the batch whose completion
    window closes first. With `idle_batches_only`, only batches with no shard running anywhere
    are considered: that is how a new batch gets a worker even while a big one fills them all.
    """
    claimable = and_(
        # pending (and not backing off), or running under a lease that has run out
        shards.c.status.in_(("pending", "running")),
        or_(shards.c.lease_expires_at.is_(None), shards.c.lease_expires_at < now),
        batches.c.status == "in_progress",
        batches.c.stop_reason.is_(None),
    )
    if idle_batches_only:
        running = shards.alias("running")
        claimable = and_(
            claimable,
            ~exists().where(
                running.c.batch_id == shards.c.batch_id,
                running.c.status == "running",
                running.c.lease_expires_at >= now,
            ),
        )
    rank = func.row_number().over(partition_by=shards.c.batch_id, order_by=shards.c.idx)
    urgency = case((batches.c.priority == "high", 0), (batches.c.priority == "low", 2), else_=1)
    ranked = (
        select(
            shards,
            batches.c.endpoint,
            batches.c.input_file_id,
            batches.c.seq,
            batches.c.priority,
            batches.c.created_at,
            batches.c.expires_at,
            urgency.label("urgency"),
            rank.label("rank"),
        )
        .join(batches, batches.c.id == shards.c.batch_id)
        .where(claimable)
        .subquery()
    )
    query = (
        select(ranked)
        .where(ranked.c.rank <= (1 if idle_batches_only else limit))
        .order_by(ranked.c.rank, ranked.c.urgency, ranked.c.expires_at, ranked.c.seq)
        .limit(limit * 4)
    )
    claims: list[ShardClaim] = []
    async with db.write() as conn:
        candidates = [dict(r._mapping) for r in (await conn.execute(query)).all()]
        if candidates and not db.is_sqlite:
            # PostgreSQL: skip shards another worker is claiming right now instead of queueing
            # behind its row locks (SQLite has one writer at a time anyway).
            keys = [(r["batch_id"], r["idx"]) for r in candidates]
            lock = (
                select(shards.c.batch_id, shards.c.idx)
                .where(tuple_(shards.c.batch_id, shards.c.idx).in_(keys))
                .with_for_update(skip_locked=True)
            )
            free = {(r.batch_id, r.idx) for r in (await conn.execute(lock)).all()}
            candidates = [r for r in candidates if (r["batch_id"], r["idx"]) in free]
        for row in candidates:
            if len(claims) >= limit:
                break
            epoch = row["lease_epoch"] + 1
            result = await conn.execute(
                update(shards)
                .where(
                    shards.c.batch_id == row["batch_id"],
                    shards.c.idx == row["idx"],
                    shards.c.lease_epoch == row["lease_epoch"],
                )
                .values(
                    status="running",
                    lease_owner=worker,
                    lease_expires_at=now + lease,
                    lease_epoch=epoch,
                )
            )
            if result.rowcount == 1:
                claims.append(
                    ShardClaim(
                        batch_id=row["batch_id"],
                        idx=row["idx"],
                        epoch=epoch,
                        first_request=row["first_request"],
                        request_count=row["request_count"],
                        first_line=row["first_line"],
                        byte_start=row["byte_start"],
                        byte_end=row["byte_end"],
                        committed=row["committed"],
                        endpoint=row["endpoint"],
                        input_file_id=row["input_file_id"],
                        priority=row["priority"],
                        created_at=row["created_at"],
                        expires_at=row["expires_at"] or 0,
                    )
                )
    return claims


async def renew_shard_lease(db: Database, claim: ShardClaim, until: float) -> str | None:
    """Extend the lease. Returns 'lost', 'stop' (batch cancelled/expired) or None to carry on."""
    async with db.write() as conn:
        result = await conn.execute(
            update(shards)
            .where(
                shards.c.batch_id == claim.batch_id,
                shards.c.idx == claim.idx,
                shards.c.lease_epoch == claim.epoch,
            )
            .values(lease_expires_at=until)
        )
        if result.rowcount != 1:
            return "lost"
        stop = (
            await conn.execute(select(batches.c.stop_reason).where(batches.c.id == claim.batch_id))
        ).scalar()
    return "stop" if stop else None


async def commit_segment(
    db: Database, claim: ShardClaim, first: int, blob_key: str, stats: SegmentStats, *, done: bool
) -> bool:
    """Record a segment of results [first, first+count) if this worker still holds the shard."""
    new_committed = first + stats.count
    values: dict[str, Any] = {"committed": new_committed}
    for name in _SUMS:
        values[name] = shards.c[name] + getattr(stats, name)
    if done:
        values.update(status="done", lease_owner=None, lease_expires_at=None)
    async with db.write() as conn:
        result = await conn.execute(
            update(shards)
            .where(
                shards.c.batch_id == claim.batch_id,
                shards.c.idx == claim.idx,
                shards.c.lease_epoch == claim.epoch,
                shards.c.committed == first,
            )
            .values(**values)
        )
        if result.rowcount != 1:
            return False
        if stats.count:
            await conn.execute(
                insert(segments).values(
                    batch_id=claim.batch_id,
                    shard_idx=claim.idx,
                    first=first,
                    count=stats.count,
                    blob_key=blob_key,
                )
            )
    return True


async def release_shard(db: Database, claim: ShardClaim, retry_at: float | None = None) -> None:
    """Hand a shard back so another worker (or finalize) can take it; not before `retry_at`."""
    async with db.write() as conn:
        await conn.execute(
            update(shards)
            .where(
                shards.c.batch_id == claim.batch_id,
                shards.c.idx == claim.idx,
                shards.c.lease_epoch == claim.epoch,
                shards.c.status == "running",
            )
            .values(status="pending", lease_owner=None, lease_expires_at=retry_at)
        )


async def shards_of(db: Database, batch_id: str) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(shards).where(shards.c.batch_id == batch_id).order_by(shards.c.idx)
            )
        ).all()
    return [dict(r._mapping) for r in rows]


async def segments_of(db: Database, batch_id: str, shard_idx: int) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(segments)
                .where(segments.c.batch_id == batch_id, segments.c.shard_idx == shard_idx)
                .order_by(segments.c.first)
            )
        ).all()
    return [dict(r._mapping) for r in rows]


async def shard_totals(db: Database, batch_id: str) -> dict[str, int]:
    columns = [func.coalesce(func.sum(shards.c[name]), 0).label(name) for name in _SUMS]
    async with db.read() as conn:
        row = (await conn.execute(select(*columns).where(shards.c.batch_id == batch_id))).one()
    return {name: int(getattr(row, name)) for name in _SUMS}


async def finish_batch(
    db: Database,
    batch_id: str,
    epoch: int,
    values: dict[str, Any],
    file_rows: list[dict[str, Any]],
) -> bool:
    """Publish output files and the terminal status together, if the finalize lease still holds."""
    from lowtide.store.files import insert_file

    async with db.write() as conn:
        result = await conn.execute(
            update(batches)
            .where(batches.c.id == batch_id, batches.c.lease_epoch == epoch)
            .values(lease_owner=None, lease_expires_at=None, **values)
        )
        if result.rowcount != 1:
            return False
        for row in file_rows:
            await insert_file(conn, row)
        await conn.execute(delete(segments).where(segments.c.batch_id == batch_id))
    return True


async def batch_status(db: Database, batch_id: str) -> str | None:
    async with db.read() as conn:
        return (
            await conn.execute(select(batches.c.status).where(batches.c.id == batch_id))
        ).scalar()


async def committed_segment_keys(db: Database, batch_id: str, keys: list[str]) -> set[str]:
    """Which of `keys` (blobs under this batch's segment folder) a committed segment names."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(segments.c.blob_key).where(
                segments.c.batch_id == batch_id, segments.c.blob_key.in_(keys)
            )
        )
        return {r.blob_key for r in rows}
