"""Batch rows as the API sees them: create, read, list, cancel, and live progress."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from lowtide.store.database import Database
from lowtide.store.schema import batches, shards

TERMINAL = ("completed", "failed", "expired", "cancelled")
PRIORITIES = {"high": 4.0, "normal": 1.0, "low": 0.25}  # weights in the fair share
_PROGRESS_COLUMNS = (
    "completed",
    "failed",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
)


def new_batch_row(
    *,
    batch_id: str,
    project: str,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    window_seconds: int,
    now: int,
    metadata_json: str | None = None,
    output_expires_seconds: int | None = None,
    priority: str = "normal",
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """A freshly created batch, waiting for a worker to validate it."""
    zeros = dict.fromkeys(("total", *_PROGRESS_COLUMNS, "lease_epoch"), 0)
    return {
        "id": batch_id,
        "project": project,
        "endpoint": endpoint,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": "validating",
        "created_at": now,
        "expires_at": now + window_seconds,
        "metadata": metadata_json,
        "output_expires_seconds": output_expires_seconds,
        "priority": priority,
        "idempotency_key": idempotency_key,
        **zeros,
    }


async def insert_batch(db: Database, row: dict[str, Any]) -> dict[str, Any] | None:
    """Insert the row; if its idempotency key is already taken, return that batch instead."""
    key = row.get("idempotency_key")
    same_key = select(batches).where(
        batches.c.project == row["project"], batches.c.idempotency_key == key
    )
    try:
        async with db.write() as conn:
            if key is not None and (existing := (await conn.execute(same_key)).first()):
                return dict(existing._mapping)
            await conn.execute(insert(batches).values(**row))
    except IntegrityError:
        if key is None:
            raise
        # Two creates with one key raced (PostgreSQL): the unique index let one through.
        async with db.read() as conn:
            existing = (await conn.execute(same_key)).first()
        if existing is None:
            raise
        return dict(existing._mapping)
    return None


async def get_batch(db: Database, project: str, batch_id: str) -> dict[str, Any] | None:
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(batches).where(batches.c.id == batch_id, batches.c.project == project)
            )
        ).first()
    return dict(row._mapping) if row else None


async def list_batches(
    db: Database, project: str, *, limit: int, after: str | None
) -> tuple[list[dict[str, Any]], bool]:
    query = select(batches).where(batches.c.project == project)
    async with db.read() as conn:
        if after:
            cursor = (
                await conn.execute(
                    select(batches.c.seq).where(batches.c.id == after, batches.c.project == project)
                )
            ).scalar()
            if cursor is None:  # unknown cursor: an empty last page, never a restart
                return [], False
            if cursor is not None:
                query = query.where(batches.c.seq < cursor)
        rows = (await conn.execute(query.order_by(batches.c.seq.desc()).limit(limit + 1))).all()
    return [dict(r._mapping) for r in rows[:limit]], len(rows) > limit


async def live_progress(db: Database, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Counts and usage committed so far, summed over each running batch's shards."""
    if not batch_ids:
        return {}
    columns = [func.coalesce(func.sum(shards.c[name]), 0).label(name) for name in _PROGRESS_COLUMNS]
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(shards.c.batch_id, *columns)
                .where(shards.c.batch_id.in_(batch_ids))
                .group_by(shards.c.batch_id)
            )
        ).all()
    return {r.batch_id: {name: int(getattr(r, name)) for name in _PROGRESS_COLUMNS} for r in rows}


async def request_cancel(
    db: Database, project: str, batch_id: str, now: int
) -> dict[str, Any] | None:
    """Move a running batch to cancelling; returns the row as it is afterwards."""
    async with db.write() as conn:
        await conn.execute(
            update(batches)
            .where(
                batches.c.id == batch_id,
                batches.c.project == project,
                batches.c.status.in_(("validating", "in_progress")),
                batches.c.stop_reason.is_(None),  # an expired batch stays expired
            )
            .values(status="cancelling", cancelling_at=now, stop_reason="cancelled")
        )
        row = (
            await conn.execute(
                select(batches).where(batches.c.id == batch_id, batches.c.project == project)
            )
        ).first()
    return dict(row._mapping) if row else None
