"""What upstreams say about their limits: x-ratelimit-* (OpenAI's names) and Retry-After."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str) -> float | None:
    """'1s', '6m0s', '20ms', '1m30.5s', or plain seconds -> seconds."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _SECONDS[u] for n, u in parts)


@dataclass(slots=True)
class RateLimitInfo:
    limit_requests: float | None = None
    limit_tokens: float | None = None
    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @property
    def empty(self) -> bool:
        return (
            self.limit_requests is None
            and self.limit_tokens is None
            and self.remaining_requests is None
            and self.remaining_tokens is None
        )


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitInfo:
    reset_r = headers.get("x-ratelimit-reset-requests")
    reset_t = headers.get("x-ratelimit-reset-tokens")
    return RateLimitInfo(
        limit_requests=_number(headers, "x-ratelimit-limit-requests"),
        limit_tokens=_number(headers, "x-ratelimit-limit-tokens"),
        remaining_requests=_number(headers, "x-ratelimit-remaining-requests"),
        remaining_tokens=_number(headers, "x-ratelimit-remaining-tokens"),
        reset_requests=parse_reset(reset_r) if reset_r else None,
        reset_tokens=parse_reset(reset_t) if reset_t else None,
    )
