"""SQLite's transactions on the event loop: a writer waits for another process's write lock
without blocking the loop, a failed block rolls back, and readers see only committed rows."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from sqlalchemy import text

from lowtide.store.database import Database, sqlite_url


async def _fresh(tmp_path) -> Database:
    db = Database(sqlite_url(tmp_path))
    await asyncio.to_thread(db.upgrade)
    async with db.write() as conn:
        await conn.execute(text("CREATE TABLE t (v INTEGER)"))
    return db


def test_a_writer_waits_for_another_process_lock_without_blocking_the_loop(tmp_path):
    async def scenario() -> None:
        db = await _fresh(tmp_path)
        # Another process's writer, as far as SQLite can tell: its own connection to the file.
        other = sqlite3.connect(tmp_path / "lowtide.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t VALUES (1)")

        async def write() -> float:
            async with db.write() as conn:
                await conn.execute(text("INSERT INTO t VALUES (2)"))
            return time.monotonic()

        writer = asyncio.create_task(write())
        ticks = 0
        for _ in range(20):  # the loop keeps running while the writer waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not writer.done()
        async with db.read() as conn:  # WAL: a reader does not wait for the writer
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 0
        released = time.monotonic()
        other.execute("COMMIT")
        done = await asyncio.wait_for(writer, 5)
        assert ticks == 20 and done >= released
        async with db.read() as conn:
            rows = (await conn.execute(text("SELECT v FROM t ORDER BY v"))).all()
        assert [r.v for r in rows] == [1, 2]
        other.close()
        await db.close()

    asyncio.run(scenario())


def test_a_failed_or_cancelled_write_rolls_back_and_the_next_one_runs(tmp_path):
    async def scenario() -> None:
        db = await _fresh(tmp_path)
        try:
            async with db.write() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                raise ValueError("the caller's own failure")
        except ValueError:
            pass

        started = asyncio.Event()

        async def cancelled() -> None:
            async with db.write() as conn:
                await conn.execute(text("INSERT INTO t VALUES (2)"))
                started.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(cancelled())
        await started.wait()
        # Another writer of this process queues behind the one that holds the connection.
        queued = asyncio.create_task(_insert(db, 3))
        await asyncio.sleep(0.05)
        assert not queued.done()
        task.cancel()
        await asyncio.wait_for(queued, 5)
        async with db.read() as conn:
            rows = (await conn.execute(text("SELECT v FROM t"))).all()
        assert [r.v for r in rows] == [3]
        await db.close()

    asyncio.run(scenario())


async def _insert(db: Database, value: int) -> None:
    async with db.write() as conn:
        await conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": value})
