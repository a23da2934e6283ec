"""What the pages show, computed from the service's records: progress, times, error groups."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from lowtide.errors import ApiError
from lowtide.service import BatchService, BatchView
from lowtide.vocabulary import RETRYABLE, STOPPABLE, TERMINAL, BatchStatus

# The status filter of the batches page: "active" is every status that may still change.
ACTIVE = (
    BatchStatus.VALIDATING,
    BatchStatus.IN_PROGRESS,
    BatchStatus.FINALIZING,
    BatchStatus.CANCELLING,
)
STATUS_FILTERS = ["all", "active", *(s.value for s in BatchStatus)]

# The stamps of a batch's life, in the order they happen.
TIMELINE = (
    "created_at",
    "in_progress_at",
    "finalizing_at",
    "cancelling_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelled_at",
)

ERROR_LINES_READ = 2000  # error-file lines read to group errors; never more
ERROR_BYTES_READ = 4 * 1024 * 1024
SAMPLES_PER_CODE = 3


def matches(view: BatchView, status: str) -> bool:
    if status == "all":
        return True
    if status == "active":
        return view.row.status in ACTIVE
    return view.row.status == status


def batch_summary(view: BatchView) -> dict[str, Any]:
    row, counts = view.row, view.counts
    done = counts.completed + counts.failed
    total = row.total or 0
    terminal = row.status in TERMINAL
    percent = min(100.0, 100.0 * done / total) if total else (100.0 if terminal else 0.0)
    ended_at = row.completed_at or row.failed_at or row.expired_at or row.cancelled_at
    eta = view.estimated_finish_at
    return {
        "id": row.id,
        "status": row.status,
        "endpoint": row.endpoint,
        "model": row.model,
        "total": total,
        "completed": counts.completed,
        "failed": counts.failed,
        "done": done,
        "percent": percent,
        "rate": view.lines_per_second,
        "eta": eta,
        "eta_in": max(0, eta - int(time.time())) if eta else None,
        "cost": counts.cost,
        "unpriced": counts.unpriced,
        "currency": view.currency,
        "created_at": row.created_at,
        "ended_at": ended_at,
        "terminal": terminal,
        "cancellable": row.status in STOPPABLE,
        "retryable": row.status in RETRYABLE,
        "retries": row.retries,
        "paused_reason": row.paused_reason if not terminal else None,
        "input_file_id": row.input_file_id,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "input_tokens": counts.input_tokens,
        "output_tokens": counts.output_tokens,
        "timeline": [
            (name.removesuffix("_at"), getattr(row, name))
            for name in TIMELINE
            if getattr(row, name, None)
        ]
        + [("expires", row.expires_at)],
        "metadata": orjson.loads(row.metadata) if row.metadata else None,
    }


@dataclass
class ErrorGroup:
    code: str
    count: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ErrorReport:
    source: str  # "validation", "error file", "errors so far"
    groups: list[ErrorGroup]
    lines_read: int = 0
    truncated: bool = False  # stopped before the end: counts are of the lines read
    unavailable: str | None = None  # why the error lines could not be read


def validation_errors(raw: str | None) -> ErrorReport | None:
    """`batch.errors` grouped by code, each with its first lines (1-based line numbers)."""
    if not raw:
        return None
    data = orjson.loads(raw)
    items = data.get("data", []) if isinstance(data, dict) else data
    groups: dict[str, ErrorGroup] = {}
    for item in items:
        code = str(item.get("code") or "error")
        group = groups.setdefault(code, ErrorGroup(code))
        group.count += 1
        if len(group.samples) < SAMPLES_PER_CODE:
            group.samples.append(
                {
                    "line": item.get("line"),
                    "param": item.get("param"),
                    "message": _short(item.get("message")),
                }
            )
    ordered = sorted(groups.values(), key=lambda g: -g.count)
    return ErrorReport("validation", ordered, lines_read=len(items))


async def error_file_groups(service: BatchService, project: str, view: BatchView) -> ErrorReport:
    """The batch's error lines (its error file once ended, committed lines while it runs),
    grouped by `error.code` with a few samples each; reads at most ERROR_LINES_READ lines."""
    source = "error file" if view.row.status in TERMINAL else "errors so far"
    try:
        chunks = await service.results(project, view.row.id, output=False, errors=True)
    except ApiError as exc:
        return ErrorReport(source, [], unavailable=exc.message)
    groups: dict[str, ErrorGroup] = {}
    number, size, truncated = 0, 0, False
    pending = b""
    try:
        async for chunk in chunks:
            size += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                number += 1
                _add_error_line(groups, number, line)
                if number >= ERROR_LINES_READ:
                    break
            if number >= ERROR_LINES_READ or size >= ERROR_BYTES_READ:
                truncated = True
                break
        else:
            if pending.strip() and number < ERROR_LINES_READ:
                number += 1
                _add_error_line(groups, number, pending)
    finally:
        await _close(chunks)
    ordered = sorted(groups.values(), key=lambda g: -g.count)
    return ErrorReport(source, ordered, lines_read=number, truncated=truncated)


def _add_error_line(groups: dict[str, ErrorGroup], number: int, line: bytes) -> None:
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError:
        item = {}
    error = item.get("error") if isinstance(item, dict) else None
    response = item.get("response") if isinstance(item, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if not code and isinstance(response, dict):
        code = f"http_{response.get('status_code')}"
    code = str(code or "unknown")
    group = groups.setdefault(code, ErrorGroup(code))
    group.count += 1
    if len(group.samples) < SAMPLES_PER_CODE:
        group.samples.append(
            {
                "line": number,
                "custom_id": item.get("custom_id") if isinstance(item, dict) else None,
                "message": _short(error.get("message") if isinstance(error, dict) else None),
            }
        )


async def _close(chunks: AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


def _short(text: Any, limit: int = 300) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- filters for the templates --------------------------------------------------------------
def fmt_time(ts: float | None) -> str:
    if not ts:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def fmt_money(amount: float | None, currency: str = "USD") -> str:
    if amount is None:
        return "—"
    if amount and abs(amount) < 0.01:
        return f"{amount:.4f} {currency}"
    return f"{amount:,.2f} {currency}"
