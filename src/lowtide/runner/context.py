"""What every shard and chunk run shares within one worker process."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowtide import metrics
from lowtide.admission.controller import RouteController
from lowtide.blobs import BlobStore
from lowtide.config import ModelRoute, WorkerConfig
from lowtide.engines.router import Router
from lowtide.runner.budgets import DailySpend
from lowtide.store.batches import set_paused_reason
from lowtide.store.database import Database
from lowtide.store.usage import UsageDelta


@dataclass
class RunnerContext:
    db: Database
    blobs: BlobStore
    router: Router
    config: WorkerConfig
    spend: DailySpend | None = None  # the projects' daily budgets
    controllers: dict[str, RouteController] = field(default_factory=dict)
    # Why a batch's lines are waiting, as last written to its row by this process.
    paused: dict[str, str | None] = field(default_factory=dict)

    def admission(self, route: ModelRoute) -> RouteController:
        controller = self.controllers.get(route.name)
        if controller is None:
            controller = RouteController(route, probe_seconds=self.config.route_probe_seconds)
            self.controllers[route.name] = controller
        return controller

    def count_usage(self, project: str, usage: list[UsageDelta]) -> None:
        """Prometheus counters of committed tokens and cost, per route and project."""
        for delta in usage:
            route = self.router.route_for(delta.model)
            name = route.name if route is not None else delta.model
            metrics.tokens_committed.labels(name, project, "input").inc(delta.input_tokens)
            metrics.tokens_committed.labels(name, project, "output").inc(delta.output_tokens)
            metrics.cost_committed.labels(name, project).inc(delta.cost)

    async def note_paused(self, batch_id: str, reason: str | None) -> None:
        """Show on the batch why its lines wait (or that they run again); written on change."""
        if self.paused.get(batch_id) == reason:
            return
        if reason is None:
            del self.paused[batch_id]
        else:
            self.paused[batch_id] = reason
        await set_paused_reason(self.db, batch_id, reason)
