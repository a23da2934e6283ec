"""Run one shard under a lease: send its lines to engines, commit results in segments.

Results are committed as a growing prefix of the shard: a segment holds lines
[committed, committed + n) and the shard row records the new prefix length under the lease's
fencing number. A worker that resumes the shard starts after the prefix, so no committed line
runs twice and none is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from lowtide import metrics
from lowtide.admission.controller import Permit, RouteController
from lowtide.admission.estimate import estimate_tokens
from lowtide.blobs import BlobStore
from lowtide.blobs.keys import segment_key
from lowtide.config import ModelRoute, WorkerConfig
from lowtide.engines.base import Engine, EngineResponse, TransientEngineError
from lowtide.engines.router import Router
from lowtide.ids import request_line_id
from lowtide.runner import segment_lines
from lowtide.runner.accounting import FinishedLine, answered, tally, unanswered
from lowtide.runner.budgets import DailySpend
from lowtide.runner.results import error_line, response_line, usage_of
from lowtide.runner.retry import backoff_seconds, is_retryable_status, route_refusal
from lowtide.runner.validation import iter_request_lines
from lowtide.store.batches import set_paused_reason
from lowtide.store.database import Database
from lowtide.store.files import blob_key_of
from lowtide.store.leases import LeaseState, ShardClaim, release_shard, renew_shard_lease
from lowtide.store.segments import Segment, commit_segment
from lowtide.store.usage import UsageDelta
from lowtide.vocabulary import PRIORITIES

log = logging.getLogger("lowtide.shard")


@dataclass
class RunnerContext:
    """What every shard run shares within one worker process."""

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


class ShardRun:
    def __init__(self, ctx: RunnerContext, claim: ShardClaim) -> None:
        self.ctx = ctx
        self.claim = claim
        self.stopping = False  # batch stopped or worker shutting down: finish in-flight, hand back
        self.lost = False  # lease taken over: commit nothing more
        self._results: list[FinishedLine | None] = [None] * claim.request_count
        self._ready = claim.committed  # end of the contiguous finished prefix
        self._committed = claim.committed
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued: set[asyncio.Task[Any]] = set()  # line tasks waiting for a permit
        self._commit_lock = asyncio.Lock()
        self._commit_wanted = asyncio.Event()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        claim = self.claim
        try:
            key = await blob_key_of(self.ctx.db, claim.input_file_id)
            data = await self.ctx.blobs.read_range(key, claim.byte_start, claim.byte_end)
            lines = iter_request_lines(data)
            del data
            if len(lines) != claim.request_count:
                raise RuntimeError(
                    f"shard {claim.batch_id}/{claim.idx}: expected {claim.request_count} lines, read {len(lines)}"
                )
        except Exception:
            log.exception(
                "cannot read input for shard %s/%s; retry in 30 s", claim.batch_id, claim.idx
            )
            await release_shard(self.ctx.db, claim, retry_at=time.time() + 30)
            return
        heartbeat = asyncio.create_task(self._heartbeat())
        committer = asyncio.create_task(self._committer())
        try:
            await self._dispatch(lines)
            await self._drain()
        finally:
            self._closing = True
            self._commit_wanted.set()
            await committer
            heartbeat.cancel()
        if self.lost:
            return
        done = self._ready == claim.request_count
        await self._commit(done=done, last=True)
        if not done and not self.lost:
            # Stopped (cancel, expiry, shutdown): hand back at once. Anything else left a gap
            # that an immediate retry would hit again, so back off.
            retry_at = None if self.stopping else time.time() + 30
            await release_shard(self.ctx.db, claim, retry_at=retry_at)

    async def _dispatch(self, lines: list[bytes]) -> None:
        first = (
            orjson.loads(lines[self.claim.committed]) if self.claim.committed < len(lines) else None
        )
        window = asyncio.Semaphore(self._window_size(first))
        for index in range(self.claim.committed, self.claim.request_count):
            if self.stopping or self.lost:
                return
            await window.acquire()
            task = asyncio.create_task(self._run_line(index, lines[index], window))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _weight(self) -> float:
        """This batch's share: its priority, boosted when its window is about to close."""
        claim = self.claim
        weight = PRIORITIES.get(claim.priority, 1.0)
        window = claim.expires_at - claim.created_at
        if window > 0 and claim.expires_at - time.time() < 0.25 * window:
            weight *= 8  # the last quarter of the completion window: go first
        return weight

    def _window_size(self, first: dict[str, Any] | None) -> int:
        route = self.ctx.router.route_for(str((first or {}).get("body", {}).get("model", "")))
        return min(1024, 2 * route.max_concurrency) if route else 64

    async def _drain(self) -> None:
        if not self._tasks:
            return
        if not self.stopping:
            while self._tasks and not self.stopping and not self.lost:
                await asyncio.wait(set(self._tasks), timeout=0.5)
        for task in list(self._queued):
            task.cancel()  # lines still waiting for a permit never start
        if self._tasks and not self.lost:
            await asyncio.wait(set(self._tasks), timeout=self.ctx.config.cancel_grace_seconds)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _heartbeat(self) -> None:
        interval = self.ctx.config.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                state = await renew_shard_lease(
                    self.ctx.db, self.claim, time.time() + self.ctx.config.lease_seconds
                )
            except Exception:
                log.exception(
                    "lease renewal failed for shard %s/%s", self.claim.batch_id, self.claim.idx
                )
                continue
            if state == LeaseState.LOST:
                log.warning("lost lease on shard %s/%s", self.claim.batch_id, self.claim.idx)
                self.lost = True
                for task in list(self._tasks):
                    task.cancel()
                return
            if state == LeaseState.STOP:
                self.stopping = True

    # -- one line ------------------------------------------------------------------------
    async def _run_line(self, index: int, raw: bytes, window: asyncio.Semaphore) -> None:
        try:
            done = await self._execute(index, raw)
        finally:
            window.release()
        if done is None:
            return
        self._results[index] = done
        results = self._results
        ready = self._ready
        while ready < len(results) and results[ready] is not None:
            ready += 1
        self._ready = ready
        if ready - self._committed >= self.ctx.config.segment_lines:
            self._commit_wanted.set()

    async def _execute(self, index: int, raw: bytes) -> FinishedLine | None:
        claim = self.claim
        line_id = request_line_id(claim.batch_id, claim.first_request + index)
        request = orjson.loads(raw)
        custom_id = request["custom_id"]
        body = request["body"]
        route = self.ctx.router.route_for(str(body.get("model")))
        if route is None:
            message = (
                f"The provided model '{body.get('model')}' is not served by this Lowtide server."
            )
            return unanswered(error_line(line_id, custom_id, "model_not_found", message))
        try:
            engine = self.ctx.router.engine_for(route)
        except Exception as exc:  # a misconfigured route fails its lines, never the shard
            message = f"The engine for '{route.name}' could not be created: {exc}"
            return unanswered(error_line(line_id, custom_id, "engine_error", message))
        controller = self.ctx.admission(route)
        response, failure = await self._attempts(route, engine, controller, body, custom_id)
        if self.lost:
            return None
        if response is None:
            if failure is None or self.stopping:
                return None  # never sent, or left for finalize to report as cancelled/expired
            return unanswered(error_line(line_id, custom_id, failure.code, failure.message))
        if self.stopping and is_retryable_status(response.status_code):
            return None
        result = response_line(line_id, custom_id, response)
        return answered(result, usage_of(response.body), route, str(body.get("model")))

    async def _attempts(
        self,
        route: ModelRoute,
        engine: Engine,
        controller: RouteController,
        body: dict[str, Any],
        custom_id: str,
    ) -> tuple[EngineResponse | None, TransientEngineError | None]:
        """Send the line until it gets a final answer, its retries run out, or the shard stops.

        A refusal of the route itself (401, 403, 404) uses no retry: the line waits with every
        other line of the route until a probe finds the route working again.
        """
        claim, cfg = self.claim, self.ctx.config
        cost = estimate_tokens(claim.endpoint, body)
        response: EngineResponse | None = None
        failure: TransientEngineError | None = None
        attempt = 0
        while True:
            permit = await self._permit(controller, cost)
            if permit is None:
                return None, None  # stopped while waiting: this line never starts
            try:
                response, failure = await engine.execute(claim.endpoint, body), None
            except TransientEngineError as exc:
                response, failure = None, exc
            except asyncio.CancelledError:
                controller.release(permit, status=0)
                raise
            except Exception as exc:  # an engine bug must fail the line, not the shard
                controller.release(permit, status=0)
                log.exception("engine %s failed on %s", route.name, custom_id)
                message = f"The engine failed: {exc.__class__.__name__}: {exc}"
                return None, TransientEngineError("engine_error", message)
            self._account(controller, permit, response, failure)
            if response is not None:
                refusal = route_refusal(route.name, response.status_code, response.body)
                if refusal is not None:
                    controller.block(refusal)
                    await self.ctx.note_paused(claim.batch_id, refusal)
                    continue
                controller.route_ok()
                await self.ctx.note_paused(claim.batch_id, None)
            if response is not None and not is_retryable_status(response.status_code):
                return response, None
            if attempt == route.max_retries or self.stopping or self.lost:
                return response, failure
            controller.retried()
            retry_after = response.retry_after if response is not None else None
            await asyncio.sleep(
                backoff_seconds(attempt, cfg.retry_base_seconds, cfg.retry_max_seconds, retry_after)
            )
            attempt += 1

    async def _permit(self, controller: RouteController, cost: int) -> Permit | None:
        """Wait for admission; None if the shard stopped meanwhile (then the line never starts:
        after a cancel only requests already sent may finish)."""
        if self.ctx.spend is not None:
            while reason := await self.ctx.spend.over_budget(self.claim.project):
                await self.ctx.note_paused(self.claim.batch_id, reason)
                if self.stopping or self.lost:
                    return None
                await asyncio.sleep(1.0)
        if self.stopping or self.lost:
            return None
        task = asyncio.current_task()
        assert task is not None
        self._queued.add(task)
        try:
            permit = await controller.acquire(self.claim.batch_id, self._weight(), cost)
        finally:
            self._queued.discard(task)
        if self.stopping or self.lost:
            controller.release(permit, status=0)
            return None
        return permit

    @staticmethod
    def _account(
        controller: RouteController,
        permit: Permit,
        response: EngineResponse | None,
        failure: TransientEngineError | None,
    ) -> None:
        if response is None:
            controller.release(permit, status=None)
            controller.count(failure.code if failure else "error")
            return
        usage = usage_of(response.body)
        controller.release(
            permit,
            status=response.status_code,
            used_tokens=usage.input_tokens + usage.output_tokens,
            retry_after=response.retry_after,
            headers=response.headers,
        )
        controller.count(str(response.status_code))

    # -- commits -------------------------------------------------------------------------
    async def _committer(self) -> None:
        interval = self.ctx.config.segment_seconds
        while not self._closing:
            try:
                await asyncio.wait_for(self._commit_wanted.wait(), timeout=interval)
            except TimeoutError:
                pass
            self._commit_wanted.clear()
            if self._closing or self.lost:
                return
            if self._ready > self._committed:
                try:
                    await self._commit(done=False)
                except Exception:
                    log.exception(
                        "segment commit failed for shard %s/%s", self.claim.batch_id, self.claim.idx
                    )

    async def _commit(self, *, done: bool, last: bool = False) -> None:
        async with self._commit_lock:
            first, end = self._committed, self._ready
            if end == first and not done:
                return
            items = [self._results[i] for i in range(first, end)]
            counts, usage = tally(items, self.claim.endpoint)  # type: ignore[arg-type]
            if last and not done:  # stopped early: lines finished past the prefix run again
                counts.rerun_lines = sum(1 for r in self._results[end:] if r is not None)
            key = segment_key(self.claim.batch_id, self.claim.idx, first)
            segment = Segment(first, end - first, key, counts)
            if items:
                await self.ctx.blobs.put(
                    segment.blob_key, segment_lines.encode(d.result for d in items)
                )
            if not await commit_segment(self.ctx.db, self.claim, segment, done=done, usage=usage):
                self.lost = True
                if items:
                    await self.ctx.blobs.delete(segment.blob_key)
                return
            for i in range(first, end):
                self._results[i] = None
            self._committed = end
            self.ctx.count_usage(self.claim.project, usage)
