"""Which failures are worth another try, and how long to wait before it."""

from __future__ import annotations

import random
from typing import Any

RETRYABLE_STATUS = frozenset({408, 409, 429})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def backoff_seconds(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; an upstream's Retry-After is a floor, not a hint."""
    delay = random.uniform(0, min(cap, base * (2**attempt)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap * 4))
    return delay


def route_refusal(route_name: str, status: int, body: Any) -> str | None:
    """Why the upstream refuses the route itself, if it does: a refused key (401), no access
    (403), or no such model (404 about the model; a 404 about the line is the line's)."""
    if status not in (401, 403, 404):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    detail = str(error.get("message") or "") if isinstance(error, dict) else ""
    if status == 404:
        code = str(error.get("code") or "") if isinstance(error, dict) else ""
        lowered = detail.lower()
        about_model = code == "model_not_found" or (
            "model" in lowered and ("not exist" in lowered or "not found" in lowered)
        )
        if not about_model:
            return None
    said = f": {detail[:300]}" if detail else ""
    return f"route '{route_name}': the upstream answered HTTP {status}{said}"
