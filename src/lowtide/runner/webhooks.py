"""Webhook delivery: fan batch events out to their targets, then POST each one, signed.

Any worker does this, from its loop (`WebhookSender.tick`). Everything lives in the store's
outbox (store/webhooks.py), so a delivery survives restarts and SIGKILL: an attempt is claimed
under a fenced lease that outlasts the request's timeout, and only the claim's holder records
how it went. A 2xx answer delivers; anything else (another status, a timeout, a connection
error) is retried with exponential backoff and jitter until `webhook_retry_window_seconds`
after the event (72 hours), and then the delivery is `failed`. Redirects are not followed.

Signatures follow Standard Webhooks, as OpenAI sends them: `webhook-id` (the delivery's id, the
same on every attempt), `webhook-timestamp`, and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed with the base64-decoded secret; the official SDKs'
`client.webhooks.unwrap(body, headers, secret=...)` verifies them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time

import aiohttp
import orjson

from lowtide import failpoints
from lowtide.config import Config
from lowtide.ids import new_delivery_id
from lowtide.store import webhooks as outbox
from lowtide.store.database import Database
from lowtide.store.webhooks import (
    BATCH_TARGET,
    AttemptRow,
    DeliveryClaim,
    DeliveryRow,
    DeliveryStatus,
    EventRow,
)

log = logging.getLogger("lowtide.webhooks")

MAX_IN_FLIGHT = 16  # deliveries one process sends at once
_ERROR_TEXT = 300  # characters of a receiver's error body kept in last_error


def payload(event: EventRow) -> bytes:
    """The body every target gets for `event`, byte for byte the same on every attempt."""
    return orjson.dumps(
        {
            "object": "event",
            "id": event.id,
            "type": event.type,
            "created_at": event.created_at,
            "data": {"id": event.batch_id},
        }
    )


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' `webhook-signature` value for this message."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones: base, 2x, 4x ... up to
    cap, each scaled by a random 0.5-1 so that receivers coming back are not hit all at once."""
    return min(cap, base * 2 ** max(attempts - 1, 0)) * random.uniform(0.5, 1.0)


