"""Shard claims interleave batches, so a small batch never waits for a big one to be claimed."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import update

from lowtide.store import batches as batch_store
from lowtide.store import leases
from lowtide.store.database import Database, sqlite_url
from lowtide.store.rows import BatchRow, ShardRow
from lowtide.store.schema import shards
from lowtide.vocabulary import BatchStatus, ShardStatus


async def _batch_in_progress(db: Database, name: str, shard_count: int, **fields: str) -> None:
    now = int(time.time())
    row = BatchRow(
        id=name,
        project="p",
        endpoint="/v1/chat/completions",
        input_file_id="f",
        completion_window="24h",
        status=BatchStatus.VALIDATING,
        created_at=now,
        expires_at=now + 86400,
        **fields,
    )
    await batch_store.insert_batch(db, row)
    shard_rows = [
        ShardRow(
            batch_id=name,
            idx=i,
            first_request=i,
            request_count=1,
            first_line=i + 1,
            byte_start=i,
            byte_end=i + 1,
        )
        for i in range(shard_count)
    ]
    task = await leases.claim_batch_task(db, "w", time.time(), 30)
    assert task is not None and task.batch.id == name
    assert await batch_store.finish_validation(
        db,
        name,
        task.epoch,
        now,
        shard_rows=shard_rows,
        total=shard_count,
        model="m",
        errors=None,
    )


def test_claims_take_one_shard_of_every_batch_first(tmp_path):
    async def scenario() -> list[str]:
        db = Database(sqlite_url(tmp_path))
        await asyncio.to_thread(db.upgrade)
        for name, shard_count in (("big", 50), ("small1", 1), ("small2", 2)):
            await _batch_in_progress(db, name, shard_count)
        claims = await leases.claim_shards(db, "w", time.time(), 30, limit=4)
        # A second worker cannot claim the same shards while the leases hold.
        again = await leases.claim_shards(db, "w2", time.time(), 30, limit=100)
        assert not {(c.batch_id, c.idx) for c in claims} & {(c.batch_id, c.idx) for c in again}
        assert len(claims) + len(again) == 53
        await db.close()
        return [f"{c.batch_id}/{c.idx}" for c in claims]

    assert asyncio.run(scenario()) == ["big/0", "small1/0", "small2/0", "big/1"]


def test_claims_take_a_batchs_first_claimable_shards_whatever_came_before(tmp_path):
    """A batch's claimable shards are its first pending ones and any running under a lease that
    ran out, in file order, past shards that are done, running under a live lease or backing
    off; a high-priority batch comes first; a batch with a live shard is not idle."""

    async def scenario() -> tuple[list[str], list[str]]:
        db = Database(sqlite_url(tmp_path))
        await asyncio.to_thread(db.upgrade)
        await _batch_in_progress(db, "late", 40)
        await _batch_in_progress(db, "urgent", 2, priority="high")
        now = time.time()
        states = {  # the rest of "late" stays pending
            **{i: (ShardStatus.DONE, None) for i in range(30)},
            30: (ShardStatus.RUNNING, now + 60),  # a live lease: someone runs it
            31: (ShardStatus.PENDING, now + 60),  # backing off
            32: (ShardStatus.RUNNING, now - 1),  # its worker died
        }
        async with db.write() as conn:
            for idx, (status, until) in states.items():
                await conn.execute(
                    update(shards)
                    .where(shards.c.batch_id == "late", shards.c.idx == idx)
                    .values(status=status, lease_expires_at=until)
                )
        idle = await leases.claim_shards(db, "w", now, 30, 4, idle_batches_only=True)
        claims = await leases.claim_shards(db, "w", now, 30, 4)
        await db.close()
        return [f"{c.batch_id}/{c.idx}" for c in idle], [f"{c.batch_id}/{c.idx}" for c in claims]

    idle, claims = asyncio.run(scenario())
    assert idle == ["urgent/0"]  # "late" has a shard running under a live lease
    assert claims == ["urgent/1", "late/32", "late/33", "late/34"]  # first shards first
