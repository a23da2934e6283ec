"""The webhooks outbox: batch events, their deliveries (one per target URL) and every attempt.

An event is written in the same transaction as the terminal status it announces
(`record_event`), so a batch never ends without its event and no event announces an end that
was rolled back. The store knows nothing of the configuration: a worker reads the events not yet
fanned out, decides the targets, and `fan_out` records their deliveries and marks the event in
one transaction. Each attempt at a delivery is claimed under a fenced lease (as shards are), so
two workers never send the same attempt, and only the claim's holder records its outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import Float, and_, bindparam, exists, insert, literal, or_, select, update

from lowtide.ids import new_event_id
from lowtide.store.database import Database, StoreConnection, storable
from lowtide.store.rows import _Record
from lowtide.store.schema import batches, webhook_attempts, webhook_deliveries, webhook_events

BATCH_TARGET = "batch"  # a delivery to the batch's own webhook_url ([batch_webhooks] secret)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(slots=True, kw_only=True)
class EventRow(_Record):
    id: str
    batch_id: str
    project: str
    type: str
    created_at: int
    fanned_out: int = 0


@dataclass(slots=True, kw_only=True)
class DeliveryRow(_Record):
    id: str
    event_id: str
    batch_id: str
    url: str
    target: str  # a [[webhooks]] index ("0", "1", ...) or BATCH_TARGET
    status: DeliveryStatus
    retry_from: int
    next_attempt_at: float
    created_at: int
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: int | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    lease_epoch: int = 0

    def __post_init__(self) -> None:
        self.status = DeliveryStatus(self.status)


@dataclass(slots=True, kw_only=True)
class AttemptRow(_Record):
    delivery_id: str
    at: float
    status_code: int | None
    error: str | None
    duration_ms: int
    seq: int | None = None


@dataclass(slots=True)
class PendingEvent:
    """An event not yet fanned out, with what targets depend on: its batch's own URL."""

    event: EventRow
    webhook_url: str | None


@dataclass(slots=True)
class DeliveryClaim:
    """One attempt at a delivery, held under `epoch`, with the event it carries."""

    delivery: DeliveryRow
    event: EventRow
    epoch: int


@dataclass(slots=True)
class DeliveryView:
    delivery: DeliveryRow
    event_type: str
    attempts: list[AttemptRow] = field(default_factory=list)


# -- events ------------------------------------------------------------------------------


async def record_event(conn: StoreConnection, batch_id: str, status: str, now: int) -> None:
    """Announce that the batch reached terminal `status`: call inside the transaction that
    writes the status."""
    event = select(
        literal(new_event_id()),
        batches.c.id,
        batches.c.project,
        literal(f"batch.{status}"),
        literal(now),
        literal(0),
    ).where(batches.c.id == batch_id)
    columns = ("id", "batch_id", "project", "type", "created_at", "fanned_out")
    await conn.execute(insert(webhook_events).from_select(columns, event))


async def events_to_fan_out(db: Database, limit: int = 100) -> list[PendingEvent]:
    query = (
        select(webhook_events, batches.c.webhook_url)
        .join(batches, batches.c.id == webhook_events.c.batch_id, isouter=True)
        .where(webhook_events.c.fanned_out == 0)
        .order_by(webhook_events.c.created_at)
        .limit(limit)
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    out = []
    for row in rows:
        values = dict(row._mapping)
        url = values.pop("webhook_url")
        out.append(PendingEvent(EventRow(**values), url))
    return out


async def fan_out(db: Database, event_id: str, deliveries: list[DeliveryRow]) -> bool:
    """Record the event's deliveries, once: False if another worker fanned it out first."""
    async with db.write() as conn:
        result = await conn.execute(
            update(webhook_events)
            .where(webhook_events.c.id == event_id, webhook_events.c.fanned_out == 0)
            .values(fanned_out=1)
        )
        if result.rowcount != 1:
            return False
        if deliveries:
            await conn.execute(insert(webhook_deliveries), [d.values() for d in deliveries])
    return True


# -- delivery attempts -------------------------------------------------------------------


def _claimable(now: float):  # type: ignore[no-untyped-def]
    return and_(
        webhook_deliveries.c.status == DeliveryStatus.PENDING,
        webhook_deliveries.c.next_attempt_at <= now,
        or_(
            webhook_deliveries.c.lease_expires_at.is_(None),
            webhook_deliveries.c.lease_expires_at < now,
        ),
    )


# Is there anything to do at all? One look for both kinds of work, every tick: on a busy
# worker the answer is almost always no, and then nothing else is asked.
_WORK_DUE = select(
    exists().where(webhook_events.c.fanned_out == 0).label("events"),
    exists().where(_claimable(bindparam("now", type_=Float))).label("deliveries"),
)


async def work_due(db: Database, now: float) -> tuple[bool, bool]:
    """(events not fanned out yet, deliveries due now)."""
    async with db.read() as conn:
        row = (await conn.execute(_WORK_DUE, {"now": now})).one()
    return bool(row.events), bool(row.deliveries)


async def claim_deliveries(
    db: Database, worker: str, now: float, lease: float, limit: int
) -> list[DeliveryClaim]:
    """Claim up to `limit` deliveries due now, oldest first, each for one attempt."""
    if limit <= 0:
        return []
    query = (
        select(webhook_deliveries)
        .where(_claimable(now))
        .order_by(webhook_deliveries.c.next_attempt_at)
        .limit(limit)
    )
    # Look first without the write lock: on an idle server there is nothing, every tick.
    async with db.read() as conn:
        if not (await conn.execute(query.with_only_columns(webhook_deliveries.c.id))).first():
            return []
    claims: list[DeliveryClaim] = []
    async with db.write() as conn:
        candidates = [DeliveryRow.from_row(r) for r in (await conn.execute(query)).all()]
        if candidates and not db.is_sqlite:
            lock = (
                select(webhook_deliveries.c.id)
                .where(webhook_deliveries.c.id.in_([c.id for c in candidates]))
                .with_for_update(skip_locked=True)
            )
            free = set((await conn.execute(lock)).scalars())
            candidates = [c for c in candidates if c.id in free]
        for row in candidates:
            epoch = row.lease_epoch + 1
            result = await conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.id == row.id,
                    webhook_deliveries.c.lease_epoch == row.lease_epoch,
                    _claimable(now),
                )
                .values(lease_owner=worker, lease_expires_at=now + lease, lease_epoch=epoch)
            )
            if result.rowcount != 1:
                continue
            row.lease_owner, row.lease_expires_at, row.lease_epoch = worker, now + lease, epoch
            event = (
                await conn.execute(
                    select(webhook_events).where(webhook_events.c.id == row.event_id)
                )
            ).one()
            claims.append(DeliveryClaim(row, EventRow.from_row(event), epoch))
    return claims


