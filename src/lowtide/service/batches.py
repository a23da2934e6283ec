"""Batches: create (with every check a client can fail), retrieve, list, cancel, results."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from lowtide.config import parse_duration
from lowtide.errors import ApiError, invalid_value
from lowtide.ids import new_batch_id
from lowtide.runner.rerun import RerunRequest
from lowtide.runner.validation import first_request_url
from lowtide.service import results
from lowtide.service.deps import UseCases, expires_after_seconds
from lowtide.store import batches as batch_store
from lowtide.store.chunks import chunks_of_batches
from lowtide.store.files import get_file
from lowtide.store.leases import running_shards
from lowtide.store.rows import BatchRow, ChunkRow, Counts
from lowtide.vocabulary import (
    DEFAULT_PRIORITY,
    ENDPOINTS,
    PRIORITIES,
    RETRYABLE,
    TERMINAL,
    BatchStatus,
    ChunkStatus,
)


@dataclass(slots=True)
class BatchView:
    """A batch as clients see it: its row, and its counts (live while it runs, final after)."""

    row: BatchRow
    counts: Counts
    currency: str = "USD"
    chunks: list[ChunkRow] = field(default_factory=list)  # its provider batches, if any

    @property
    def lines_with_provider(self) -> int:
        return sum(c.line_count for c in self.chunks if c.status == ChunkStatus.SUBMITTED)

    @property
    def lines_to_submit(self) -> int:
        return sum(c.line_count for c in self.chunks if c.status == ChunkStatus.PENDING)

    @property
    def lines_per_second(self) -> float | None:
        done = self.counts.completed + self.counts.failed
        started = self.row.in_progress_at
        running = self.row.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
        if not (running and started and done):
            return None
        return done / max(time.time() - started, 1e-3)

    @property
    def estimated_finish_at(self) -> int | None:
        rate = self.lines_per_second
        if not rate:
            return None
        left = self.row.total - self.counts.completed - self.counts.failed
        return int(time.time() + left / rate)


@dataclass(slots=True)
class WorkerShards:
    """A worker and the shards it holds: those of `project`'s batches by batch, others counted."""

    worker: str
    alive: bool  # holds at least one lease that has not expired
    lease_expires_at: float  # its latest lease
    shards: int
    batches: dict[str, int] = field(default_factory=dict)  # the project's batch id -> shards
    other_shards: int = 0  # shards of other projects' batches: counted, never named


