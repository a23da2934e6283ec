"""The daily usage ledger: written with every segment commit, read by the organization usage
and costs endpoints and by the daily budgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from lowtide.store.database import Database, StoreConnection
from lowtide.store.schema import usage_daily

DAY = 86400
_SUMS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "cost", "sync_cost")


@dataclass(slots=True, kw_only=True)
class UsageSums:
    """What the ledger adds up: requests, tokens and money."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0
    sync_cost: float = 0.0

    def add(self, row: dict[str, Any]) -> None:
        for name in _SUMS:
            setattr(self, name, getattr(self, name) + row[name])


@dataclass(slots=True, kw_only=True)
class UsageDelta(UsageSums):
    """What the lines of one model and endpoint in a segment used and cost."""

    model: str
    endpoint: str


def day_of(unix_time: float) -> int:
    return int(unix_time) // DAY * DAY


async def add_usage(
    conn: StoreConnection, project: str, day: int, deltas: list[UsageDelta]
) -> None:
    """Add to the ledger inside the caller's transaction (the segment commit)."""
    if not deltas:
        return
    rows = [
        {
            "project": project,
            "day": day,
            "model": d.model[:255],
            "endpoint": d.endpoint,
            **{name: getattr(d, name) for name in _SUMS},
        }
        for d in deltas
    ]
    await conn.execute(_upsert(conn.dialect.name), rows)


_UPSERTS: dict[str, Any] = {}


def _upsert(dialect: str) -> Any:
    """The ledger's upsert, built once per dialect (it runs with every segment commit)."""
    statement = _UPSERTS.get(dialect)
    if statement is None:
        insert = sqlite_insert if dialect == "sqlite" else pg_insert
        statement = insert(usage_daily)
        statement = _UPSERTS[dialect] = statement.on_conflict_do_update(
            index_elements=["project", "day", "model", "endpoint"],
            set_={name: usage_daily.c[name] + statement.excluded[name] for name in _SUMS},
        )
    return statement


async def usage_rows(
    db: Database,
    *,
    project: str | None,
    start_day: int,
    end_day: int,
    endpoints: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Ledger rows of [start_day, end_day) for one project (None: every project)."""
    query = select(usage_daily).where(usage_daily.c.day >= start_day, usage_daily.c.day < end_day)
    if project is not None:
        query = query.where(usage_daily.c.project == project)
    if endpoints is not None:
        query = query.where(usage_daily.c.endpoint.in_(endpoints))
    async with db.read() as conn:
        return [dict(r._mapping) for r in (await conn.execute(query)).all()]


async def cost_on(db: Database, project: str, day: int) -> float:
    """What the project's batches cost on one UTC day so far."""
    async with db.read() as conn:
        total = (
            await conn.execute(
                select(func.coalesce(func.sum(usage_daily.c.cost), 0.0)).where(
                    usage_daily.c.project == project, usage_daily.c.day == day
                )
            )
        ).scalar()
    return float(total or 0.0)
