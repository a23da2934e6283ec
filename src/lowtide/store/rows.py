"""Rows as typed records: what the store hands up and takes back, field for column."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Self

from sqlalchemy.engine import Row

from lowtide.vocabulary import (
    DEFAULT_PRIORITY,
    BatchStatus,
    ChunkMode,
    ChunkStatus,
    ShardStatus,
    StopReason,
)


@dataclass(slots=True)
class Usage:
    """Tokens, as a response reports them (and as the batch object sums them). Positional
    too: one is built for every answer."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(slots=True, kw_only=True)
class Counts(Usage):
    """Lines and tokens: summed over a segment, a shard, or a whole batch. Shard and batch rows
    carry them as columns of the same names."""

    completed: int = 0
    failed: int = 0
    # Money, in the server's currency: what the lines cost at the batch price and what the same
    # tokens cost at the synchronous price; lines that ran on a route without prices.
    cost: float = 0.0
    sync_cost: float = 0.0
    unpriced: int = 0
    # Lines whose results were lost to an early stop (lease lost, shutdown) and ran again: paid
    # twice upstream, not in the files.
    rerun_lines: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            **{name: getattr(self, name) + getattr(other, name) for name in COUNT_COLUMNS}
        )

    @classmethod
    def of(cls, source: Any) -> Counts:
        """The counts of anything that has them as attributes (a row, a result row)."""
        return cls(**{name: _CASTS[name](getattr(source, name) or 0) for name in COUNT_COLUMNS})


COUNT_COLUMNS = tuple(f.name for f in fields(Counts))
MONEY_COLUMNS = ("cost", "sync_cost")
_CASTS = {name: float if name in MONEY_COLUMNS else int for name in COUNT_COLUMNS}


class _Record:
    """from_row / values shared by every row type (columns and fields have the same names)."""

    __slots__ = ()

    @classmethod
    def from_row(cls, row: Row[Any]) -> Self:
        return cls(**row._mapping)

    def values(self) -> dict[str, Any]:
        """Column values for an insert; `seq` is left to the database."""
        names = (f.name for f in fields(self))  # type: ignore[arg-type]
        return {name: getattr(self, name) for name in names if name != "seq"}


@dataclass(slots=True, kw_only=True)
class FileRow(_Record):
    id: str
    project: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None
    blob_key: str
    deleted_at: int | None = None
    seq: int | None = None

    def visible(self, now: int) -> bool:
        """Not deleted and not expired: what the API may show."""
        return self.deleted_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(slots=True, kw_only=True)
class BatchRow(Counts, _Record):
    id: str
    project: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: str | None = None  # JSON: {"object": "list", "data": [...]}
    metadata: str | None = None  # JSON object, as the client sent it
    output_expires_seconds: int | None = None
    model: str | None = None
    stop_reason: StopReason | None = None
    priority: str = DEFAULT_PRIORITY
    total: int = 0
    estimated_tokens: int = 0
    # The counts (inherited) are final, written once at finalize; while the batch runs they
    # are summed from its shards.
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    lease_epoch: int = 0
    idempotency_key: str | None = None
    paused_reason: str | None = None
    webhook_url: str | None = None  # extension: this batch's end is announced here too
    retries: int = 0
    retry_request: str | None = None  # the selection of a rerun not yet planned (JSON)
    seq: int | None = None

    def __post_init__(self) -> None:
        self.status = BatchStatus(self.status)
        if self.stop_reason is not None:
            self.stop_reason = StopReason(self.stop_reason)


@dataclass(slots=True, kw_only=True)
class ShardRow(Counts, _Record):
    """A run of consecutive input lines: the unit of work, of leases and of recovery."""

    batch_id: str
    idx: int
    first_request: int
    request_count: int
    first_line: int
    byte_start: int
    byte_end: int
    status: ShardStatus = ShardStatus.PENDING
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    lease_epoch: int = 0
    committed: int = 0  # requests [0, committed) have results in committed segments
    chunk: int | None = None  # the upstream chunk that owns its lines (status 'upstream')
    prev_key: str | None = None  # a rerun's previous results (runner/rerun.py)


@dataclass(slots=True, kw_only=True)
class ChunkRow(Counts, _Record):
    """Lines of one batch and one route, sent as one provider batch (see schema.upstream_chunks)."""

    batch_id: str
    idx: int
    route: str
    mode: ChunkMode
    status: ChunkStatus
    line_count: int
    bytes: int
    created_at: int
    generation: int = 0
    source_key: str | None = None
    provider_file_id: str | None = None
    provider_batch_id: str | None = None
    provider_status: str | None = None
    create_sent_at: float | None = None
    cancel_sent_at: float | None = None
    fallback: int = 0
    attempts: int = 0
    next_at: float | None = None
    result_key: str | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    lease_epoch: int = 0

    def __post_init__(self) -> None:
        self.mode = ChunkMode(self.mode)
        self.status = ChunkStatus(self.status)

    @property
    def key(self) -> str:
        """What Lowtide puts in the provider batch's metadata to find it again after a crash."""
        return f"{self.batch_id}/{self.idx}"


@dataclass(slots=True, kw_only=True)
class SegmentRow(_Record):
    batch_id: str
    shard_idx: int
    first: int
    count: int
    blob_key: str