@dataclass(slots=True)
class BatchRequest:
    """What a client asks for when it creates a batch (or estimates one)."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None
    output_expires_after: tuple[str, int] | None = None  # (anchor, seconds)
    webhook_url: str | None = None  # extension: announce the batch's end here too


class BatchService(UseCases):
    async def create(
        self,
        project: str,
        request: BatchRequest,
        *,
        idempotency_key: str | None = None,
        batch_id: str | None = None,
        total: int = 0,
    ) -> BatchView:
        """A new batch waiting for validation; with a known idempotency key, the first one.
        (`batch_id`: a face whose API names batches its own way chose the id; `total`: it wrote
        the input itself, so it knows the count before validation does.)"""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise invalid_value(
                "Idempotency-Key", "The Idempotency-Key header must be 1 to 255 characters long."
            )
        window, output_ttl = self.check(request)
        metadata = request.metadata
        now = int(time.time())
        row = BatchRow(
            id=batch_id or new_batch_id(),
            project=project,
            endpoint=request.endpoint,
            input_file_id=request.input_file_id,
            completion_window=request.completion_window,
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + window,
            metadata=orjson.dumps(metadata).decode() if metadata is not None else None,
            output_expires_seconds=output_ttl,
            priority=(metadata or {}).get("priority", DEFAULT_PRIORITY),
            idempotency_key=idempotency_key,
            webhook_url=request.webhook_url,
            total=total,
        )
        earlier = await batch_store.insert_batch(self._db, row)
        if earlier is None:
            self._wake()
            return BatchView(row, Counts(), self._currency)
        asked = (request.input_file_id, request.endpoint, request.completion_window)
        if (earlier.input_file_id, earlier.endpoint, earlier.completion_window) != asked:
            raise ApiError(
                409,
                f"Idempotency-Key {idempotency_key!r} was already used for batch {earlier.id} "
                "with different parameters; use a new key for a new batch.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
                headers={"x-should-retry": "false"},
            )
        return (await self.views([earlier]))[0]

    def check(self, request: BatchRequest) -> tuple[int, int | None]:
        """Every check a create makes before it writes anything (the estimate makes them too):
        the window in seconds and the output files' time to live, or a 400."""
        _check_endpoint(request.endpoint)
        window = self._window_seconds(request.completion_window)
        _check_metadata(request.metadata)
        if request.webhook_url is not None:
            problem = self._batch_webhooks.url_problem(request.webhook_url)
            if problem:
                raise invalid_value(
                    "webhook_url",
                    f"Invalid 'webhook_url': {request.webhook_url[:200]!r} {problem}.",
                )
        output_ttl = None
        if request.output_expires_after is not None:
            output_ttl = expires_after_seconds(
                "output_expires_after", *request.output_expires_after
            )
        return window, output_ttl

    async def get(self, project: str, batch_id: str) -> BatchView:
        return (await self.views([await self._row(project, batch_id)]))[0]

    async def list(
        self, project: str, *, after: str | None, limit: int
    ) -> tuple[list[BatchView], bool]:
        """Newest first."""
        rows, has_more = await batch_store.list_batches(self._db, project, limit=limit, after=after)
        return await self.views(rows), has_more

    async def cancel(self, project: str, batch_id: str) -> BatchView:
        """No new line starts after this; lines already sent may finish (cancel_grace_seconds)."""
        row = await batch_store.request_cancel(self._db, project, batch_id, int(time.time()))
        if row is None:
            raise batch_not_found(batch_id)
        if row.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            raise ApiError(
                409,
                f"Cannot cancel a batch with status '{row.status}'.",
                headers={"x-should-retry": "false"},
            )
        self._wake()
        return (await self.views([row]))[0]

    async def retry(
        self,
        project: str,
        batch_id: str,
        selection: RerunRequest,
        completion_window: str | None = None,
    ) -> BatchView:
        """Run again the lines that did not succeed (or those selected), keeping every other
        result: the batch goes back to in_progress and ends with merged files."""
        row = await self._row(project, batch_id)
        if row.status not in RETRYABLE:
            raise ApiError(
                409,
                f"Cannot retry a batch with status '{row.status}': only a completed, expired "
                "or cancelled batch can be retried.",
                headers={"x-should-retry": "false"},
            )
        if await chunks_of_batches(self._db, [row.id]):
            raise ApiError(
                409,
                "Retry is not yet supported for batches with lines sent through a provider's "
                "Batch API (upstream_batch routes).",
                headers={"x-should-retry": "false"},
            )
        now = int(time.time())
        for name, file_id in (("output", row.output_file_id), ("error", row.error_file_id)):
            if file_id and await get_file(self._db, project, file_id, now) is None:
                raise ApiError(
                    409,
                    f"The {name} file {file_id} of batch {row.id} was deleted or has expired: "
                    "its results cannot be merged with a rerun.",
                    param="batch_id",
                    code="file_not_found",
                    headers={"x-should-retry": "false"},
                )
        window = self._window_seconds(completion_window or row.completion_window)
        rerun = await batch_store.request_rerun(
            self._db, project, row.id, now, selection.dumps(), now + window
        )
        if rerun is None:
            raise ApiError(
                409, "The batch changed while it was being retried; retrieve it and try again."
            )
        self._wake()
        return (await self.views([rerun]))[0]

    async def results(
        self, project: str, batch_id: str, *, output: bool, errors: bool
    ) -> AsyncIterator[bytes]:
        """Result lines committed so far (in input order), or the files of an ended batch."""
        row = await self._row(project, batch_id)
        if row.status in TERMINAL:
            return await results.published(self._db, self._blobs, row, output=output, errors=errors)
        return results.committed(self._db, self._blobs, row.id, output=output, errors=errors)

    async def workers(self, project: str) -> list[WorkerShards]:
        """Workers holding shards now, from the store (any process), grouped by worker."""
        now = time.time()
        by_owner: dict[str, WorkerShards] = {}
        for s in await running_shards(self._db):
            w = by_owner.get(s.owner)
            if w is None:
                w = by_owner[s.owner] = WorkerShards(s.owner, False, 0.0, 0)
            w.shards += 1
            w.lease_expires_at = max(w.lease_expires_at, s.lease_expires_at)
            w.alive = w.alive or s.lease_expires_at >= now
            if s.project == project:
                w.batches[s.batch_id] = w.batches.get(s.batch_id, 0) + 1
            else:
                w.other_shards += 1
        return sorted(by_owner.values(), key=lambda w: (not w.alive, w.worker))

    async def endpoint_of_file(self, project: str, file_id: str) -> str | None:
        """The `url` of the file's first request line: the endpoint a batch of it most likely wants."""
        row = await get_file(self._db, project, file_id, int(time.time()))
        if row is None:
            return None
        return await first_request_url(self._blobs.iter_chunks(row.blob_key))

    async def _row(self, project: str, batch_id: str) -> BatchRow:
        row = await batch_store.get_batch(self._db, project, batch_id)
        if row is None:
            raise batch_not_found(batch_id)
        return row

    async def views(self, rows: list[BatchRow]) -> list[BatchView]:
        running = [r.id for r in rows if r.status not in TERMINAL]
        live = await batch_store.live_counts(self._db, running)
        chunks = await chunks_of_batches(self._db, [r.id for r in rows])
        return [
            BatchView(
                r,
                Counts.of(r) if r.status in TERMINAL else self._running(r.id, live),
                self._currency,
                chunks.get(r.id, []),
            )
            for r in rows
        ]

    def _running(self, batch_id: str, live: dict[str, Counts]) -> Counts:
        """Committed counts, plus the lines this process finished since its last commit."""
        counts = live.get(batch_id) or Counts()
        ok, failed = self._finished(batch_id)
        counts.completed += ok
        counts.failed += failed
        return counts

    def _window_seconds(self, value: str) -> int:
        limits = self._limits
        low = parse_duration(limits.min_completion_window)
        high = parse_duration(limits.max_completion_window)
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = -1
        if not low <= seconds <= high:
            raise invalid_value(
                "completion_window",
                f"Invalid value for 'completion_window': {value!r}. Use a duration such as '24h' "
                f"between {limits.min_completion_window} and {limits.max_completion_window}.",
            )
        return int(seconds)


