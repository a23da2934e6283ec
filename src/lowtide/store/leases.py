"""Claims and leases with fencing numbers: who works on which batch task and which shard.

Every claim is a compare-and-set on a row's `lease_epoch`, so it is safe with any number of
workers on one database. A worker writes only while the epoch it claimed is still the row's
epoch: a worker that was paused past its lease wakes up to find the epoch moved on and its
writes refused. A lease nobody holds may still have an expiry: that is a back-off, and nobody
claims the row before then.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    and_,
    bindparam,
    case,
    exists,
    or_,
    select,
    tuple_,
    update,
)

from lowtide.store.database import Database
from lowtide.store.rows import BatchRow
from lowtide.store.schema import batches, one_of, shards, upstream_chunks
from lowtide.vocabulary import (
    SHARD_UNFINISHED,
    STOPPABLE,
    BatchStatus,
    ChunkStatus,
    ShardStatus,
    StopReason,
)


class TaskKind(StrEnum):
    VALIDATE = "validate"
    RERUN = "rerun"  # plan a retried batch from its published files
    FINALIZE = "finalize"


@dataclass(slots=True)
class BatchTask:
    batch: BatchRow
    kind: TaskKind
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
    project: str = "default"
    priority: str = "normal"
    created_at: int = 0
    expires_at: int = 0
    prev_key: str | None = None  # a rerun: the earlier results to keep (runner/rerun.py)


class LeaseState(StrEnum):
    HELD = "held"
    LOST = "lost"  # another worker took the shard over: write nothing more
    STOP = "stop"  # the batch was cancelled or expired: finish what is in flight, hand back


def held(claim: ShardClaim):  # type: ignore[no-untyped-def]
    """The shard row of `claim`, while the claim's lease is still the row's."""
    return and_(
        shards.c.batch_id == claim.batch_id,
        shards.c.idx == claim.idx,
        shards.c.lease_epoch == claim.epoch,
    )


def _free(table, now: float):  # type: ignore[no-untyped-def]
    return or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at < now)


def _unfinished_work():  # type: ignore[no-untyped-def]
    """The batch still has lines to run: a shard here, or a chunk with a provider."""
    return or_(
        exists().where(
            shards.c.batch_id == batches.c.id, one_of(shards.c.status, SHARD_UNFINISHED)
        ),
        _unfinished_chunk(),
    )


def _unfinished_chunk():  # type: ignore[no-untyped-def]
    return exists().where(
        upstream_chunks.c.batch_id == batches.c.id, upstream_chunks.c.status != ChunkStatus.DONE
    )


def _live_shard(now: float):  # type: ignore[no-untyped-def]
    return exists().where(
        shards.c.batch_id == batches.c.id,
        shards.c.status == ShardStatus.RUNNING,
        shards.c.lease_expires_at >= now,
    )


def _expiry_due():  # type: ignore[no-untyped-def]
    every_shard_done = ~_unfinished_work()
    return and_(
        one_of(batches.c.status, STOPPABLE),
        batches.c.stop_reason.is_(None),
        batches.c.expires_at <= bindparam("now", type_=Integer),
        # a batch whose every line finished completes, even if finalize has not started yet
        ~and_(batches.c.status == BatchStatus.IN_PROGRESS, every_shard_done),
    )


_EXPIRY_DUE = _expiry_due()
_EXPIRED = select(batches.c.id).where(_EXPIRY_DUE)  # built once: asked every second


async def mark_expired(db: Database, now: float) -> list[str]:
    """Flag batches whose completion window has closed; their shards stop and finalize runs."""
    params = {"now": int(now)}
    # Look first without the write lock: almost always, nothing has expired.
    async with db.read() as conn:
        if (await conn.execute(_EXPIRED, params)).first() is None:
            return []
    async with db.write() as conn:
        ids = list((await conn.execute(_EXPIRED, params)).scalars())
        if ids:
            await conn.execute(
                update(batches)
                .where(batches.c.id.in_(ids), _EXPIRY_DUE)
                .values(stop_reason=StopReason.EXPIRED),
                params,
            )
    return ids


def _batch_task_query():  # type: ignore[no-untyped-def]
    """The batch-task claim query, built once (it runs on every tick); parameter: now."""
    now = bindparam("now", type_=Float)
    unfinished_shard = _unfinished_work()
    stopped = batches.c.stop_reason.is_not(None)
    validate = and_(batches.c.status == BatchStatus.VALIDATING, ~stopped)
    planning = batches.c.retry_request.is_not(None)  # a rerun is planned before anything else
    finalize = and_(
        ~planning,
        or_(
            and_(batches.c.status == BatchStatus.VALIDATING, stopped),
            and_(
                one_of(batches.c.status, (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)),
                stopped,
                ~_live_shard(now),
                ~_unfinished_chunk(),  # its chunks cancel their provider batches first
            ),
            and_(batches.c.status == BatchStatus.IN_PROGRESS, ~stopped, ~unfinished_shard),
            batches.c.status == BatchStatus.FINALIZING,
        ),
    )
    rerun = and_(
        one_of(batches.c.status, (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)), planning
    )
    return (
        select(batches)
        .where(_free(batches, now), or_(validate, rerun, finalize))
        .order_by(batches.c.seq)
        .limit(1)
    )


_BATCH_TASK_QUERY = _batch_task_query()


async def claim_batch_task(db: Database, worker: str, now: float, lease: float) -> BatchTask | None:
    """Claim one batch that needs validating or finalizing."""
    async with db.write() as conn:
        row = (await conn.execute(_BATCH_TASK_QUERY, {"now": now})).first()
        if row is None:
            return None
        batch = BatchRow.from_row(row)
        validating = batch.status == BatchStatus.VALIDATING and batch.stop_reason is None
        if validating:
            kind = TaskKind.VALIDATE
        elif batch.retry_request is not None:
            kind = TaskKind.RERUN
        else:
            kind = TaskKind.FINALIZE
        epoch = batch.lease_epoch + 1
        values: dict[str, Any] = {
            "lease_owner": worker,
            "lease_expires_at": now + lease,
            "lease_epoch": epoch,
        }
        if kind == TaskKind.FINALIZE and batch.status in STOPPABLE:
            values.update(status=BatchStatus.FINALIZING, finalizing_at=int(now))
        result = await conn.execute(
            update(batches)
            .where(batches.c.id == batch.id, batches.c.lease_epoch == batch.lease_epoch)
            .values(**values)
        )
        if result.rowcount != 1:
            return None
        if kind == TaskKind.FINALIZE:
            # Fence out any shard worker still holding a lease on this batch.
            await conn.execute(
                update(shards)
                .where(shards.c.batch_id == batch.id, shards.c.status == ShardStatus.RUNNING)
                .values(
                    status=ShardStatus.PENDING,
                    lease_owner=None,
                    lease_epoch=shards.c.lease_epoch + 1,
                )
            )
        for name, value in values.items():
            setattr(batch, name, value)
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
            .values(lease_owner=None, lease_expires_at=retry_at)
        )


def _claimable_shard(table, now):  # type: ignore[no-untyped-def]
    """Pending (and not backing off), or running under a lease that has run out."""
    return and_(
        one_of(table.c.status, (ShardStatus.PENDING, ShardStatus.RUNNING)), _free(table, now)
    )


def _claimable_batches(idle_batches_only: bool):  # type: ignore[no-untyped-def]
    """The batches a shard may be claimed from, most urgent first, built once per kind (it runs
    on every tick). Parameters: now, candidates (rows returned). With `idle_batches_only`, only
    batches with no shard running anywhere."""
    now = bindparam("now", type_=Float)
    claimable = _claimable_shard(shards, now)
    where = [
        batches.c.status == BatchStatus.IN_PROGRESS,
        batches.c.stop_reason.is_(None),
        # a retried batch's shards wait until the rerun is planned (they may be stale)
        batches.c.retry_request.is_(None),
        exists().where(shards.c.batch_id == batches.c.id, claimable),
    ]
    if idle_batches_only:
        where.append(
            ~exists().where(
                shards.c.batch_id == batches.c.id,
                shards.c.status == ShardStatus.RUNNING,
                shards.c.lease_expires_at >= now,
            )
        )
    urgency = case((batches.c.priority == "high", 0), (batches.c.priority == "low", 2), else_=1)
    return (
        select(
            batches.c.id,
            batches.c.endpoint,
            batches.c.input_file_id,
            batches.c.project,
            batches.c.priority,
            batches.c.created_at,
            batches.c.expires_at,
        )
        .where(*where)
        .order_by(urgency, batches.c.expires_at, batches.c.seq)
        .limit(bindparam("candidates", type_=Integer))
    )


_CLAIMABLE_BATCHES = {kind: _claimable_batches(kind) for kind in (False, True)}
# A batch's first claimable shards in file order (parameters: batch_id, now, max_rank): a walk
# along the primary key (batch_id, idx) that stops after max_rank of them, however many shards
# the batch has. (Ranking every claimable shard of every batch instead cost 4 ms of CPU a claim
# on SQLite at 1,000 shards, 19 ms at 5,000: bench/store_calls.py --batch-shards.)
_FIRST_SHARDS = (
    select(shards)
    .where(
        shards.c.batch_id == bindparam("batch_id"),
        _claimable_shard(shards, bindparam("now", type_=Float)),
    )
    .order_by(shards.c.idx)
    .limit(bindparam("max_rank", type_=Integer))
)
# One shard's claim: a compare-and-set on its epoch (values bound per call).
_CLAIM_SHARD = update(shards).where(
    shards.c.batch_id == bindparam("b_batch_id"),
    shards.c.idx == bindparam("b_idx"),
    shards.c.lease_epoch == bindparam("b_epoch"),
)


async def _candidates(
    conn: Any, now: float, max_rank: int, count: int, idle_batches_only: bool
) -> list[tuple[Any, Any]]:
    """Up to `count` (batch, shard) rows: every batch's first claimable shard, in batch order
    (priority, then the completion window that closes first, then age), before any batch's
    second, and so on up to `max_rank` shards a batch."""
    query = _CLAIMABLE_BATCHES[idle_batches_only]
    batch_rows = (await conn.execute(query, {"now": now, "candidates": count})).all()
    firsts = []
    for batch in batch_rows:
        params = {"batch_id": batch.id, "now": now, "max_rank": max_rank}
        firsts.append((batch, (await conn.execute(_FIRST_SHARDS, params)).all()))
    ranked = [
        (batch, rows[rank])
        for rank in range(max_rank)
        for batch, rows in firsts
        if rank < len(rows)
    ]
    return ranked[:count]


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
    max_rank = 1 if idle_batches_only else limit
    claims: list[ShardClaim] = []
    async with db.write() as conn:
        candidates = await _candidates(conn, now, max_rank, limit * 4, idle_batches_only)
        if candidates and not db.is_sqlite:
            # PostgreSQL: skip shards another worker is claiming right now instead of queueing
            # behind its row locks (SQLite has one writer at a time anyway).
            keys = [(r.batch_id, r.idx) for _, r in candidates]
            lock = (
                select(shards.c.batch_id, shards.c.idx)
                .where(tuple_(shards.c.batch_id, shards.c.idx).in_(keys))
                .with_for_update(skip_locked=True)
            )
            free = {(r.batch_id, r.idx) for r in (await conn.execute(lock)).all()}
            candidates = [(b, r) for b, r in candidates if (r.batch_id, r.idx) in free]
        for batch, row in candidates:
            if len(claims) >= limit:
                break
            epoch = row.lease_epoch + 1
            result = await conn.execute(
                _CLAIM_SHARD,
                {
                    "b_batch_id": row.batch_id,
                    "b_idx": row.idx,
                    "b_epoch": row.lease_epoch,
                    "status": ShardStatus.RUNNING,
                    "lease_owner": worker,
                    "lease_expires_at": now + lease,
                    "lease_epoch": epoch,
                },
            )
            if result.rowcount == 1:
                claims.append(
                    ShardClaim(
                        batch_id=row.batch_id,
                        idx=row.idx,
                        epoch=epoch,
                        first_request=row.first_request,
                        request_count=row.request_count,
                        first_line=row.first_line,
                        byte_start=row.byte_start,
                        byte_end=row.byte_end,
                        committed=row.committed,
                        endpoint=batch.endpoint,
                        input_file_id=batch.input_file_id,
                        project=batch.project,
                        priority=batch.priority,
                        created_at=batch.created_at,
                        expires_at=batch.expires_at or 0,
                        prev_key=row.prev_key,
                    )
                )
    return claims


async def renew_shard_lease(db: Database, claim: ShardClaim, until: float) -> LeaseState:
    """Extend the lease, and say whether the batch wants its shards to stop."""
    async with db.write() as conn:
        result = await conn.execute(
            update(shards).where(held(claim)).values(lease_expires_at=until)
        )
        if result.rowcount != 1:
            return LeaseState.LOST
        stop = (
            await conn.execute(select(batches.c.stop_reason).where(batches.c.id == claim.batch_id))
        ).scalar()
    return LeaseState.STOP if stop else LeaseState.HELD


async def release_shard(db: Database, claim: ShardClaim, retry_at: float | None = None) -> None:
    """Hand a shard back so another worker (or finalize) can take it; not before `retry_at`."""
    async with db.write() as conn:
        await conn.execute(
            update(shards)
            .where(held(claim), shards.c.status == ShardStatus.RUNNING)
            .values(status=ShardStatus.PENDING, lease_owner=None, lease_expires_at=retry_at)
        )


@dataclass(slots=True)
class HeldShard:
    """A running shard and the worker that holds its lease (the dashboard's workers view)."""

    owner: str
    batch_id: str
    project: str
    idx: int
    lease_expires_at: float
    committed: int
    request_count: int


async def running_shards(db: Database, limit: int = 10_000) -> list[HeldShard]:
    """Every shard a worker holds now (or held, while its lease has not been taken over)."""
    query = (
        select(
            shards.c.lease_owner,
            shards.c.batch_id,
            batches.c.project,
            shards.c.idx,
            shards.c.lease_expires_at,
            shards.c.committed,
            shards.c.request_count,
        )
        .select_from(shards.join(batches, batches.c.id == shards.c.batch_id))
        .where(shards.c.status == ShardStatus.RUNNING, shards.c.lease_owner.is_not(None))
        .limit(limit)
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    return [
        HeldShard(r[0], r[1], r[2], r[3], float(r[4] or 0.0), int(r[5] or 0), int(r[6]))
        for r in rows
    ]