class WebhookSender:
    def __init__(self, db: Database, config: Config, worker_id: str) -> None:
        self.db = db
        self.config = config
        self.worker_id = worker_id
        self._sending: dict[asyncio.Task[None], DeliveryClaim] = {}
        self._session: aiohttp.ClientSession | None = None
        self._stopped = False

    async def tick(self, now: float) -> None:
        """Fan new events out and start the deliveries that are due; never raises."""
        try:
            events, due = await outbox.work_due(self.db, now)
            if events:
                await self._fan_out(now)
            if events or due:
                await self._claim(now)
        except Exception:
            log.exception("webhook delivery tick failed")

    async def stop(self, timeout: float = 0.0) -> None:
        """Claim nothing more; let attempts in flight finish for up to `timeout` seconds, then
        abandon the rest (their claims are handed back: due again at once, on any worker)."""
        self._stopped = True
        if self._sending:
            _, late = await asyncio.wait(set(self._sending), timeout=max(timeout, 0.0))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
            for task in late:
                try:
                    await outbox.release_delivery(self.db, self._sending.pop(task))
                except Exception:
                    log.warning("could not hand back a webhook delivery")
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- fan-out ---------------------------------------------------------------------------
    async def _fan_out(self, now: float) -> None:
        for pending in await outbox.events_to_fan_out(self.db):
            event = pending.event
            deliveries = [
                self._delivery(event, url, target, now)
                for url, target in self._targets(event, pending.webhook_url)
            ]
            for d in deliveries:
                # A per-batch URL was allowed at create; the allowlist may have shrunk since.
                problem = d.target == BATCH_TARGET and self.config.batch_webhooks.url_problem(d.url)
                if problem:
                    d.status, d.last_error = DeliveryStatus.FAILED, f"webhook_url {problem}"
            if await outbox.fan_out(self.db, event.id, deliveries) and deliveries:
                log.info("%s of %s: to %d target(s)", event.type, event.batch_id, len(deliveries))

    def _targets(self, event: EventRow, batch_url: str | None) -> list[tuple[str, str]]:
        targets = [
            (hook.url, str(i))
            for i, hook in enumerate(self.config.webhooks)
            if hook.wants(event.type, event.project)
        ]
        if batch_url:
            targets.append((batch_url, BATCH_TARGET))
        return targets

    @staticmethod
    def _delivery(event: EventRow, url: str, target: str, now: float) -> DeliveryRow:
        return DeliveryRow(
            id=new_delivery_id(),
            event_id=event.id,
            batch_id=event.batch_id,
            url=url,
            target=target,
            status=DeliveryStatus.PENDING,
            retry_from=event.created_at,
            next_attempt_at=now,
            created_at=int(now),
        )

    # -- attempts --------------------------------------------------------------------------
    async def _claim(self, now: float) -> None:
        cfg = self.config.worker
        # The lease outlasts the whole attempt, so nobody else can claim it while it is sent.
        lease = cfg.webhook_timeout_seconds + cfg.lease_seconds
        room = MAX_IN_FLIGHT - len(self._sending)
        for claim in await outbox.claim_deliveries(self.db, self.worker_id, now, lease, room):
            if self._stopped:  # stop() ran while this claim was being made
                await outbox.release_delivery(self.db, claim)
                continue
            task = asyncio.create_task(self._attempt(claim))
            self._sending[task] = claim
            task.add_done_callback(self._attempt_finished)

    def _attempt_finished(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():  # a cancelled one is handed back by stop()
            self._sending.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed", exc_info=task.exception())

    def _secret(self, delivery: DeliveryRow) -> str | None:
        """The secret of the delivery's target, if it is still configured (for the same URL)."""
        if delivery.target == BATCH_TARGET:
            return self.config.batch_webhooks.secret
        hooks = self.config.webhooks
        index = int(delivery.target) if delivery.target.isdigit() else -1
        if 0 <= index < len(hooks) and hooks[index].url == delivery.url:
            return hooks[index].secret
        # The configuration changed since the fan-out: the same URL elsewhere in the list.
        return next((h.secret for h in hooks if h.url == delivery.url), None)

    async def _attempt(self, claim: DeliveryClaim) -> None:
        delivery, event = claim.delivery, claim.event
        cfg = self.config.worker
        secret = self._secret(delivery)
        if secret is None:
            await outbox.record_attempt(
                self.db,
                claim,
                None,
                status=DeliveryStatus.FAILED,
                next_attempt_at=time.time(),
                last_error="its webhook is no longer configured (no secret to sign with)",
            )
            return
        failpoints.reach("webhook_before_delivery")
        body = payload(event)
        started = time.time()
        timestamp = int(started)
        headers = {
            "content-type": "application/json",
            "user-agent": "Lowtide-Webhooks/1",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.id, timestamp, body),
        }
        status_code: int | None = None
        error: str | None = None
        try:
            async with self._client().post(
                delivery.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=cfg.webhook_timeout_seconds),
            ) as response:
                status_code = response.status
                if not 200 <= status_code < 300:
                    text = (await response.content.read(_ERROR_TEXT)).decode(errors="replace")
                    error = f"HTTP {status_code}" + (f": {text.strip()}" if text.strip() else "")
        except TimeoutError:
            error = f"timed out after {cfg.webhook_timeout_seconds:g} s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT] or type(exc).__name__
        except ValueError as exc:  # a URL aiohttp cannot use
            error = f"invalid URL: {exc}"[:_ERROR_TEXT]
        finished = time.time()
        attempt = AttemptRow(
            delivery_id=delivery.id,
            at=started,
            status_code=status_code,
            error=error,
            duration_ms=int((finished - started) * 1000),
        )
        if error is None:
            status, next_at, delivered = DeliveryStatus.DELIVERED, finished, int(finished)
        else:
            delivered = None
            next_at = finished + backoff(
                delivery.attempts + 1, cfg.webhook_retry_base_seconds, cfg.webhook_retry_max_seconds
            )
            gave_up = next_at > delivery.retry_from + cfg.webhook_retry_window_seconds
            status = DeliveryStatus.FAILED if gave_up else DeliveryStatus.PENDING
        if not await outbox.record_attempt(
            self.db, claim, attempt, status=status, next_attempt_at=next_at, delivered_at=delivered
        ):
            log.warning(
                "webhook delivery %s: claim lost before its outcome was recorded", delivery.id
            )
        elif status == DeliveryStatus.FAILED:
            log.warning(
                "webhook delivery %s to %s failed for good: %s", delivery.id, delivery.url, error
            )
        elif error is not None:
            log.info("webhook delivery %s to %s: %s; retrying", delivery.id, delivery.url, error)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT), trust_env=False
            )
        return self._session