def batch_not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")


def _check_endpoint(endpoint: str) -> None:
    if endpoint not in ENDPOINTS:
        allowed = ", ".join(f"'{e}'" for e in ENDPOINTS)
        raise invalid_value(
            "endpoint", f"Invalid value: '{endpoint}'. Supported values are: {allowed}."
        )


_JSON_KINDS = {list: "an array", dict: "an object", bool: "a boolean", int: "an integer"}


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16:
        raise _bad_metadata("metadata", "at most 16 key-value pairs are allowed.")
    for key, value in metadata.items():
        if len(key) > 64:
            raise _bad_metadata(
                f"metadata.{key[:64]}", f"key {key[:70]!r} is longer than 64 characters."
            )
        if not isinstance(value, str):
            kind = _JSON_KINDS.get(type(value), "a number" if isinstance(value, float) else "null")
            raise ApiError(
                400,
                f"Invalid type for 'metadata.{key}': expected a string, but got {kind} instead.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if key == "priority" and value not in PRIORITIES:
            raise _bad_metadata(
                "metadata.priority", f"{value!r}. Use one of 'high', 'normal', 'low'."
            )
        if len(value) > 512:
            raise _bad_metadata(
                f"metadata.{key}", "string too long. Expected at most 512 characters."
            )


def _bad_metadata(param: str, problem: str) -> ApiError:
    return invalid_value(param, f"Invalid '{param}': {problem}")
