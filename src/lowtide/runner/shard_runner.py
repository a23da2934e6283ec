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
from collections.abc import Iterator

import orjson

from lowtide.admission.controller import RouteController
from lowtide.blobs.keys import segment_key
from lowtide.ids import request_line_ids
from lowtide.runner import segment_lines
from lowtide.runner.accounting import FinishedLine, replayed, tally
from lowtide.runner.context import RunnerContext
from lowtide.runner.prefix_groups import dispatch_order
from lowtide.runner.rerun import parse_previous
from lowtide.runner.results import usage_of
from lowtide.runner.segment_lines import ResultLine
from lowtide.runner.sending import LineSender
from lowtide.runner.validation import iter_request_lines
from lowtide.store.files import blob_key_of
from lowtide.store.leases import LeaseState, ShardClaim, release_shard, renew_shard_lease
from lowtide.store.segments import Segment, commit_segment

log = logging.getLogger("lowtide.shard")


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
        self._lanes = 0  # lanes running (a lane leaving says so at once, before its task ends)
        self._max_lanes = 0
        self._controller: RouteController | None = None  # the admission of the shard's route
        self._sender = LineSender(ctx, claim, self)
        self._previous: list[ResultLine | None] | None = None  # a rerun's results to keep
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
            if claim.prev_key is not None:
                self._previous = parse_previous(await self.ctx.blobs.read(claim.prev_key))
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
        """Start the lanes that run the shard's lines: each takes the next line when its last
        one is done, so about a window of lines is in flight or waiting for admission. (A
        lane per window slot, not a task per line: this is every line's path.) Lines go in file
        order, or grouped by prompt prefix where the route asks (prefix_groups.py)."""
        start, end = self.claim.committed, self.claim.request_count
        first = orjson.loads(lines[start]) if start < len(lines) else None
        route = self.ctx.router.route_for(str((first or {}).get("body", {}).get("model", "")))
        if route is None or route.group_prefixes:
            todo = iter(dispatch_order(lines, start, end))
        else:
            todo = iter(range(start, end))
        if route is None:
            self._max_lanes = lanes = 64
        else:
            self._max_lanes = min(1024, 2 * route.max_concurrency)
            self._controller = self.ctx.admission(route)
            lanes = min(self._max_lanes, self._controller.lanes_to_start(self.claim.batch_id))
        for _ in range(min(lanes, end - start)):
            self._add_lane(todo, lines)

    def _add_lane(self, todo: Iterator[int], lines: list[bytes]) -> None:
        self._lanes += 1
        task = asyncio.create_task(self._lane(todo, lines))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        controller, batch = self._controller, self.claim.batch_id
        if controller is not None:  # counted until the task is done (even cancelled unstarted)
            controller.lane_started(batch)
            task.add_done_callback(lambda _: controller.lane_ended(batch))

    async def _drain(self) -> None:
        if not self._tasks:
            return
        if not self.stopping:
            while self._tasks and not self.stopping and not self.lost:
                await asyncio.wait(set(self._tasks), timeout=0.5)
        for task in list(self._sender.queued):
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
    async def _lane(self, todo: Iterator[int], lines: list[bytes]) -> None:
        """Run lines one after another. A shard starts the lanes its route's window holds beyond
        those its batch runs here already (lanes_to_start), then follows the window: a lane
        leaves when only its own batch waits for a full window, and another starts when a slot
        goes unused (lanes_wanted)."""
        sender, previous = self._sender, self._previous
        line_id, first = request_line_ids(self.claim.batch_id), self.claim.first_request
        try:
            for index in todo:
                if self.stopping or self.lost:
                    return
                try:
                    if previous is not None and (kept := previous[index]) is not None:
                        done = self._replay(kept, lines[index])
                    else:
                        done = await sender.run_line(line_id(first + index), lines[index])
                except Exception:  # a bug fails one line (left unfinished: a gap), never the lane
                    log.exception(
                        "line %d of shard %s/%s failed", index, self.claim.batch_id, self.claim.idx
                    )
                    continue
                if done is not None:
                    self._finished(index, done)
                if self._controller is not None:
                    wanted = self._controller.lanes_wanted(self.claim.batch_id)
                    if wanted < 0 and self._lanes > 1:
                        return
                    if wanted > 0 and self._lanes < self._max_lanes:
                        self._add_lane(todo, lines)
        finally:
            self._lanes -= 1

    def _finished(self, index: int, done: FinishedLine) -> None:
        self._results[index] = done
        results = self._results
        ready = self._ready
        while ready < len(results) and results[ready] is not None:
            ready += 1
        self._ready = ready
        if ready - self._committed >= self.ctx.config.segment_lines:
            self._commit_wanted.set()

    def uncommitted(self) -> tuple[int, int]:
        """(ok, failed) lines finished but not committed yet (a progress view, not a result)."""
        ok = failed = 0
        for line in self._results[self._committed :]:
            if line is not None:
                if line.result.ok:
                    ok += 1
                else:
                    failed += 1
        return ok, failed

    def _replay(self, kept: ResultLine, raw: bytes) -> FinishedLine:
        """A line that keeps its earlier result: counted with its tokens and cost, not billed
        again (the ledger has it from the run that answered it)."""
        response = orjson.loads(kept.line).get("response")
        body = response.get("body") if isinstance(response, dict) else None
        model = str(orjson.loads(raw)["body"].get("model"))
        return replayed(kept, usage_of(body), self.ctx.router.route_for(model), model)

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
            items = self._results[first:end]  # a segment's lines, sliced in C
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
            self._results[first:end] = [None] * (end - first)
            self._committed = end
            self.ctx.count_usage(self.claim.project, usage)
