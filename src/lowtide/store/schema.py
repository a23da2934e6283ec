"""Tables. Shards, not requests, are rows: a 5M-line batch is a few thousand rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    or_,
)

from lowtide.store.rows import COUNT_COLUMNS, MONEY_COLUMNS

metadata = MetaData()


def one_of(column: Any, values: Any) -> Any:
    """`column IN (values)` for a fixed set of constants, written as ORs (both databases plan
    them as IN): a literal IN list is an "expanding" parameter that SQLAlchemy rewrites on every
    execution, ~50 us of CPU on the queries every worker runs on every tick."""
    return or_(*(column == value for value in values))


def _count_columns(lines_type: type[Integer]) -> list[Column[Any]]:
    """Line counts (`lines_type`), token sums and money: one set per shard, one per batch."""
    lines = ("completed", "failed", "unpriced", "rerun_lines")

    def kind(name: str) -> Any:
        if name in MONEY_COLUMNS:
            return Float
        return lines_type if name in lines else BigInteger

    return [
        Column(name, kind(name), nullable=False, default=0, server_default="0")
        for name in COUNT_COLUMNS
    ]


files = Table(
    "files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project", String(128), nullable=False),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("blob_key", Text, nullable=False),
    # Deleted files vanish from the API at once; the sweeper removes the blob once no
    # unfinished batch still reads it.
    Column("deleted_at", BigInteger, nullable=True),
    Index("ix_files_project_seq", "project", "seq"),
    Index("ix_files_expires_at", "expires_at"),
)

batches = Table(
    "batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project", String(128), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger),
    Column("expires_at", BigInteger),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors", Text),
    Column("metadata", Text),
    Column("output_expires_seconds", BigInteger),
    Column("model", Text),
    # Why the batch must stop early (a StopReason); null while it may run on.
    Column("stop_reason", String(16)),
    # Share of the engines relative to other batches: 'high' | 'normal' | 'low' (from metadata).
    Column("priority", String(8), nullable=False, server_default="normal"),
    Column("total", BigInteger, nullable=False, default=0),
    # Input tokens of its lines, estimated at validation: what the enqueued-token budget weighs.
    Column("estimated_tokens", BigInteger, nullable=False, default=0, server_default="0"),
    # Final counts and usage, written once at finalize; while running they are summed from shards.
    *_count_columns(BigInteger),
    # Lease for the batch-level tasks (validation, finalize): owner, expiry, fencing number.
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Column("lease_epoch", BigInteger, nullable=False, default=0),
    # Why the batch's lines wait while it runs (e.g. the upstream refuses a route); null if not.
    Column("paused_reason", Text),
    # Reruns so far (POST /v1/batches/{id}/retry), and the lines a pending one selected (JSON).
    Column("retries", Integer, nullable=False, default=0, server_default="0"),
    Column("retry_request", Text),
    # The client's Idempotency-Key header: a retried create returns the batch it made first.
    Column("idempotency_key", String(255)),
    # Extension: where this batch's end is announced too (webhooks outbox, below).
    Column("webhook_url", Text),
    Index("ix_batches_project_seq", "project", "seq"),
    Index("ux_batches_project_idempotency_key", "project", "idempotency_key", unique=True),
    Index("ix_batches_status", "status"),
)

shards = Table(
    "shards",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("first_request", BigInteger, nullable=False),
    Column("request_count", Integer, nullable=False),
    Column("first_line", BigInteger, nullable=False),
    Column("byte_start", BigInteger, nullable=False),
    Column("byte_end", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # a ShardStatus
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Column("lease_epoch", BigInteger, nullable=False, default=0),
    # Requests [0, committed) of this shard have results in committed segments.
    Column("committed", Integer, nullable=False, default=0),
    # The upstream chunk its lines go out in (status 'upstream'); null for lines run here.
    Column("chunk", Integer),
    # In a rerun: per line, the earlier result to keep or a mark to run it again (rerun.py).
    Column("prev_key", Text),
    *_count_columns(Integer),
    Index("ix_shards_status", "status", "batch_id"),
)

# Lines of a batch sent together as one provider batch (a route with upstream_batch = true).
# A first-generation chunk's lines are those of the shards that name it; a retry chunk's lines
# are in its own blob. Results are committed once, with the chunk's move to 'done'.
upstream_chunks = Table(
    "upstream_chunks",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("route", String(255), nullable=False),
    Column("generation", Integer, nullable=False, default=0),  # retries so far
    Column("mode", String(8), nullable=False),  # a ChunkMode
    Column("status", String(16), nullable=False),  # a ChunkStatus
    Column("line_count", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("source_key", Text),  # retry chunks: "<index>\t<request line>" per line
    Column("created_at", BigInteger, nullable=False),
    # The provider's side, recorded as soon as known so a restart never submits twice.
    Column("provider_file_id", String(255)),
    Column("provider_batch_id", String(255)),
    Column("provider_status", String(32)),
    Column("create_sent_at", Float),  # a create may have reached the provider: look it up first
    Column("cancel_sent_at", Float),
    Column("fallback", Integer, nullable=False, default=0),  # unfinished lines go synchronous
    Column("attempts", Integer, nullable=False, default=0),  # creates refused, polls unchanged
    Column("next_at", Float),  # act again no earlier than this
    Column("result_key", Text),  # committed results, in the segment format
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Column("lease_epoch", BigInteger, nullable=False, default=0),
    *_count_columns(Integer),
    Index("ix_upstream_chunks_status", "status", "next_at"),
)

segments = Table(
    "segments",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("shard_idx", Integer, primary_key=True, autoincrement=False),
    Column("first", Integer, primary_key=True, autoincrement=False),
    Column("count", Integer, nullable=False),
    Column("blob_key", Text, nullable=False),
)


def count_sums(table: Table) -> list[Any]:
    """SUM of each count column over shards or chunks (0 where none): with the other, a batch's
    counts while it runs."""
    return [func.coalesce(func.sum(table.c[name]), 0).label(name) for name in COUNT_COLUMNS]


# What each project used and spent, a row per UTC day, model and endpoint: written with each
# segment commit (same transaction), read by the organization usage and costs endpoints and
# by the daily budgets.
usage_daily = Table(
    "usage_daily",
    metadata,
    Column("project", String(128), primary_key=True),
    Column("day", BigInteger, primary_key=True, autoincrement=False),  # unix time of 00:00 UTC
    Column("model", String(255), primary_key=True),
    Column("endpoint", String(64), primary_key=True),
    Column("requests", BigInteger, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("cost", Float, nullable=False, default=0),
    Column("sync_cost", Float, nullable=False, default=0),
    Index("ix_usage_daily_day", "day"),
)


# The webhooks outbox. An event is written in the same transaction as the terminal status it
# announces (store/segments.publish_batch, store/batches.finish_validation); a worker then fans
# it out to one delivery per target (a [[webhooks]] entry, the batch's own webhook_url).
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", String(64), primary_key=True),  # evt_...
    Column("batch_id", String(64), nullable=False),
    Column("project", String(128), nullable=False),
    Column("type", String(32), nullable=False),  # batch.completed | failed | expired | cancelled
    Column("created_at", BigInteger, nullable=False),
    Column("fanned_out", Integer, nullable=False, default=0, server_default="0"),
    Index("ix_webhook_events_fanned_out", "fanned_out"),
)

# One event to one URL: claimed under a fenced lease for each attempt, like a shard.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(64), primary_key=True),  # the webhook-id header, on every attempt
    Column("event_id", String(64), nullable=False),
    Column("batch_id", String(64), nullable=False),
    Column("url", Text, nullable=False),
    # Whose secret signs it: a [[webhooks]] index ("0", "1", ...) or "batch" ([batch_webhooks]).
    Column("target", String(16), nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("retry_from", BigInteger, nullable=False),  # retries stop a window after this
    Column("next_attempt_at", Float, nullable=False),
    Column("last_status", Integer),  # the receiver's HTTP status; null: no answer
    Column("last_error", Text),
    Column("created_at", BigInteger, nullable=False),
    Column("delivered_at", BigInteger),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Column("lease_epoch", BigInteger, nullable=False, default=0),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_batch", "batch_id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Column("status_code", Integer),  # null: no HTTP answer (timeout, connection error)
    Column("error", Text),
    Column("duration_ms", Integer, nullable=False),
    Index("ix_webhook_attempts_delivery", "delivery_id", "seq"),
)