def _held(claim: DeliveryClaim):  # type: ignore[no-untyped-def]
    return and_(
        webhook_deliveries.c.id == claim.delivery.id,
        webhook_deliveries.c.lease_epoch == claim.epoch,
    )


async def record_attempt(
    db: Database,
    claim: DeliveryClaim,
    attempt: AttemptRow | None,
    *,
    status: DeliveryStatus,
    next_attempt_at: float,
    delivered_at: int | None = None,
    last_error: str | None = None,
) -> bool:
    """The outcome of the claimed attempt (None: none was made), if the claim still holds."""
    values: dict[str, Any] = {
        "status": status,
        "next_attempt_at": next_attempt_at,
        "lease_owner": None,
        "lease_expires_at": None,
        "last_error": attempt.error if attempt is not None else last_error,
    }
    if attempt is not None:
        values.update(attempts=webhook_deliveries.c.attempts + 1, last_status=attempt.status_code)
    if delivered_at is not None:
        values["delivered_at"] = delivered_at
    async with db.write() as conn:
        result = await conn.execute(update(webhook_deliveries).where(_held(claim)).values(values))
        if result.rowcount != 1:
            return False
        if attempt is not None:
            await conn.execute(insert(webhook_attempts).values(**attempt.values()))
    return True


async def release_delivery(db: Database, claim: DeliveryClaim) -> None:
    """Hand an unattempted claim back (a stopping worker): due again at once."""
    async with db.write() as conn:
        await conn.execute(
            update(webhook_deliveries)
            .where(_held(claim))
            .values(lease_owner=None, lease_expires_at=None)
        )


# -- what the API shows ------------------------------------------------------------------


async def deliveries_of(db: Database, batch_id: str) -> list[DeliveryView]:
    """Every delivery of the batch's events, oldest first, each with its attempts."""
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(webhook_deliveries, webhook_events.c.type)
                .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
                .where(webhook_deliveries.c.batch_id == batch_id)
                .order_by(webhook_deliveries.c.created_at, webhook_deliveries.c.id)
            )
        ).all()
        views = []
        for row in rows:
            values = dict(row._mapping)
            event_type = values.pop("type")
            views.append(DeliveryView(DeliveryRow(**values), event_type))
        if views:
            attempts = (
                await conn.execute(
                    select(webhook_attempts)
                    .where(webhook_attempts.c.delivery_id.in_([v.delivery.id for v in views]))
                    .order_by(webhook_attempts.c.seq)
                )
            ).all()
            by_id = {v.delivery.id: v for v in views}
            for a in attempts:
                by_id[a.delivery_id].attempts.append(AttemptRow.from_row(a))
    return views


async def resend(db: Database, batch_id: str, delivery_id: str, now: int) -> DeliveryRow | None:
    """Make the delivery pending again, due now, with a fresh retry window; None if there is no
    such delivery. A delivery being attempted right now is left alone (its lease is held)."""
    if not storable(delivery_id):
        return None
    this = and_(webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.batch_id == batch_id)
    async with db.write() as conn:
        await conn.execute(
            update(webhook_deliveries)
            .where(
                this,
                or_(
                    webhook_deliveries.c.lease_owner.is_(None),
                    webhook_deliveries.c.lease_expires_at < now,
                ),
            )
            .values(
                status=DeliveryStatus.PENDING,
                next_attempt_at=now,
                retry_from=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        row = (await conn.execute(select(webhook_deliveries).where(this))).first()
    return DeliveryRow.from_row(row) if row else None
