"""The words every layer shares: statuses, endpoints, purposes, priorities.

Statuses are `StrEnum`s, so they are stored, compared and serialised as the plain strings the
wire format uses; the sets below are the only place that says which of them are final.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
UNFINISHED = frozenset(set(BatchStatus) - TERMINAL)
# A batch in one of these may be retried: its lines that did not succeed run again.
RETRYABLE = frozenset({BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
# A batch in one of these may still be cancelled (or expire) and stop early.
STOPPABLE = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})


class StopReason(StrEnum):
    """Why a batch must stop before every line ran; null while it may run on."""

    CANCELLED = "cancelled"
    EXPIRED = "expired"


class ShardStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    # Its lines go to a provider's Batch API: the upstream chunk it belongs to owns them.
    UPSTREAM = "upstream"


# A shard in one of these still has lines for a worker to run.
SHARD_UNFINISHED = (ShardStatus.PENDING, ShardStatus.RUNNING)


class ChunkStatus(StrEnum):
    """An upstream chunk: lines sent together as one provider batch."""

    PENDING = "pending"  # not yet submitted (or to be submitted again)
    SUBMITTED = "submitted"  # the provider batch is recorded: poll it
    DONE = "done"  # its results (and any retry chunk) are committed


class ChunkMode(StrEnum):
    BATCH = "batch"  # through the provider's Batch API
    SYNC = "sync"  # fallback near the deadline: synchronous calls on the same route


class FileStatus(StrEnum):
    """The file object's (deprecated) status: a stored file is always processed."""

    UPLOADED = "uploaded"
    PROCESSED = "processed"
    ERROR = "error"


class FilePurpose(StrEnum):
    ASSISTANTS = "assistants"
    BATCH = "batch"
    FINE_TUNE = "fine-tune"
    VISION = "vision"
    USER_DATA = "user_data"
    EVALS = "evals"
    BATCH_OUTPUT = "batch_output"  # written by Lowtide, never uploaded


UPLOAD_PURPOSES = tuple(p for p in FilePurpose if p is not FilePurpose.BATCH_OUTPUT)

# Endpoints a batch may target, with the body field each requires and its name in messages.
ENDPOINTS = {
    "/v1/chat/completions": ("messages", "Chat Completions"),
    "/v1/completions": ("prompt", "Completions"),
    "/v1/embeddings": ("input", "Embeddings"),
    "/v1/responses": ("input", "Responses"),
    "/v1/messages": ("messages", "Messages"),  # Anthropic's Messages API (Message Batches)
}
DEFAULT_ENDPOINT = "/v1/chat/completions"
# Anthropic's Messages requests: validated per line, as Anthropic does (a bad line fails alone,
# never the batch), and served on any chat engine through a translation.
MESSAGES_ENDPOINT = "/v1/messages"

# A JSONL file may start with a UTF-8 byte-order mark; it is skipped, never an error.
UTF8_BOM = b"\xef\xbb\xbf"

# A batch's share of the engines relative to others (metadata.priority), as fair-queuing weights.
PRIORITIES = {"high": 4.0, "normal": 1.0, "low": 0.25}
DEFAULT_PRIORITY = "normal"

# The project of every request when no API keys are configured.
DEFAULT_PROJECT = "default"

# The events a batch's end sends to webhooks (OpenAI's names), one per terminal status.
WEBHOOK_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
