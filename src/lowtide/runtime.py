"""The composition root: everything a Lowtide process holds, built once and wired here."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowtide.admission.snapshot import RouteWatch
from lowtide.blobs import BlobStore, open_blob_store
from lowtide.config import Config
from lowtide.engines.router import Router
from lowtide.runner.worker import Worker
from lowtide.service import BatchService, FileService, MessageBatchService
from lowtide.service.deps import Deps
from lowtide.service.estimate import EstimateService
from lowtide.service.models import ModelService
from lowtide.service.usage import UsageService
from lowtide.service.webhooks import WebhookService
from lowtide.store.database import Database, sqlite_url

log = logging.getLogger("lowtide")


@dataclass
class Runtime:
    config: Config
    data_dir: Path
    run_workers: bool = True
    model_cache_dir: Path | None = None  # converted model weights; default: DATA_DIR/models
    db: Database = field(init=False)
    blobs: BlobStore = field(init=False)
    router: Router = field(init=False)
    files: FileService = field(init=False)
    batches: BatchService = field(init=False)
    message_batches: MessageBatchService = field(init=False)
    usage: UsageService = field(init=False)
    estimates: EstimateService = field(init=False)
    webhooks: WebhookService = field(init=False)
    models: ModelService = field(init=False)
    worker: Worker | None = field(init=False, default=None)
    _worker_task: asyncio.Task[None] | None = field(init=False, default=None)
    # The dashboard's view of this process's routes (read-only), sampled while a worker runs.
    route_watch: RouteWatch | None = field(init=False, default=None)
    _watch_task: asyncio.Task[None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # Resolved once, at start: every path below is absolute whatever the working folder.
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(self.config.resolved_database_url() or sqlite_url(self.data_dir))
        self.blobs = open_blob_store(
            str(self.data_dir),
            self.config.resolved_storage_url(),
            endpoint_url=self.config.storage_endpoint_url,
            region=self.config.storage_region,
        )
        self.router = Router(
            self.config.routes(), cache_dir=self.model_cache_dir or self.data_dir / "models"
        )
        deps = Deps(
            self.db,
            self.blobs,
            self.config.batches,
            self.wake_worker,
            self.config.currency,
            batch_webhooks=self.config.batch_webhooks,
            finished=self.finished_lines,
        )
        self.files = FileService(deps)
        self.batches = BatchService(deps)
        self.message_batches = MessageBatchService(
            deps, self.config.message_batches, self.files, self.batches
        )
        self.usage = UsageService(deps)
        self.estimates = EstimateService(deps, self.router)
        self.webhooks = WebhookService(deps)
        self.models = ModelService(self.router)

    async def start(self) -> None:
        for route, problem in self.router.config_problems().items():
            log.warning("route %s: %s", route, problem)
        await asyncio.to_thread(self.db.upgrade)
        if self.run_workers:
            self.worker = Worker(self.db, self.blobs, self.config, self.router)
            self._worker_task = asyncio.create_task(self.worker.run())
            worker = self.worker
            self.route_watch = RouteWatch(lambda: worker.ctx.controllers, self.config.routes())
            self._watch_task = asyncio.create_task(self.route_watch.run())

    def health(self) -> dict[str, Any]:
        """What /healthz reports: the models served, and any route that cannot work now."""
        problems = self.router.config_problems()
        if self.worker is not None:
            problems.update(self.worker.route_problems())
        return {"status": "ok", "models": self.router.served_models(), "route_problems": problems}

    def finished_lines(self, batch_id: str) -> tuple[int, int]:
        """Lines of the batch this process's worker finished and has yet to commit."""
        return self.worker.finished_lines(batch_id) if self.worker is not None else (0, 0)

    def routes_snapshot(self) -> list[dict[str, Any]] | None:
        """Each route of this process's worker now (None without a worker): read-only."""
        return self.route_watch.snapshot() if self.route_watch is not None else None

    def routes_history(self) -> dict[str, Any] | None:
        """Throughput per route over the last hour, in fixed steps (None without a worker)."""
        return self.route_watch.history() if self.route_watch is not None else None

    def worker_id(self) -> str | None:
        return self.worker.id if self.worker is not None else None

    def wake_worker(self) -> None:
        """New work, a delete or a cancel: look now instead of at the next poll."""
        if self.worker is not None:
            self.worker.wake()

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self.worker is not None and self._worker_task is not None:
            await self.worker.stop(timeout=self.config.worker.cancel_grace_seconds)
            # The loop ends by itself after its current tick; cancelling it mid-query would
            # only interrupt a database round trip (and log a failed rollback).
            _, pending = await asyncio.wait({self._worker_task}, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(self._worker_task, return_exceptions=True)
        await self.router.close()
        await self.db.close()
