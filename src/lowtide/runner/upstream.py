"""Lines of a route with `upstream_batch = true`, sent through the provider's own Batch API.

Validation cut them into chunks that fit the provider's limits. Each chunk moves in short
steps, each under a fenced lease and recorded before the next: upload the file (streamed),
create the provider batch (Lowtide's chunk key in its metadata), poll, then stitch: map every
result back to its line by custom_id and commit the results, the usage and a chunk for the
lines to send again, in one transaction. A crash between "created" and "recorded" is healed by
finding the provider batch by its metadata before ever creating another: nothing is paid twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from lowtide import failpoints
from lowtide.blobs.keys import chunk_lines_key, chunk_result_key
from lowtide.config import ModelRoute
from lowtide.engines.base import EngineResponse
from lowtide.engines.provider_batches import (
    ProviderBatchClient,
    ProviderError,
    ProviderRefused,
    ProviderUnavailable,
)
from lowtide.ids import request_line_id
from lowtide.runner import segment_lines
from lowtide.runner.accounting import FinishedLine, answered, tally, unanswered
from lowtide.runner.context import RunnerContext
from lowtide.runner.results import (
    CANCELLED_MESSAGE,
    EXPIRED_MESSAGE,
    error_line,
    response_line,
    usage_of,
)
from lowtide.runner.retry import is_retryable_status
from lowtide.runner.schema_check import EXTENSION as SCHEMA_EXTENSION
from lowtide.runner.schema_check import split_extension
from lowtide.runner.sending import LineSender
from lowtide.runner.validation import iter_request_lines, stream_lines
from lowtide.store.chunks import (
    ChunkClaim,
    batch_stop_reason,
    claim_chunks,
    commit_chunk,
    record_step,
    release_chunk,
    renew_chunk_lease,
    shards_of_chunk,
)
from lowtide.store.files import blob_key_of
from lowtide.store.rows import ChunkRow, Counts
from lowtide.store.usage import UsageDelta
from lowtide.vocabulary import ChunkMode, ChunkStatus, StopReason

log = logging.getLogger("lowtide.upstream")

METADATA_KEY = "lowtide_chunk"
_PROVIDER_DONE = ("completed", "expired", "cancelled")
_NOT_RUN = ("batch_expired", "batch_cancelled")
_MAX_BACKOFF = 600.0
# A provider batch asked to cancel may take this long to say so; then what it finished is kept
# and the rest of its lines count as not run.
CANCEL_WAIT_SECONDS = 600.0
# Near the Lowtide batch's deadline (this share of its window left), unfinished provider
# batches are cancelled and their lines run synchronously (upstream_batch_fallback = "sync").
FALLBACK_SHARE = 0.1
_TALLY_EVERY = 1000
_FLUSH_BYTES = 1 << 20


def request_for_provider(raw: bytes, route: ModelRoute) -> bytes:
    """A request line as the provider gets it: the upstream model name swapped in, if any,
    and Lowtide's own extension field removed."""
    raw = raw.strip()
    extension = SCHEMA_EXTENSION.encode() in raw
    if not route.upstream_model and not extension:
        return raw
    request = orjson.loads(raw)
    request["body"] = split_extension(request["body"])[0]
    if route.upstream_model:
        request["body"] = {**request["body"], "model": route.upstream_model}
    return orjson.dumps(request)


