"""Connections to the metadata store, with the transaction discipline each backend needs.

SQLite is a file on this machine: its statements run on the event loop, through the standard
sqlite3 module, where each takes microseconds. (Through a thread per connection, as aiosqlite
does, every statement, BEGIN and COMMIT is a hand-off between two threads: a transaction cost
~0.8 ms of CPU, most of a worker's cost per shard.) What can wait never blocks the loop:
SQLite allows one writer at a time, so write transactions queue on an asyncio lock in this
process, then begin IMMEDIATE (take the write lock up front, so two writers never deadlock on
a lock upgrade) without a busy timeout, sleeping between tries while another process writes.
In WAL mode readers never wait for a writer. PostgreSQL is a network server and keeps its
async driver and one ordinary pool.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine


def storable(*values: str | None) -> bool:
    """Whether strings can be compared in SQL at all: PostgreSQL text cannot hold NUL, so an id,
    cursor or filter with one matches nothing, on every backend alike."""
    return not any(v is not None and "\x00" in v for v in values)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'lowtide.db').resolve()}"


def _async_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return str(parsed.set(drivername="postgresql+psycopg"))
    raise ValueError(f"unsupported database url {url!r}: use sqlite:/// or postgresql://")


def _sync_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return str(parsed.set(drivername="postgresql+psycopg"))
    return str(parsed.set(drivername="sqlite"))


_BUSY_SECONDS = 60.0  # how long a writer waits for another process's write lock
_READERS = 4  # SQLite connections a process reads through at once
_BUFFERED = {"prebuffer_rows": True}  # rows read before execute returns, as AsyncConnection's


class LoopConnection:
    """A SQLite connection with the async face the store's queries are written against
    (`await conn.execute(...)`, `conn.dialect`): each statement runs at once on the loop, and
    its rows are read before it returns, as AsyncConnection.execute does."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @property
    def dialect(self) -> Any:
        return self._conn.dialect

    async def execute(
        self, statement: Any, parameters: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> CursorResult[Any]:
        return self._conn.execute(statement, parameters, execution_options=_BUFFERED)


# What a store query runs on: PostgreSQL's async connection, or SQLite's on the loop.
StoreConnection = AsyncConnection | LoopConnection


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if self.is_sqlite:
            self._sqlite_writer = self._sqlite_engine(url, connections=1, busy_ms=0)
            self._sqlite_reader = self._sqlite_engine(
                url, connections=_READERS, busy_ms=int(_BUSY_SECONDS * 1000)
            )
            # Writers in this process queue here, readers wait for a free connection here:
            # never in the pool, where a wait would block the loop.
            self._write_turn = asyncio.Lock()
            self._read_slots = asyncio.Semaphore(_READERS)
        else:
            self._async = create_async_engine(_async_url(url), pool_size=10, max_overflow=10)
            # Reads run each statement on its own (one round trip, not BEGIN, it, COMMIT): at
            # READ COMMITTED, PostgreSQL's level, statements of one transaction do not share a
            # snapshot either, so a read transaction guarantees nothing more.
            self._async_reads = self._async.execution_options(isolation_level="AUTOCOMMIT")

    @staticmethod
    def _sqlite_engine(url: str, *, connections: int, busy_ms: int) -> Engine:
        engine = create_engine(
            _sync_url(url),
            pool_size=connections,
            max_overflow=0,
            connect_args={"check_same_thread": False},  # a loop may run in any thread
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # BEGIN is ours (write(), read())
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()

        return engine

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (safe to run on every start)."""
        # Alembic narrates every start, from its import on (plugin setup, "will assume
        # transactional DDL"): keep its warnings and errors only.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from lowtide.store.migrate import upgrade

        upgrade(_sync_url(self.url))

    @asynccontextmanager
    async def write(self) -> AsyncIterator[StoreConnection]:
        if not self.is_sqlite:
            async with self._async.begin() as conn:
                yield conn
            return
        async with _sqlite_transaction(
            self._write_turn, self._sqlite_writer, _begin_immediate
        ) as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[StoreConnection]:
        if not self.is_sqlite:
            async with self._async_reads.connect() as conn:
                yield conn
            return
        async with _sqlite_transaction(self._read_slots, self._sqlite_reader, _begin) as conn:
            yield conn

    async def close(self) -> None:
        if self.is_sqlite:
            self._sqlite_writer.dispose()
            self._sqlite_reader.dispose()
        else:
            await self._async.dispose()


async def _begin(raw: sqlite3.Connection) -> None:
    raw.execute("BEGIN")  # a reader in WAL mode never waits for the write lock


async def _begin_immediate(raw: sqlite3.Connection) -> None:
    """Take SQLite's write lock, sleeping (not blocking the loop) while another process holds
    it; after _BUSY_SECONDS, fail as a busy timeout would."""
    delay, deadline = 0.001, time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            raw.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


@asynccontextmanager
async def _sqlite_transaction(
    turn: asyncio.Lock | asyncio.Semaphore,
    engine: Engine,
    begin: Callable[[sqlite3.Connection], Awaitable[None]],
) -> AsyncIterator[LoopConnection]:
    """A transaction on one of `engine`'s connections, taken once `turn` lets this task in (so
    the pool never has to wait, which would block the loop): begun by `begin`, committed when
    the block ends, rolled back when it raises (or is cancelled)."""
    async with turn:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, sqlite3.Connection)
            await begin(raw)
            try:
                yield LoopConnection(conn)
            except BaseException:
                if conn.in_transaction():
                    conn.rollback()
                raw.rollback()
                raise
            if conn.in_transaction():
                conn.commit()  # SQLAlchemy's transaction began with the first statement
            raw.commit()  # a no-op when that commit ended ours
