"""The worker loop: expire, validate, run shards, finalize, sweep. Runs in the server by default.

Everything it touches is claimed under a lease in the store, so any number of workers, in any
number of processes, can run this loop against one database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable

from lowtide.blobs import BlobStore
from lowtide.config import Config, ModelRoute
from lowtide.engines.router import Router
from lowtide.ids import new_worker_id
from lowtide.runner import budgets, sweeper
from lowtide.runner.context import RunnerContext
from lowtide.runner.finalize import finalize_batch
from lowtide.runner.rerun import plan_rerun
from lowtide.runner.schema_check import line_checker
from lowtide.runner.shard_runner import ShardRun
from lowtide.runner.upstream import ChunkRunner
from lowtide.runner.validation import FileValidator, LineChecker, confirm_duplicates
from lowtide.runner.webhooks import WebhookSender
from lowtide.store import leases
from lowtide.store.batches import finish_validation, stopped_among
from lowtide.store.database import Database
from lowtide.store.files import get_file_any_state
from lowtide.store.leases import BatchTask, ShardClaim, TaskKind
from lowtide.store.rows import ChunkRow, ShardRow
from lowtide.vocabulary import ChunkMode, ChunkStatus, FilePurpose, ShardStatus

log = logging.getLogger("lowtide.worker")

_MAX_BATCH_TASKS = 2


class Worker:
    def __init__(self, db: Database, blobs: BlobStore, config: Config, router: Router) -> None:
        self.id = new_worker_id()
        self.db = db
        self.blobs = blobs
        self.config = config
        self.router = router
        self.ctx = RunnerContext(
            db, blobs, router, config.worker, spend=budgets.DailySpend(db, config)
        )
        self.chunks = ChunkRunner(self.ctx, self.id)
        self.webhooks = WebhookSender(db, config, self.id)
        self._wake = asyncio.Event()
        self._stopping = False
        self._shards: dict[asyncio.Task[None], ShardRun] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._task_failures: dict[str, int] = {}  # batch id -> validate/finalize failures in a row
        self._last_sweep = 0.0
        # The first look for crash leftovers comes at a random point of the first interval, so
        # workers started together do not all list the bucket at once.
        self._last_leftover_sweep = time.time() - random.uniform(
            0, config.worker.orphan_sweep_seconds
        )
        self._last_expiry = 0.0
        self._last_route_log = time.time()
        # A shard that ends wakes the loop only to fill its slot (a light tick); everything
        # else (new work, a cancel, a batch task done, the poll) gets the whole tick, and so
        # does any tick a poll interval after the last whole one.
        self._full_tick = True
        self._last_full_tick = 0.0

    def wake(self) -> None:
        self._full_tick = True
        self._wake.set()

    def stop_batch(self, batch_id: str) -> None:
        """Stop this process's shards of a cancelled or expired batch now, not at the next heartbeat."""
        for run in self._shards.values():
            if run.claim.batch_id == batch_id:
                run.stopping = True
        self.chunks.stop_batch(batch_id)
        self.wake()

    async def run(self) -> None:
        log.info("worker %s started", self.id)
        while not self._stopping:
            try:
                await self._tick()
            except Exception:
                log.exception("worker tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.worker.poll_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, let running shards commit and hand back, within `timeout` seconds."""
        self._stopping = True
        self._wake.set()
        for run in self._shards.values():
            run.stopping = True
        pending = set(self._shards) | self._batch_tasks
        chunks = asyncio.create_task(self.chunks.stop(timeout))
        hooks = asyncio.create_task(self.webhooks.stop(timeout))
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        await chunks
        await hooks

    async def _tick(self) -> None:
        now = time.time()
        cfg = self.config.worker
        if not self._full_tick and now - self._last_full_tick < cfg.poll_seconds:
            await self._claim_work()  # a shard ended: fill its slot, nothing else
            return
        self._full_tick = False
        self._last_full_tick = now
        if now - self._last_expiry >= 1.0:
            self._last_expiry = now
            for batch_id in await leases.mark_expired(self.db, now):
                self.stop_batch(batch_id)
        # A cancel may come through any API server: look for it every whole tick, so no new
        # line of a cancelled batch starts here more than a poll interval after it.
        running = list({run.claim.batch_id for run in self._shards.values() if not run.stopping})
        for batch_id in await stopped_among(self.db, running):
            self.stop_batch(batch_id)
        await self._claim_work()
        if not self._stopping:
            await self.chunks.tick(time.time())
            await self.webhooks.tick(time.time())
        if now - self._last_route_log >= 30:
            self._last_route_log = now
            self._log_routes()
        if now - self._last_sweep >= cfg.sweep_seconds:
            self._last_sweep = now
            await self._sweep(now)

    async def _claim_work(self) -> None:
        cfg = self.config.worker
        while len(self._batch_tasks) < _MAX_BATCH_TASKS and not self._stopping:
            task = await leases.claim_batch_task(self.db, self.id, time.time(), cfg.lease_seconds)
            if task is None:
                break
            self._spawn_batch_task(task)
        if not self._stopping:
            # Every batch waiting for work gets a first shard, even when big batches hold all
            # the regular slots; then the regular slots are filled.
            await self._claim_shards(cfg.max_batches_in_flight, idle_batches_only=True)
            await self._claim_shards(cfg.max_active_shards, idle_batches_only=False)

    # -- shards --------------------------------------------------------------------------
    async def _claim_shards(self, slots: int, *, idle_batches_only: bool) -> None:
        """Fill up to `slots` running shards in this process."""
        room = slots - len(self._shards)
        if room <= 0:
            return
        lease = self.config.worker.lease_seconds
        for claim in await leases.claim_shards(
            self.db, self.id, time.time(), lease, room, idle_batches_only=idle_batches_only
        ):
            self._spawn_shard(claim)

    def _spawn_shard(self, claim: ShardClaim) -> None:
        run = ShardRun(self.ctx, claim)
        task = asyncio.create_task(run.run())
        self._shards[task] = run
        task.add_done_callback(self._shard_finished)

    def _shard_finished(self, task: asyncio.Task[None]) -> None:
        self._shards.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("shard run crashed", exc_info=task.exception())
        self._wake.set()

    # -- validation and finalize ---------------------------------------------------------
    def _spawn_batch_task(self, task: BatchTask) -> None:
        job = {
            TaskKind.VALIDATE: self._validate,
            TaskKind.RERUN: self._plan_rerun,
            TaskKind.FINALIZE: self._finalize,
        }[task.kind]
        t = asyncio.create_task(self._with_lease(task, job))
        self._batch_tasks.add(t)
        t.add_done_callback(self._batch_task_finished)

    def _batch_task_finished(self, task: asyncio.Task[None]) -> None:
        self._batch_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch task crashed", exc_info=task.exception())
        self.wake()

    async def _with_lease(self, task: BatchTask, job: Callable[[BatchTask], object]) -> None:
        """Run a batch-level job while renewing its lease; give the lease back if it fails."""
        lease = self.config.worker.lease_seconds

        async def renew() -> None:
            while True:
                await asyncio.sleep(lease / 3)
                if not await leases.renew_batch_lease(
                    self.db, task.batch.id, task.epoch, time.time() + lease
                ):
                    log.warning("lost lease on batch %s", task.batch.id)
                    job_task.cancel()
                    return

        job_task = asyncio.create_task(job(task))  # type: ignore[arg-type]
        renewer = asyncio.create_task(renew())
        retry_at: float | None = None
        try:
            await job_task
        except asyncio.CancelledError:
            if not job_task.cancelled():
                raise
        except Exception:
            # Back off 10 s, 20 s, ... up to 10 min: a store that is down for an hour is not
            # hammered, and the batch carries on by itself once it is back.
            batch_id = task.batch.id
            failures = self._task_failures[batch_id] = self._task_failures.get(batch_id, 0) + 1
            delay = min(600.0, 10.0 * 2 ** (failures - 1))
            log.exception(
                "%s of batch %s failed (%d in a row); retrying in %.0f s",
                task.kind,
                batch_id,
                failures,
                delay,
            )
            retry_at = time.time() + delay
        else:
            self._task_failures.pop(task.batch.id, None)
        finally:
            renewer.cancel()
        # A no-op when the job already moved the batch on (that bumps nothing but clears the
        # lease); otherwise the batch is free for the next claim at once, or after retry_at.
        await leases.release_batch_lease(self.db, task.batch.id, task.epoch, retry_at)

    async def _plan_rerun(self, task: BatchTask) -> None:
        if await plan_rerun(self.db, self.blobs, task):
            log.info("batch %s runs again (retry %d)", task.batch.id, task.batch.retries)

    async def _finalize(self, task: BatchTask) -> None:
        if await finalize_batch(self.db, self.blobs, task):
            log.info("batch %s finalized", task.batch.id)

    async def _validate(self, task: BatchTask) -> None:
        batch = task.batch
        limits = self.config.batches
        source = await get_file_any_state(self.db, batch.input_file_id)
        problem = None
        if source is None or source.project != batch.project or not source.visible(_now()):
            problem = (
                "file_id",
                f"Cannot find file {batch.input_file_id}, or project {batch.project} does not "
                "have access to it.",
            )
        elif source.purpose != FilePurpose.BATCH:
            problem = (
                "input_file_id",
                f"File {source.id} has purpose '{source.purpose}'; a batch needs a file with "
                "purpose 'batch'.",
            )
        if problem is not None:
            param, message = problem
            error = {"code": "invalid_request", "line": None, "param": param, "message": message}
            await finish_validation(
                self.db,
                batch.id,
                task.epoch,
                _now(),
                shard_rows=[],
                total=0,
                model=None,
                errors=[error],
            )
            return
        assert source is not None
        validator = FileValidator(
            batch.endpoint,
            self._endpoints_of,
            limits,
            self.router.served_models(),
            upstream_of=self._upstream_of,
            checker_of=functools.partial(self._checker_of, batch.endpoint),
        )
        try:
            async for chunk in self.blobs.iter_chunks(source.blob_key):
                validator.feed(chunk)
                await asyncio.sleep(0)  # let the API answer between chunks
            result = validator.finish()
        finally:
            validator.close()
        errors = list(result.errors)
        if result.possible_duplicates:
            errors += await confirm_duplicates(
                self.blobs.iter_chunks(source.blob_key), result.possible_duplicates
            )
        if not errors:
            errors = await budgets.refusals(
                self.db, self.config, self.router, batch, result.input_tokens
            )
        errors.sort(key=lambda e: (e["line"] is not None, e["line"] or 0))
        errors = errors[: limits.max_errors_reported]
        shard_rows = [
            ShardRow(
                batch_id=batch.id,
                status=ShardStatus.PENDING if s.get("chunk") is None else ShardStatus.UPSTREAM,
                **s,
            )
            for s in result.shards
        ]
        chunk_rows = [
            ChunkRow(
                batch_id=batch.id,
                mode=ChunkMode.BATCH,
                status=ChunkStatus.PENDING,
                created_at=_now(),
                **c,
            )
            for c in result.chunks
        ]
        started = await finish_validation(
            self.db,
            batch.id,
            task.epoch,
            _now(),
            shard_rows=shard_rows,
            chunk_rows=chunk_rows if not errors else None,
            total=result.total,
            model=",".join(result.models[:5]) or None,
            errors=errors or None,
            estimated_tokens=sum(result.input_tokens.values()),
        )
        if started:
            log.info(
                "batch %s validated: %d requests, %d shards, %d errors",
                batch.id,
                result.total,
                len(shard_rows),
                len(errors),
            )

    def _upstream_of(self, model: str) -> ModelRoute | None:
        route = self.router.route_for(model)
        return route if route is not None and route.upstream_batch else None

    def _checker_of(self, endpoint: str, model: str) -> LineChecker | None:
        route = self.router.route_for(model)
        return line_checker(route, endpoint) if route is not None else None

    def _endpoints_of(self, model: str) -> tuple[str, ...] | None:
        route = self.router.route_for(model)
        return route.served_endpoints() if route is not None else None

    def finished_lines(self, batch_id: str) -> tuple[int, int]:
        """(ok, failed) lines of the batch finished here and not committed yet."""
        ok = failed = 0
        for run in list(self._shards.values()):
            if run.claim.batch_id == batch_id:
                a, b = run.uncommitted()
                ok, failed = ok + a, failed + b
        return ok, failed

    def route_problems(self) -> dict[str, str]:
        """Routes this process stopped sending to because the upstream refuses them."""
        return {
            name: c.problem for name, c in self.ctx.controllers.items() if c.problem is not None
        }

    def _log_routes(self) -> None:
        """Every 30 s, one line per busy route: the same numbers /metrics exports."""
        for controller in self.ctx.controllers.values():
            line = controller.log_line()
            if line:
                log.info(line)

    # -- retention -----------------------------------------------------------------------
    async def _sweep(self, now: float) -> None:
        cfg = self.config.worker
        await sweeper.sweep_files(self.db, self.blobs, int(now))
        if now - self._last_leftover_sweep >= cfg.orphan_sweep_seconds:
            self._last_leftover_sweep = now
            await sweeper.sweep_leftovers(self.db, self.blobs, now, cfg.orphan_grace_seconds)


def _now() -> int:
    return int(time.time())
