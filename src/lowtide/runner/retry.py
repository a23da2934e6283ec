"""Which failures are worth another try, and how long to wait before it."""

from __future__ import annotations

import random

RETRYABLE_STATUS = frozenset({408, 409, 429})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def backoff_seconds(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; an upstream's Retry-After is a floor, not a hint."""
    delay = random.uniform(0, min(cap, base * (2**attempt)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap * 4))
    return delay
