"""CPU per store call: what a transaction costs the process that makes it.

Every API request and every shard of a worker makes a few store calls; on SQLite their cost is
mostly how a statement reaches the database (since this round: sqlite3 on the event loop; until
then aiosqlite, which hands every statement, BEGIN and COMMIT to a thread and back). Calls are
interleaved by kind and repeated; medians of the per-call CPU (process time, every thread).

With --database-url, the same calls on a fresh PostgreSQL database (psycopg 3, async). With
--batch-shards N, the store holds one batch in progress with N shards (a batch of N x 1,000
lines at the server's default shard size) and the shard claim runs against it: leases of 0 s,
so every call claims the same first shards again.

    .venv/bin/python bench/store_calls.py [--calls 500] [--repeats 5] [--batch-shards 1000]
        [--database-url postgresql://postgres@127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from sqlalchemy import text
from workers import fresh_database

from lowtide.store import batches, chunks, leases, webhooks
from lowtide.store.database import Database, sqlite_url
from lowtide.store.rows import BatchRow, ShardRow
from lowtide.vocabulary import BatchStatus


async def add_batch_in_progress(db: Database, shard_count: int) -> None:
    """One batch in progress with `shard_count` pending shards of 1,000 lines."""
    now = int(time.time())
    row = BatchRow(
        id="batch_bench",
        project="p",
        endpoint="/v1/chat/completions",
        input_file_id="file_bench",
        completion_window="24h",
        status=BatchStatus.VALIDATING,
        created_at=now,
        expires_at=now + 86400,
    )
    await batches.insert_batch(db, row)
    task = await leases.claim_batch_task(db, "bench", time.time(), 30)
    assert task is not None
    shard_rows = [
        ShardRow(
            batch_id=row.id,
            idx=i,
            first_request=1000 * i,
            request_count=1000,
            first_line=1000 * i + 1,
            byte_start=500_000 * i,
            byte_end=500_000 * (i + 1),
        )
        for i in range(shard_count)
    ]
    assert await batches.finish_validation(
        db,
        row.id,
        task.epoch,
        now,
        shard_rows=shard_rows,
        total=1000 * shard_count,
        model="m",
        errors=None,
    )


async def main(args: argparse.Namespace) -> None:
    if args.database_url:
        url = fresh_database(args.database_url)
    else:
        url = sqlite_url(Path(tempfile.mkdtemp(prefix="lowtide-bench-store-")))
    db = Database(url)
    await asyncio.to_thread(db.upgrade)
    if args.batch_shards:
        await add_batch_in_progress(db, args.batch_shards)
    shards_label = f" ({args.batch_shards} shards)" if args.batch_shards else ""
    lease = 0 if args.batch_shards else 30  # 0: the next call finds the same shards claimable

    async def empty_write() -> None:
        async with db.write() as conn:
            await conn.execute(text("SELECT 1"))

    async def empty_read() -> None:
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "write transaction (SELECT 1)": empty_write,
        "read transaction (SELECT 1)": empty_read,
        "get a batch (an API retrieve)": lambda: batches.get_batch(db, "p", "batch_none"),
        f"claim shards{shards_label}": lambda: leases.claim_shards(db, "w", time.time(), lease, 4),
        "claim a batch task": lambda: leases.claim_batch_task(db, "w", time.time(), 30),
        "claim provider-batch chunks": lambda: chunks.claim_chunks(db, "w", time.time(), 30, 16),
        "look for expired batches": lambda: leases.mark_expired(db, time.time()),
        "look for webhook work": lambda: webhooks.work_due(db, time.time()),
    }
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            for _ in range(20):  # warm: statement caches, pool
                await call()
            cpu = time.process_time()
            for _ in range(args.calls):
                await call()
            runs[name].append((time.process_time() - cpu) / args.calls)
    await db.close()
    store = "PostgreSQL" if args.database_url else "SQLite"
    print(f"{store}, {args.calls} calls x {args.repeats} repeats; ms of CPU a call (median)")
    for name, cpus in runs.items():
        print(f"{name:>32} {1e3 * statistics.median(cpus):7.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--database-url", help="PostgreSQL server URL (no database name)")
    p.add_argument(
        "--batch-shards", type=int, default=0, help="a batch in progress with this many shards"
    )
    cli = p.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(cli))
