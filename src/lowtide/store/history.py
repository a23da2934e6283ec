"""What earlier and running batches say about the next one: output lengths, speeds, queues.

Read by estimates (service/estimate.py), across every project: a model's output length and an
engine's speed do not depend on who asked, and the queue ahead of a batch is everyone's.
"""

from __future__ import annotations

from sqlalchemy import func, select

from lowtide.store.database import Database
from lowtide.store.schema import batches, shards, usage_daily
from lowtide.vocabulary import BatchStatus

RECENT_BATCHES = 200  # completed batches a speed is averaged over, newest first


async def output_per_request(
    db: Database, endpoint: str, models: list[str], since_day: int
) -> dict[str, float]:
    """Average output tokens of an answered request, by model, from the usage ledger."""
    if not models:
        return {}
    query = (
        select(
            usage_daily.c.model,
            func.sum(usage_daily.c.requests).label("requests"),
            func.sum(usage_daily.c.output_tokens).label("output_tokens"),
        )
        .where(
            usage_daily.c.endpoint == endpoint,
            usage_daily.c.model.in_(models),
            usage_daily.c.day >= since_day,
        )
        .group_by(usage_daily.c.model)
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    return {r.model: int(r.output_tokens or 0) / r.requests for r in rows if r.requests}


async def observed_speeds(
    db: Database, models: list[str], since: int, min_lines: int = 1
) -> dict[str, tuple[int, float]]:
    """(lines, seconds running) of recently completed single-model batches of at least
    `min_lines` lines, by model."""
    if not models:
        return {}
    query = (
        select(batches.c.model, batches.c.total, batches.c.in_progress_at, batches.c.completed_at)
        .where(
            batches.c.status == BatchStatus.COMPLETED,
            batches.c.model.in_(models),
            batches.c.completed_at >= since,
            batches.c.in_progress_at.is_not(None),
            batches.c.total >= max(min_lines, 1),
        )
        .order_by(batches.c.completed_at.desc())
        .limit(RECENT_BATCHES)
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    speeds: dict[str, tuple[int, float]] = {}
    for r in rows:
        lines, seconds = speeds.get(r.model, (0, 0.0))
        # Stamps are whole seconds: a batch that took "0 s" took up to one.
        speeds[r.model] = (lines + r.total, seconds + max(r.completed_at - r.in_progress_at, 1))
    return speeds


async def queued_lines(db: Database) -> list[tuple[str, list[str], int]]:
    """(batch id, its models, lines not committed yet) of every running batch."""
    done = func.coalesce(func.sum(shards.c.completed + shards.c.failed), 0)
    query = (
        select(batches.c.id, batches.c.model, batches.c.total, done.label("done"))
        .select_from(batches.outerjoin(shards, shards.c.batch_id == batches.c.id))
        .where(batches.c.status == BatchStatus.IN_PROGRESS, batches.c.model.is_not(None))
        .group_by(batches.c.id, batches.c.model, batches.c.total)
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    return [(r.id, r.model.split(","), max(int(r.total) - int(r.done), 0)) for r in rows]
