"""The core's batches and result lines in Anthropic's shapes: MessageBatch and result lines.

The one place that knows how a batch status, its counts and a result line of the output or
error file read in Anthropic's Message Batches API.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from lowtide.api.anthropic.errors import error_type
from lowtide.service import BatchView
from lowtide.vocabulary import TERMINAL, BatchStatus, StopReason

# Error codes of lines that never ran: Anthropic counts and reports them as their own results.
_NOT_RUN = {"batch_cancelled": "canceled", "batch_expired": "expired"}
# Error codes of lines that failed without an answer, as Anthropic's error types.
_CODE_TYPES = {
    "model_not_found": "not_found_error",
    "request_timeout": "timeout_error",
    "connection_error": "api_error",
    "engine_error": "api_error",
}


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def processing_status(status: str) -> str:
    if status in TERMINAL:
        return "ended"
    if status == BatchStatus.CANCELLING:
        return "canceling"
    return "in_progress"


def request_counts(view: BatchView) -> dict[str, int]:
    """They always add up to the total. Lowtide moves lines out of `processing` as they finish
    (Anthropic waits for the whole batch), so a poll shows progress."""
    row, counts = view.row, view.counts
    succeeded = counts.completed
    errored = counts.failed
    canceled = expired = 0
    if row.status == BatchStatus.FAILED:  # refused as a whole: every line errored
        errored = max(row.total - succeeded, errored)
    elif row.status in TERMINAL:
        not_run = max(0, row.total - succeeded - errored)
        if row.stop_reason == StopReason.EXPIRED:
            expired = not_run
        else:
            canceled = not_run
    processing = max(0, row.total - succeeded - errored - canceled - expired)
    return {
        "processing": processing,
        "succeeded": succeeded,
        "errored": errored,
        "canceled": canceled,
        "expired": expired,
    }


def message_batch(view: BatchView, base_url: str) -> dict[str, Any]:
    row = view.row
    ended = row.status in TERMINAL
    ended_at = row.completed_at or row.cancelled_at or row.expired_at or row.failed_at
    return {
        "id": row.id,
        "type": "message_batch",
        "processing_status": processing_status(row.status),
        "request_counts": request_counts(view),
        "ended_at": rfc3339(ended_at) if ended else None,
        "created_at": rfc3339(row.created_at),
        "expires_at": rfc3339(row.expires_at),
        "archived_at": None,
        "cancel_initiated_at": rfc3339(row.cancelling_at),
        "results_url": f"{base_url}/v1/messages/batches/{row.id}/results" if ended else None,
    }


def batch_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def result_line(raw: bytes) -> bytes:
    """A line of the output or error file as a line of Anthropic's results (no newline)."""
    line = orjson.loads(raw)
    return orjson.dumps({"custom_id": line.get("custom_id"), "result": _result(line)})


def _result(line: dict[str, Any]) -> dict[str, Any]:
    response = line.get("response")
    error = line.get("error") or {}
    if isinstance(response, dict):
        status = int(response.get("status_code") or 0)
        body = response.get("body")
        if 200 <= status < 300:
            return {"type": "succeeded", "message": body}
        request_id = response.get("request_id")
        own = body.get("error") if isinstance(body, dict) and body.get("type") == "error" else None
        if isinstance(own, dict):  # an upstream that speaks Anthropic's API said it itself
            detail = {"type": own.get("type") or error_type(status), "message": own.get("message")}
        else:
            message = error.get("message") or f"The request failed with HTTP {status}."
            detail = {"type": error_type(status), "message": message}
        return {"type": "errored", "error": _envelope(detail, request_id)}
    code = error.get("code") or ""
    if code in _NOT_RUN:
        return {"type": _NOT_RUN[code]}
    detail = {
        "type": _CODE_TYPES.get(code, "invalid_request_error"),
        "message": error.get("message") or code,
    }
    return {"type": "errored", "error": _envelope(detail, None)}


def _envelope(detail: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    return {"type": "error", "error": detail, "request_id": request_id}
