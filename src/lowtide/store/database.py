"""Connections to the metadata store, with the transaction discipline each backend needs.

SQLite allows one writer at a time. Write transactions begin IMMEDIATE (take the write lock
up front, so two writers never deadlock on a lock upgrade) and go through a one-connection
pool, so writers in this process queue in Python instead of spinning on SQLITE_BUSY.
PostgreSQL needs none of this and uses one ordinary pool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


def storable(*values: str | None) -> bool:
    """Whether strings can be compared in SQL at all: PostgreSQL text cannot hold NUL, so an id,
    cursor or filter with one matches nothing, on every backend alike."""
    return not any(v is not None and "\x00" in v for v in values)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'lowtide.db').resolve()}"


def _async_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if parsed.get_backend_name() == "postgresql":
        return str(parsed.set(drivername="postgresql+psycopg"))
    raise ValueError(f"unsupported database url {url!r}: use sqlite:/// or postgresql://")


def _sync_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return str(parsed.set(drivername="postgresql+psycopg"))
    return str(parsed.set(drivername="sqlite"))


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if self.is_sqlite:
            self._writer = self._sqlite_engine(url, begin="BEGIN IMMEDIATE", pool_size=1)
            self._reader = self._sqlite_engine(url, begin="BEGIN", pool_size=4)
        else:
            engine = create_async_engine(_async_url(url), pool_size=10, max_overflow=10)
            self._writer = self._reader = engine

    @staticmethod
    def _sqlite_engine(url: str, *, begin: str, pool_size: int) -> AsyncEngine:
        engine = create_async_engine(
            _async_url(url), pool_size=pool_size, max_overflow=0, pool_timeout=120
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql(begin)

        return engine

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (safe to run on every start)."""
        # Alembic narrates every start, from its import on (plugin setup, "will assume
        # transactional DDL"): keep its warnings and errors only.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from lowtide.store.migrate import upgrade

        upgrade(_sync_url(self.url))

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self._writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.begin() as conn:
            yield conn

    async def close(self) -> None:
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()
