"""Rows from the store rendered as the OpenAI FileObject and Batch object, field by field."""

from __future__ import annotations

import time
from typing import Any

import orjson

from lowtide.store.batches import TERMINAL


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


def batch_object(row: dict[str, Any], progress: dict[str, int] | None = None) -> dict[str, Any]:
    counts = row if row["status"] in TERMINAL or progress is None else {**row, **progress}
    input_tokens = int(counts.get("input_tokens") or 0)
    output_tokens = int(counts.get("output_tokens") or 0)
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"],
        "errors": orjson.loads(row["errors"]) if row["errors"] else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        "in_progress_at": row["in_progress_at"],
        "expires_at": row["expires_at"],
        "finalizing_at": row["finalizing_at"],
        "completed_at": row["completed_at"],
        "failed_at": row["failed_at"],
        "expired_at": row["expired_at"],
        "cancelling_at": row["cancelling_at"],
        "cancelled_at": row["cancelled_at"],
        "request_counts": {
            "total": int(row["total"] or 0),
            "completed": int(counts.get("completed") or 0),
            "failed": int(counts.get("failed") or 0),
        },
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": int(counts.get("cached_tokens") or 0)},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": int(counts.get("reasoning_tokens") or 0)},
            "total_tokens": input_tokens + output_tokens,
        },
        "metadata": orjson.loads(row["metadata"]) if row["metadata"] else None,
        # Extension (an extra field; clients ignore it): priority, live rate and estimated finish.
        "lowtide": _progress_extension(row, counts),
    }


def _progress_extension(row: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
    total = int(row["total"] or 0)
    rate = eta = None
    started = row["in_progress_at"]
    if row["status"] in ("in_progress", "finalizing") and started and done:
        now = time.time()
        rate = done / max(now - started, 1e-3)
        eta = int(now + (total - done) / rate) if rate > 0 else None
    return {
        "priority": row.get("priority") or "normal",
        "lines_per_second": rate,
        "estimated_finish_at": eta,
    }


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
