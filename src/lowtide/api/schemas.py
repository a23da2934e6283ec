"""Documentation-only models: the shapes `api/objects.py` renders, for `/openapi.json`.

The handlers render plain dicts with orjson (fast); these models are never built on the request
path, only turned into JSON Schema. Keep them in step with objects.py: the fuzz test
(tests/test_openapi_fuzz.py) checks every response against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from lowtide.vocabulary import (
    ENDPOINTS,
    PRIORITIES,
    UPLOAD_PURPOSES,
    BatchStatus,
    FilePurpose,
    FileStatus,
)

# OpenAI's expires_after bounds (service/deps.py enforces them): an hour to 30 days.
MIN_TTL_SECONDS, MAX_TTL_SECONDS = 3600, 30 * 86400
Priority = Literal["high", "normal", "low"]
assert set(Priority.__args__) == set(PRIORITIES)  # type: ignore[attr-defined]


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="e.g. invalid_request_error, server_error")
    param: str | None = Field(description="the parameter at fault, when there is one")
    code: str | None = Field(description="a machine-readable code, e.g. invalid_value")


class ErrorResponse(BaseModel):
    """The OpenAI error envelope: every non-2xx answer has this body."""

    error: ErrorDetail


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int = Field(description="Unix seconds")
    expires_at: int | None = Field(description="Unix seconds; null: never expires")
    filename: str
    purpose: FilePurpose
    status: FileStatus = Field(description="deprecated by OpenAI; always 'processed' here")
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str
    line: int | None = Field(description="1-based line of the input file; null: the whole file")
    param: str | None
    message: str


class BatchErrors(BaseModel):
    """Why validation failed (at most `max_errors_reported` entries)."""

    object: Literal["list"]
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchCost(BaseModel):
    """Money, summed over the batch's result lines (live while it runs, final after)."""

    currency: str = Field(description="the server's currency, e.g. 'USD'")
    amount: float = Field(description="what the lines cost at the batch price")
    sync_amount: float = Field(description="the same tokens at the synchronous price")
    saved: float = Field(description="sync_amount - amount")
    no_price_lines: int = Field(
        description="lines that ran on a route without prices: counted at 0 ('no price')"
    )


class UpstreamBatch(BaseModel):
    id: str | None = Field(description="the provider's batch id (null: synchronous fallback)")
    status: str | None = Field(description="the provider batch's status when last polled")
    lines: int
    mode: Literal["batch", "sync"] = Field(
        description="'sync': lines run as synchronous calls near the deadline"
    )


class UpstreamBatches(BaseModel):
    lines_with_provider: int = Field(description="lines in provider batches not yet finished")
    lines_to_submit: int = Field(description="lines waiting to go out in a provider batch")
    batches: list[UpstreamBatch]


class LowtideBatchExtension(BaseModel):
    """Lowtide's extension to the batch object (clients that do not know it ignore it)."""

    priority: Priority = Field(description="metadata.priority, or 'normal'")
    lines_per_second: float | None = Field(description="live rate while the batch runs")
    estimated_finish_at: int | None = Field(description="Unix seconds, while the batch runs")
    paused_reason: str | None = Field(
        description="why the batch's lines are waiting, while they are (e.g. its engine is down)"
    )
    cost: BatchCost
    rerun_lines: int = Field(
        description="lines that ran upstream twice because an early stop discarded their results"
    )
    retries: int = Field(description="times the batch was retried (POST /v1/batches/{id}/retry)")
    upstream_batches: UpstreamBatches | None = Field(
        description="lines sent through the provider's own Batch API (routes with upstream_batch)"
    )
    webhook_url: str | None = Field(
        description="where this batch's end is announced, as asked for at create (webhooks)"
    )


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str = Field(json_schema_extra={"enum": list(ENDPOINTS)})
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = Field(description="null (never '') when there is no output")
    error_file_id: str | None = Field(description="null (never '') when no line failed")
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None
    lowtide: LowtideBatchExtension


