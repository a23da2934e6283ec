"""Service records rendered as the OpenAI FileObject and Batch object, field by field."""

from __future__ import annotations

from typing import Any

import orjson

from lowtide.service import BatchView, FileRow
from lowtide.service.webhooks import BATCH_TARGET, DeliveryView
from lowtide.vocabulary import TERMINAL, ChunkMode, FileStatus


def file_object(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": FileStatus.PROCESSED,
        "status_details": None,
    }


def batch_object(view: BatchView) -> dict[str, Any]:
    row, counts = view.row, view.counts
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "model": row.model,
        "errors": orjson.loads(row.errors) if row.errors else None,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": row.created_at,
        "in_progress_at": row.in_progress_at,
        "expires_at": row.expires_at,
        "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at,
        "failed_at": row.failed_at,
        "expired_at": row.expired_at,
        "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {
            "total": row.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "usage": {
            "input_tokens": counts.input_tokens,
            "input_tokens_details": {"cached_tokens": counts.cached_tokens},
            "output_tokens": counts.output_tokens,
            "output_tokens_details": {"reasoning_tokens": counts.reasoning_tokens},
            "total_tokens": counts.input_tokens + counts.output_tokens,
        },
        "metadata": orjson.loads(row.metadata) if row.metadata else None,
        # Extension (an extra field; clients ignore it): priority, live rate, estimated finish,
        # and why the lines wait, if they do.
        "lowtide": {
            "priority": row.priority,
            "lines_per_second": view.lines_per_second,
            "estimated_finish_at": view.estimated_finish_at,
            "paused_reason": row.paused_reason if row.status not in TERMINAL else None,
            "cost": {
                "currency": view.currency,
                "amount": counts.cost,
                "sync_amount": counts.sync_cost,
                "saved": counts.sync_cost - counts.cost,
                "no_price_lines": counts.unpriced,
            },
            "rerun_lines": counts.rerun_lines,
            "retries": row.retries,
            # Lines that go through the provider's own Batch API (upstream_batch routes).
            "upstream_batches": {
                "lines_with_provider": view.lines_with_provider,
                "lines_to_submit": view.lines_to_submit,
                "batches": [
                    {
                        "id": c.provider_batch_id,
                        "status": c.provider_status,
                        "lines": c.line_count,
                        "mode": c.mode,
                    }
                    for c in view.chunks
                    if c.provider_batch_id is not None or c.mode == ChunkMode.SYNC
                ],
            }
            if view.chunks
            else None,
            "webhook_url": row.webhook_url,
        },
    }


def webhook_delivery_object(view: DeliveryView) -> dict[str, Any]:
    d = view.delivery
    return {
        "id": d.id,
        "object": "batch.webhook_delivery",
        "batch_id": d.batch_id,
        "event_id": d.event_id,
        "event_type": view.event_type,
        "url": d.url,
        "target": d.target if d.target == BATCH_TARGET else f"webhooks[{d.target}]",
        "status": d.status,
        "next_attempt_at": int(d.next_attempt_at) if d.status == "pending" else None,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": d.created_at,
        "delivered_at": d.delivered_at,
        "attempts": [
            {
                "at": int(a.at),
                "status_code": a.status_code,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }
            for a in view.attempts
        ],
    }


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
