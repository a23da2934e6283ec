"""Shard claims interleave batches, so a small batch never waits for a big one to be claimed."""

from __future__ import annotations

import asyncio
import time

from lowtide.store import batches as batch_store
from lowtide.store import leases
from lowtide.store.database import Database, sqlite_url
from lowtide.store.rows import BatchRow, ShardRow
from lowtide.vocabulary import BatchStatus


def test_claims_take_one_shard_of_every_batch_first(tmp_path):
    async def scenario() -> list[str]:
        db = Database(sqlite_url(tmp_path))
        await asyncio.to_thread(db.upgrade)
        now = int(time.time())
        for name, shard_count in (("big", 50), ("small1", 1), ("small2", 2)):
            row = BatchRow(
                id=name,
                project="p",
                endpoint="/v1/chat/completions",
                input_file_id="f",
                completion_window="24h",
                status=BatchStatus.VALIDATING,
                created_at=now,
                expires_at=now + 86400,
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
        claims = await leases.claim_shards(db, "w", time.time(), 30, limit=4)
        # A second worker cannot claim the same shards while the leases hold.
        again = await leases.claim_shards(db, "w2", time.time(), 30, limit=100)
        assert not {(c.batch_id, c.idx) for c in claims} & {(c.batch_id, c.idx) for c in again}
        assert len(claims) + len(again) == 53
        await db.close()
        return [f"{c.batch_id}/{c.idx}" for c in claims]

    assert asyncio.run(scenario()) == ["big/0", "small1/0", "small2/0", "big/1"]