class WebhookAttempt(BaseModel):
    at: int = Field(description="Unix seconds when the attempt started")
    status_code: int | None = Field(description="the receiver's HTTP status; null: no answer")
    error: str | None = Field(description="why it did not count as delivered; null: 2xx")
    duration_ms: int


class WebhookDelivery(BaseModel):
    """One batch event sent to one URL (extension): the same `webhook-id` on every attempt."""

    id: str = Field(description="the webhook-id header of every attempt")
    object: Literal["batch.webhook_delivery"]
    batch_id: str
    event_id: str = Field(description="the payload's id (evt_...)")
    event_type: Literal["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
    url: str
    target: str = Field(
        description="whose secret signs it: 'webhooks[N]' (the server's N-th [[webhooks]] "
        "entry) or 'batch' (the batch's webhook_url, [batch_webhooks])"
    )
    status: Literal["pending", "delivered", "failed"]
    next_attempt_at: int | None = Field(description="Unix seconds, while pending")
    last_status: int | None
    last_error: str | None
    created_at: int
    delivered_at: int | None
    attempts: list[WebhookAttempt] = Field(description="oldest first")


class WebhookDeliveryList(BaseModel):
    object: Literal["list"]
    data: list[WebhookDelivery]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ModelExtension(BaseModel):
    endpoints: list[str] = Field(description="the batch endpoints this model serves here")
    engine: Literal["openai", "llamacpp", "embeddings", "echo"]
    pattern: bool = Field(description="the id is a glob that names a family of models")
    upstream_batch: bool = Field(description="lines go through the provider's own Batch API")


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    lowtide: ModelExtension


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EstimateCost(BaseModel):
    """Money for the whole file, at the route prices; a route without prices counts 0."""

    currency: str = Field(description="the server's currency, e.g. 'USD'")
    low: float = Field(
        description="batch price, each line's output at its model's recent average per request "
        "(0 where there is no history)"
    )
    high: float = Field(description="batch price, every line using its whole output limit")
    sync_low: float = Field(description="`low` at the synchronous price")
    sync_high: float = Field(description="`high` at the synchronous price")


class ModelEstimateCost(BaseModel):
    low: float
    high: float


class ModelEstimate(BaseModel):
    model: str = Field(description="the model (past 256 models: their route's name)")
    lines: int
    input_tokens: int
    input_tokens_method: Literal["tokenizer", "approximate"]
    max_output_tokens: int
    expected_output_tokens: int = Field(description="the output `low` assumes")
    cost: ModelEstimateCost
    queued_lines: int = Field(description="lines of running batches ahead on the same route")
    estimated_seconds: float
    throughput: Literal["limits", "history", "default"] = Field(
        description="the speed used: the route's rpm/tpm, its recent batches, or the default"
    )


class BatchEstimate(BaseModel):
    """What a batch of this file would cost and take (extension); nothing is created."""

    object: Literal["batch.estimate"]
    endpoint: str = Field(json_schema_extra={"enum": list(ENDPOINTS)})
    completion_window: str
    lines: int = Field(description="request lines validation would accept")
    invalid_lines: int = Field(
        description="lines validation would refuse (they fail the batch; not counted here)"
    )
    input_tokens: int
    input_tokens_method: Literal["tokenizer", "approximate"] = Field(
        description="'tokenizer': every line counted with its model's own tokenizer, as its "
        "usage will report; 'approximate': ~4 characters a token for some lines"
    )
    max_output_tokens: int = Field(
        description="each line's max_completion_tokens / max_tokens / max_output_tokens (or "
        "its engine's default) times n"
    )
    cost: EstimateCost
    no_price_models: list[str] = Field(description="models on a route without prices")
    estimated_seconds: float = Field(
        description="from validation to the last line, the work queued ahead included"
    )
    fits_window: bool = Field(description="estimated_seconds <= completion_window")
    models: list[ModelEstimate]


# The JSON Schema of a batch's `metadata` as the service checks it (service/batches.py).
METADATA_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "maxProperties": 16,
            "propertyNames": {"maxLength": 64},
            "properties": {"priority": {"type": "string", "enum": list(PRIORITIES)}},
            "additionalProperties": {"type": "string", "maxLength": 512},
        },
        {"type": "null"},
    ],
    "description": "Up to 16 string pairs (keys <= 64 chars, values <= 512). Extension: "
    "'priority' ('high', 'normal', 'low') weighs the batch's share of the engines.",
}