class ChunkRunner:
    """The chunks this worker process is moving along, and one provider client per route."""

    def __init__(self, ctx: RunnerContext, worker_id: str, max_running: int = 16) -> None:
        self.ctx = ctx
        self.worker_id = worker_id
        self.max_running = max_running
        self._clients: dict[str, ProviderBatchClient] = {}
        self._runs: dict[asyncio.Task[None], ChunkRun] = {}

    def client(self, route: ModelRoute) -> ProviderBatchClient:
        client = self._clients.get(route.name)
        if client is None:
            client = self._clients[route.name] = ProviderBatchClient(route)
        return client

    async def tick(self, now: float) -> None:
        room = self.max_running - len(self._runs)
        if room <= 0:
            return
        lease = self.ctx.config.lease_seconds
        for claim in await claim_chunks(self.ctx.db, self.worker_id, now, lease, room):
            run = ChunkRun(self, claim)
            task = asyncio.create_task(run.step())
            self._runs[task] = run
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._runs.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("chunk step crashed", exc_info=task.exception())

    def stop_batch(self, batch_id: str) -> None:
        for run in self._runs.values():
            if run.claim.chunk.batch_id == batch_id:
                run.stopping = True

    async def stop(self, timeout: float) -> None:
        for run in self._runs.values():
            run.stopping = run.shutdown = True
        if self._runs:
            _, still = await asyncio.wait(set(self._runs), timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


@dataclass(slots=True)
class _Scope:
    """The batch, as a LineSender needs it."""

    batch_id: str
    project: str
    endpoint: str
    priority: str
    created_at: int
    expires_at: int


class _Results:
    """The chunk's result blob, written as lines finish, and what they add up to."""

    def __init__(self, runner: ChunkRunner, batch_id: str, idx: int, endpoint: str) -> None:
        self.blobs = runner.ctx.blobs
        self.key = chunk_result_key(batch_id, idx)
        self.endpoint = endpoint
        self.counts = Counts()
        self.usage: dict[str, UsageDelta] = {}
        self.lines = 0
        self._writer: Any = None
        self._buffer = bytearray()
        self._pending: list[FinishedLine] = []

    async def add(self, line: FinishedLine) -> None:
        if self._writer is None:
            self._writer = await self.blobs.writer(self.key)
        self._buffer += segment_lines.encode([line.result])
        self._pending.append(line)
        self.lines += 1
        if len(self._pending) >= _TALLY_EVERY:
            self._tally()
        if len(self._buffer) >= _FLUSH_BYTES:
            await self._writer.write(bytes(self._buffer))
            self._buffer.clear()

    def _tally(self) -> None:
        counts, usage = tally(self._pending, self.endpoint)
        self.counts = self.counts + counts
        for delta in usage:
            into = self.usage.setdefault(
                delta.model, UsageDelta(model=delta.model, endpoint=self.endpoint)
            )
            for name in ("requests", "input_tokens", "output_tokens", "cached_tokens"):
                setattr(into, name, getattr(into, name) + getattr(delta, name))
            into.cost += delta.cost
            into.sync_cost += delta.sync_cost
        self._pending.clear()

    async def close(self) -> str | None:
        """The blob key if any line was written; after this the blob is complete."""
        self._tally()
        if self._writer is None:
            return None
        if self._buffer:
            await self._writer.write(bytes(self._buffer))
        await self._writer.commit()
        return self.key

    async def discard(self) -> None:
        if self._writer is not None:
            await self._writer.abort()
            await self.blobs.delete(self.key)


class ChunkRun:
    """One step of one chunk, under its lease."""

    def __init__(self, runner: ChunkRunner, claim: ChunkClaim) -> None:
        self.runner = runner
        self.ctx = runner.ctx
        self.claim = claim
        self.stopping = False  # the batch stopped (or the process is shutting down)
        self.shutdown = False
        self.lost = False
        self._done = False
        batch = claim.batch
        self.scope = _Scope(
            batch.id,
            batch.project,
            batch.endpoint,
            batch.priority,
            batch.created_at,
            batch.expires_at or 0,
        )

    # -- the step ------------------------------------------------------------------------
    async def step(self) -> None:
        chunk = self.claim.chunk
        heartbeat = asyncio.create_task(self._heartbeat())
        next_at: float | None = time.time() + 60
        try:
            next_at = await self._step()
        except ProviderError as exc:
            route = self.ctx.router.route_named(chunk.route)
            poll = route.upstream_batch_poll_seconds if route is not None else 30.0
            delay = min(_MAX_BACKOFF, max(exc.retry_after or 0.0, poll * 2**chunk.attempts))
            log.warning(
                "chunk %s: the provider failed (%s: %s); trying again in %.0f s",
                chunk.key,
                exc.code,
                exc.message,
                delay,
            )
            await record_step(self.ctx.db, self.claim, attempts=chunk.attempts + 1)
            next_at = time.time() + delay
        except Exception:
            log.exception("chunk %s: step failed; trying again in 60 s", chunk.key)
        finally:
            heartbeat.cancel()
        if not self._done and not self.lost:
            await release_chunk(self.ctx.db, self.claim, next_at)

    async def _heartbeat(self) -> None:
        lease = self.ctx.config.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                held = await renew_chunk_lease(self.ctx.db, self.claim, time.time() + lease)
            except Exception:
                log.exception("lease renewal failed for chunk %s", self.claim.chunk.key)
                continue
            if not held:
                self.lost = True
                return
            if await batch_stop_reason(self.ctx.db, self.claim.chunk.batch_id):
                self.stopping = True

    async def _step(self) -> float | None:
        """Do what the chunk needs next; when to come back (None: at once)."""
        chunk, db = self.claim.chunk, self.ctx.db
        stop = await batch_stop_reason(db, chunk.batch_id)
        route = self.ctx.router.route_named(chunk.route)
        if route is None:
            message = f"The route '{chunk.route}' is no longer configured on this server."
            await self._fail_all("model_not_found", message)
            return None
        if chunk.mode == ChunkMode.SYNC or (
            not route.upstream_batch and chunk.provider_batch_id is None
        ):
            await self._run_sync(route)
            return None
        client = self.runner.client(route)
        if chunk.provider_batch_id is None:
            return await self._submit(route, client, stop)
        return await self._poll(route, client, stop)

    # -- submit --------------------------------------------------------------------------
    async def _submit(
        self, route: ModelRoute, client: ProviderBatchClient, stop: str | None
    ) -> float | None:
        chunk, db = self.claim.chunk, self.ctx.db
        if chunk.create_sent_at is not None:
            # A create may have landed before the crash (or the dropped answer): find it.
            found = await client.find(METADATA_KEY, chunk.key, since=chunk.create_sent_at - 3600)
            if found is not None:
                log.info("chunk %s: found provider batch %s", chunk.key, found["id"])
                await self._submitted(found)
                return None
            await record_step(db, self.claim, create_sent_at=None)
        if stop:
            await self._fail_all(*_stopped(stop))
            return None
        if self._fallback_due(route):
            await record_step(db, self.claim, mode=ChunkMode.SYNC)
            return None
        if chunk.provider_file_id is None:
            length = 0
            async for piece in self._provider_file(route):
                length += len(piece)
            filename = f"lowtide-{chunk.batch_id}-{chunk.idx}.jsonl"
            file_id = await client.upload(filename, length, self._provider_file(route))
            if not await record_step(db, self.claim, provider_file_id=file_id):
                await client.delete_file(file_id)
                return None
        assert chunk.provider_file_id is not None
        if not await record_step(db, self.claim, create_sent_at=time.time()):
            return None
        metadata = {METADATA_KEY: chunk.key, "lowtide_batch_id": chunk.batch_id}
        try:
            created = await client.create(
                chunk.provider_file_id, self.scope.endpoint, route.upstream_batch_window, metadata
            )
        except ProviderRefused as exc:
            await record_step(db, self.claim, create_sent_at=None)
            if exc.code == "token_limit_exceeded":
                return await self._wait_for_room(route, exc.message)
            await self._fail_all(exc.code, f"The provider refused the batch: {exc.message}")
            return None
        except ProviderUnavailable as exc:
            if exc.status == 429 or exc.code == "token_limit_exceeded":
                await record_step(db, self.claim, create_sent_at=None)  # refused: not created
                return await self._wait_for_room(route, exc.message)
            raise  # it may have been created: the next step looks it up
        failpoints.reach("upstream_batch_created")
        await self._submitted(created)
        return time.time() + route.upstream_batch_poll_seconds

    async def _submitted(self, provider_batch: dict[str, Any]) -> None:
        await record_step(
            self.ctx.db,
            self.claim,
            provider_batch_id=str(provider_batch["id"]),
            provider_status=str(provider_batch.get("status")),
            status=ChunkStatus.SUBMITTED,
            attempts=0,
        )

    async def _wait_for_room(self, route: ModelRoute, message: str) -> float:
        """The provider's enqueued-token or batch limit: wait for room, never fail the lines."""
        chunk = self.claim.chunk
        delay = min(_MAX_BACKOFF, route.upstream_batch_poll_seconds * 2**chunk.attempts)
        log.info("chunk %s: provider at its limit (%s); again in %.0f s", chunk.key, message, delay)
        await record_step(self.ctx.db, self.claim, attempts=chunk.attempts + 1)
        return time.time() + delay

    # -- poll ----------------------------------------------------------------------------
    async def _poll(
        self, route: ModelRoute, client: ProviderBatchClient, stop: str | None
    ) -> float | None:
        chunk, db = self.claim.chunk, self.ctx.db
        assert chunk.provider_batch_id is not None
        provider_batch = await client.retrieve(chunk.provider_batch_id)
        status = str(provider_batch.get("status"))
        changed = status != chunk.provider_status
        if status == "failed":
            return await self._failed(route, provider_batch)
        if status in _PROVIDER_DONE:
            await self._stitch(route, client, provider_batch, stop)
            return None
        now = time.time()
        if chunk.cancel_sent_at is None and (stop or self._fallback_due(route)):
            await client.cancel(chunk.provider_batch_id)
            await record_step(db, self.claim, cancel_sent_at=now, fallback=int(not stop))
            return now + min(5.0, route.upstream_batch_poll_seconds)
        if chunk.cancel_sent_at is not None and now - chunk.cancel_sent_at > CANCEL_WAIT_SECONDS:
            log.warning("chunk %s: the provider never finished cancelling", chunk.key)
            await self._stitch(route, client, provider_batch, stop)
            return None
        attempts = 0 if changed else chunk.attempts + 1
        await record_step(db, self.claim, provider_status=status, attempts=attempts)
        poll = route.upstream_batch_poll_seconds
        if chunk.cancel_sent_at is not None:
            return now + min(5.0, poll)
        return now + min(poll * 1.5**attempts, poll * 20)

    async def _failed(self, route: ModelRoute, provider_batch: dict[str, Any]) -> float | None:
        """The provider refused the whole batch: over its limits (wait), or for good (fail)."""
        errors = (provider_batch.get("errors") or {}).get("data") or [{}]
        first = errors[0] if isinstance(errors[0], dict) else {}
        code = str(first.get("code") or "provider_batch_failed")
        message = str(first.get("message") or "The provider failed the batch.")
        if code == "token_limit_exceeded" or any(
            isinstance(e, dict) and e.get("code") == "token_limit_exceeded" for e in errors
        ):
            await record_step(
                self.ctx.db,
                self.claim,
                provider_batch_id=None,
                provider_status=None,
                create_sent_at=None,
                status=ChunkStatus.PENDING,
            )
            return await self._wait_for_room(route, message)
        await self._fail_all(code, f"The provider failed the batch: {message}")
        return None

    def _fallback_due(self, route: ModelRoute) -> bool:
        scope = self.scope
        if route.upstream_batch_fallback != "sync" or not scope.expires_at:
            return False
        window = scope.expires_at - scope.created_at
        return time.time() >= scope.expires_at - FALLBACK_SHARE * window

    # -- stitch --------------------------------------------------------------------------
    async def _stitch(
        self,
        route: ModelRoute,
        client: ProviderBatchClient,
        provider_batch: dict[str, Any],
        stop: str | None,
    ) -> None:
        """Every line gets its result, or goes in the chunk that sends it again."""
        chunk = self.claim.chunk
        lines: dict[str, tuple[int, str]] = {}  # custom_id -> (index, model)
        models: dict[str, str] = {}
        async for index, raw in self._lines():
            request = orjson.loads(raw)
            model = str(request["body"].get("model"))
            lines[request["custom_id"]] = (index, models.setdefault(model, model))
        fallback = bool(chunk.fallback)
        may_resend = not stop and (fallback or chunk.generation < route.max_retries)
        results = _Results(self.runner, chunk.batch_id, chunk.idx, self.scope.endpoint)
        finished: set[int] = set()
        again: set[int] = set()
        try:
            for file_id in (
                provider_batch.get("output_file_id"),
                provider_batch.get("error_file_id"),
            ):
                if not file_id:
                    continue
                async for raw in stream_lines(client.download(str(file_id))):
                    line = self._provider_line(raw, lines, finished, again, route, may_resend)
                    if line is not None:
                        await results.add(line)
            unanswered_code = _stopped(stop) if stop else None
            for custom_id, (index, _) in lines.items():
                if index in finished or index in again:
                    continue
                if may_resend:
                    again.add(index)
                    continue
                code, message = unanswered_code or (
                    "batch_expired",
                    "The provider did not return this request before its batch ended.",
                )
                line_id = request_line_id(chunk.batch_id, index)
                await results.add(unanswered(error_line(line_id, custom_id, code, message)))
            del lines
            follow_up = await self._follow_up(again, route, fallback) if again else None
            result_key = await results.close()
        except BaseException:
            await results.discard()
            raise
        if not await self._commit(results, result_key, follow_up, provider_batch):
            return
        for file_id in (
            chunk.provider_file_id,
            provider_batch.get("output_file_id"),
            provider_batch.get("error_file_id"),
        ):
            if file_id:
                try:
                    await client.delete_file(str(file_id))
                except ProviderError as exc:
                    log.warning("chunk %s: could not delete file %s: %s", chunk.key, file_id, exc)

    def _provider_line(
        self,
        raw: bytes,
        lines: dict[str, tuple[int, str]],
        finished: set[int],
        again: set[int],
        route: ModelRoute,
        may_resend: bool,
    ) -> FinishedLine | None:
        """One line of the provider's output or error file, as Lowtide's result line (None:
        unknown, seen already, or to be sent again)."""
        try:
            obj = orjson.loads(raw)
            custom_id = obj["custom_id"]
            index, model = lines[custom_id]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("chunk %s: ignoring a provider line: %.200r", self.claim.chunk.key, raw)
            return None
        if index in finished or index in again:
            return None
        line_id = request_line_id(self.claim.chunk.batch_id, index)
        response, error = obj.get("response"), obj.get("error")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            status = response["status_code"]
            if is_retryable_status(status) and may_resend:
                again.add(index)
                return None
            finished.add(index)
            body = response.get("body")
            answer = EngineResponse(status, body, response.get("request_id"))
            result = response_line(line_id, custom_id, answer)
            return answered(result, usage_of(body), route, model, provider_batch=True)
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code") or "provider_error")
        if code in _NOT_RUN and may_resend:
            again.add(index)
            return None
        finished.add(index)
        message = str(error.get("message") or "The provider reported an error for this request.")
        return unanswered(error_line(line_id, custom_id, code, message))

    async def _follow_up(self, again: set[int], route: ModelRoute, fallback: bool) -> ChunkRow:
        """A chunk for the lines to send again: its lines in a blob of their own."""
        chunk = self.claim.chunk
        key = chunk_lines_key(chunk.batch_id)
        writer = await self.ctx.blobs.writer(key)
        count = size = 0
        buffer = bytearray()
        try:
            async for index, raw in self._lines():
                if index not in again:
                    continue
                buffer += b"%d\t%s\n" % (index, raw.strip())
                count += 1
                size += len(raw.strip()) + 1
                if len(buffer) >= _FLUSH_BYTES:
                    await writer.write(bytes(buffer))
                    buffer.clear()
            if buffer:
                await writer.write(bytes(buffer))
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise
        sync = fallback or not route.upstream_batch
        return ChunkRow(
            batch_id=chunk.batch_id,
            idx=0,  # the next free index, given at commit
            route=chunk.route,
            mode=ChunkMode.SYNC if sync else ChunkMode.BATCH,
            status=ChunkStatus.PENDING,
            line_count=count,
            bytes=size,
            created_at=int(time.time()),
            generation=chunk.generation + (0 if self.shutdown else 1),
            source_key=key,
        )

    async def _commit(
        self,
        results: _Results,
        result_key: str | None,
        follow_up: ChunkRow | None,
        provider_batch: dict[str, Any] | None,
    ) -> bool:
        chunk = self.claim.chunk
        status = str(provider_batch.get("status")) if provider_batch else chunk.provider_status
        committed = await commit_chunk(
            self.ctx.db,
            self.claim,
            result_key=result_key,
            counts=results.counts,
            usage=list(results.usage.values()),
            provider_status=status,
            follow_up=follow_up,
            now=time.time(),
        )
        if not committed:
            self.lost = True
            await results.discard()
            if follow_up is not None and follow_up.source_key:
                await self.ctx.blobs.delete(follow_up.source_key)
            return False
        self._done = True
        self.ctx.count_usage(self.scope.project, list(results.usage.values()))
        if chunk.source_key:
            await self.ctx.blobs.delete(chunk.source_key)
        log.info(
            "chunk %s: %d lines committed%s",
            chunk.key,
            results.lines,
            f", {follow_up.line_count} to send again" if follow_up else "",
        )
        return True

    async def _fail_all(self, code: str, message: str) -> None:
        """Every line of the chunk ends with this error (stopped, refused, route gone)."""
        chunk = self.claim.chunk
        results = _Results(self.runner, chunk.batch_id, chunk.idx, self.scope.endpoint)
        try:
            async for index, raw in self._lines():
                custom_id = orjson.loads(raw)["custom_id"]
                line_id = request_line_id(chunk.batch_id, index)
                await results.add(unanswered(error_line(line_id, custom_id, code, message)))
            result_key = await results.close()
        except BaseException:
            await results.discard()
            raise
        await self._commit(results, result_key, None, None)

    # -- synchronous fallback -------------------------------------------------------------
    async def _run_sync(self, route: ModelRoute) -> None:
        """Run the chunk's lines as synchronous calls, results written as they finish; on a
        stop the rest end as cancelled/expired, on shutdown they go in a chunk of their own."""
        chunk = self.claim.chunk
        sender = LineSender(self.ctx, self.scope, self)
        results = _Results(self.runner, chunk.batch_id, chunk.idx, self.scope.endpoint)
        window = asyncio.Semaphore(min(1024, 2 * route.max_concurrency))
        finished: set[int] = set()
        tasks: set[asyncio.Task[None]] = set()

        async def one(index: int, raw: bytes) -> None:
            try:
                line = await sender.run_line(request_line_id(chunk.batch_id, index), raw)
                if line is not None and not self.lost:
                    finished.add(index)
                    await results.add(line)
            finally:
                window.release()

        try:
            async for index, raw in self._lines():
                if self.stopping or self.lost:
                    break
                await window.acquire()
                task = asyncio.create_task(one(index, raw))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(set(tasks))
            if self.lost:
                await results.discard()
                return
            stop = await batch_stop_reason(self.ctx.db, chunk.batch_id)
            rest: set[int] = set()
            async for index, raw in self._lines():
                if index in finished:
                    continue
                if stop:
                    custom_id = orjson.loads(raw)["custom_id"]
                    code, message = _stopped(stop)
                    line_id = request_line_id(chunk.batch_id, index)
                    await results.add(unanswered(error_line(line_id, custom_id, code, message)))
                else:
                    rest.add(index)
            follow_up = await self._follow_up(rest, route, True) if rest else None
            result_key = await results.close()
        except BaseException:
            for task in tasks:
                task.cancel()
            await results.discard()
            raise
        await self._commit(results, result_key, follow_up, None)

    # -- the chunk's lines ---------------------------------------------------------------
    async def _lines(self) -> AsyncIterator[tuple[int, bytes]]:
        """(index in the batch, request line) for every line of the chunk, in order."""
        chunk, blobs = self.claim.chunk, self.ctx.blobs
        if chunk.source_key is not None:
            async for raw in stream_lines(blobs.iter_chunks(chunk.source_key)):
                index, _, request = raw.partition(b"\t")
                yield int(index), request
            return
        input_key = await blob_key_of(self.ctx.db, self.claim.batch.input_file_id)
        for shard in await shards_of_chunk(self.ctx.db, chunk.batch_id, chunk.idx):
            data = await blobs.read_range(input_key, shard.byte_start, shard.byte_end)
            for offset, raw in enumerate(iter_request_lines(data)):
                yield shard.first_request + offset, raw
            del data
            await asyncio.sleep(0)

    async def _provider_file(self, route: ModelRoute) -> AsyncIterator[bytes]:
        """The provider's input file, in pieces of about 1 MB."""
        buffer = bytearray()
        async for _, raw in self._lines():
            buffer += request_for_provider(raw, route)
            buffer += b"\n"
            if len(buffer) >= _FLUSH_BYTES:
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            yield bytes(buffer)


def _stopped(stop: str) -> tuple[str, str]:
    if stop == StopReason.EXPIRED:
        return "batch_expired", EXPIRED_MESSAGE
    return "batch_cancelled", CANCELLED_MESSAGE
