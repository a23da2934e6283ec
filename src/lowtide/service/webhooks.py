"""Webhook deliveries of a batch (an extension): list them with their attempts, resend one."""

from __future__ import annotations

import time

from lowtide.errors import ApiError
from lowtide.service.batches import batch_not_found
from lowtide.service.deps import UseCases
from lowtide.store import batches as batch_store
from lowtide.store import webhooks as outbox
from lowtide.store.webhooks import BATCH_TARGET, AttemptRow, DeliveryRow, DeliveryView

__all__ = ["BATCH_TARGET", "AttemptRow", "DeliveryRow", "DeliveryView", "WebhookService"]


class WebhookService(UseCases):
    async def deliveries(self, project: str, batch_id: str) -> list[DeliveryView]:
        """Every delivery of the batch's events (oldest first), with every attempt."""
        await self._batch(project, batch_id)
        return await outbox.deliveries_of(self._db, batch_id)

    async def resend(self, project: str, batch_id: str, delivery_id: str) -> DeliveryView:
        """Send the delivery again now (same webhook-id), retrying as a new event would."""
        await self._batch(project, batch_id)
        now = int(time.time())
        row = await outbox.resend(self._db, batch_id, delivery_id, now)
        if row is None:
            raise ApiError(
                404,
                f"No webhook delivery '{delivery_id}' for batch '{batch_id}'.",
                param="delivery_id",
            )
        if row.lease_owner is not None and (row.lease_expires_at or 0) >= now:
            raise ApiError(
                409,
                f"Webhook delivery '{delivery_id}' is being attempted right now; resend it once "
                "this attempt has finished.",
            )
        self._wake()
        for view in await outbox.deliveries_of(self._db, batch_id):
            if view.delivery.id == delivery_id:
                return view
        raise AssertionError("a delivery vanished")  # deliveries are never deleted

    async def _batch(self, project: str, batch_id: str) -> None:
        if await batch_store.get_batch(self._db, project, batch_id) is None:
            raise batch_not_found(batch_id)