# POST /v1/files: the form the handler streams itself (api/uploads.py), so FastAPI cannot see it.
UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "For purpose 'batch': JSONL, one request object a line.",
                    },
                    "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {
                        "type": "integer",
                        "minimum": MIN_TTL_SECONDS,
                        "maximum": MAX_TTL_SECONDS,
                    },
                },
                "dependentRequired": {
                    "expires_after[anchor]": ["expires_after[seconds]"],
                    "expires_after[seconds]": ["expires_after[anchor]"],
                },
            }
        }
    },
}

IDEMPOTENCY_KEY_HEADER: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Extension: a retried create with the same key returns the first batch; "
    "the same key with different parameters is a 409.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
FILE_CONTENT: dict[str, Any] = {
    "description": "The file's bytes (JSONL for batch files)",
    "content": {"application/jsonl": _BINARY, "application/octet-stream": _BINARY},
}


class _UsageResult(BaseModel):
    num_model_requests: int
    input_tokens: int
    project_id: str | None = Field(description="set when grouped by project_id")
    user_id: None
    api_key_id: None
    model: str | None = Field(description="set when grouped by model")


class CompletionsUsageResult(_UsageResult):
    object: Literal["organization.usage.completions.result"]
    output_tokens: int
    input_cached_tokens: int
    input_audio_tokens: int
    output_audio_tokens: int
    batch: bool = Field(description="always true: every Lowtide line is a batch line")


class EmbeddingsUsageResult(_UsageResult):
    object: Literal["organization.usage.embeddings.result"]


class CostAmount(BaseModel):
    value: float
    currency: str = Field(description="the server's currency, lower case (e.g. 'usd')")


class CostLowtide(BaseModel):
    sync_value: float = Field(description="the same tokens at the synchronous price")
    saved: float


class CostsResult(BaseModel):
    object: Literal["organization.costs.result"]
    amount: CostAmount
    line_item: str | None = Field(description="the model, when grouped by line_item")
    project_id: str | None
    lowtide: CostLowtide


def _bucket_page(result: type[BaseModel], name: str) -> type[BaseModel]:
    bucket = create_model(
        f"{name}Bucket",
        object=(Literal["bucket"], ...),
        start_time=(int, ...),
        end_time=(int, ...),
        results=(list[result], ...),  # type: ignore[valid-type]
    )
    return create_model(
        f"{name}Page",
        object=(Literal["page"], ...),
        data=(list[bucket], ...),  # type: ignore[valid-type]
        has_more=(bool, ...),
        next_page=(str | None, ...),
    )


CompletionsUsagePage = _bucket_page(CompletionsUsageResult, "CompletionsUsage")
EmbeddingsUsagePage = _bucket_page(EmbeddingsUsageResult, "EmbeddingsUsage")
CostsPage = _bucket_page(CostsResult, "Costs")


JSONL_BODY: dict[str, Any] = {
    "type": "string",
    "description": "JSON lines in the output/error file format: "
    '{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, '
    '"error": {"code", "message"} | null}',
}

_ERROR_DESCRIPTIONS = {
    400: "Invalid parameters or body",
    401: "API key missing or wrong",
    404: "No such object in this project",
    409: "Conflict with the object's state",
    413: "Request body too large",
}


def responses(
    ok: type[BaseModel] | dict[str, Any] | None, *errors: int | tuple[int, str]
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: its 200 (a model, or an OpenAPI response) and its errors."""
    out: dict[int | str, dict[str, Any]] = {}
    if isinstance(ok, dict):
        out[200] = ok
    elif ok is not None:
        out[200] = {"model": ok}
    for error in errors:
        status, text = error if isinstance(error, tuple) else (error, _ERROR_DESCRIPTIONS[error])
        out[status] = {"model": ErrorResponse, "description": text}
    return out
