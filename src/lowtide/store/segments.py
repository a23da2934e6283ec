"""Segment commits and publishing: results enter the store as a growing prefix of each shard,
and leave it as output files published together with the batch's terminal status."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update

from lowtide.store.database import Database
from lowtide.store.files import insert_file
from lowtide.store.leases import ShardClaim
from lowtide.store.rows import COUNT_COLUMNS, Counts, FileRow, SegmentRow, ShardRow
from lowtide.store.schema import batches, count_sums, segments, shards, upstream_chunks
from lowtide.store.usage import UsageDelta, add_usage, day_of
from lowtide.store.webhooks import record_event
from lowtide.vocabulary import TERMINAL, ShardStatus


@dataclass(slots=True)
class Segment:
    """Results of lines [first, first + lines) of a shard, stored under `blob_key`."""

    first: int
    lines: int
    blob_key: str
    counts: Counts


def _commit_statement(done: bool):  # type: ignore[no-untyped-def]
    """A segment's commit: the shard row moves its prefix on and adds the segment's counts,
    if the lease (batch, idx, epoch) still holds and the prefix is where the segment starts.
    Built once per kind: it runs with every segment."""
    values: dict[str, Any] = {"committed": bindparam("new_committed")}
    for name in COUNT_COLUMNS:
        values[name] = shards.c[name] + bindparam(f"d_{name}", type_=shards.c[name].type)
    if done:
        values.update(status=ShardStatus.DONE, lease_owner=None, lease_expires_at=None)
    return (
        update(shards)
        .where(
            shards.c.batch_id == bindparam("h_batch_id"),
            shards.c.idx == bindparam("h_idx"),
            shards.c.lease_epoch == bindparam("h_epoch"),
            shards.c.committed == bindparam("h_first"),
        )
        .values(**values)
    )


_COMMITS = {done: _commit_statement(done) for done in (False, True)}
_INSERT_SEGMENT = insert(segments)


async def commit_segment(
    db: Database,
    claim: ShardClaim,
    segment: Segment,
    *,
    done: bool,
    usage: list[UsageDelta] | None = None,
    now: float | None = None,
) -> bool:
    """Record a segment if this worker still holds the shard and it extends the committed prefix.

    Its usage goes into the project's daily ledger in the same transaction, so counts, cost and
    ledger can never disagree with the files, whatever crashes."""
    params: dict[str, Any] = {
        "h_batch_id": claim.batch_id,
        "h_idx": claim.idx,
        "h_epoch": claim.epoch,
        "h_first": segment.first,
        "new_committed": segment.first + segment.lines,
    }
    for name in COUNT_COLUMNS:
        params[f"d_{name}"] = getattr(segment.counts, name)
    async with db.write() as conn:
        result = await conn.execute(_COMMITS[done], params)
        if result.rowcount != 1:
            return False
        await add_usage(conn, claim.project, day_of(now or time.time()), usage or [])
        if segment.lines:
            await conn.execute(
                _INSERT_SEGMENT,
                {
                    "batch_id": claim.batch_id,
                    "shard_idx": claim.idx,
                    "first": segment.first,
                    "count": segment.lines,
                    "blob_key": segment.blob_key,
                },
            )
    return True


async def shards_of(db: Database, batch_id: str) -> list[ShardRow]:
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(shards).where(shards.c.batch_id == batch_id).order_by(shards.c.idx)
            )
        ).all()
    return [ShardRow.from_row(r) for r in rows]


async def segments_of(db: Database, batch_id: str, shard_idx: int) -> list[SegmentRow]:
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(segments)
                .where(segments.c.batch_id == batch_id, segments.c.shard_idx == shard_idx)
                .order_by(segments.c.first)
            )
        ).all()
    return [SegmentRow.from_row(r) for r in rows]


async def segments_by_shard(db: Database, batch_id: str) -> dict[int, list[SegmentRow]]:
    """Every segment of the batch, by shard, each shard's in order: one query, not one a shard."""
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(segments)
                .where(segments.c.batch_id == batch_id)
                .order_by(segments.c.shard_idx, segments.c.first)
            )
        ).all()
    out: dict[int, list[SegmentRow]] = {}
    for r in rows:
        segment = SegmentRow.from_row(r)
        out.setdefault(segment.shard_idx, []).append(segment)
    return out


async def batch_counts(db: Database, batch_id: str) -> Counts:
    """What every committed segment and chunk of the batch adds up to."""
    async with db.read() as conn:
        total = Counts()
        for table in (shards, upstream_chunks):
            row = (
                await conn.execute(select(*count_sums(table)).where(table.c.batch_id == batch_id))
            ).one()
            total = total + Counts.of(row)
    return total


async def publish_batch(
    db: Database,
    batch_id: str,
    epoch: int,
    values: dict[str, Any],
    file_rows: list[FileRow],
) -> bool:
    """Publish output files and the terminal status together, if the finalize lease still holds."""
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
        if values.get("status") in TERMINAL:  # its webhook event, in the same transaction
            await record_event(conn, batch_id, values["status"], int(time.time()))
    return True
