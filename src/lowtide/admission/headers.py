"""What upstreams say about their limits: x-ratelimit-* (OpenAI's names) or anthropic-ratelimit-*.

Retry-After (and retry-after-ms) is read where the answer is: engines/openai_http.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

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


def parse_reset_time(value: str, now: float | None = None) -> float | None:
    """An RFC 3339 time (Anthropic's ``2025-08-21T12:40:59Z``) -> seconds from now, at least 0."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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


def _reset(headers: Mapping[str, str], openai: str, anthropic: str) -> float | None:
    value = headers.get(openai)
    if value:
        return parse_reset(value)
    value = headers.get(anthropic)
    return parse_reset_time(value) if value else None


def _either(headers: Mapping[str, str], openai: str, anthropic: str) -> float | None:
    value = _number(headers, openai)
    return _number(headers, anthropic) if value is None else value


_A = "anthropic-ratelimit-"
# (OpenAI's name, Anthropic's) of the four numbers admission learns from.
_LIMITS = (
    ("x-ratelimit-limit-requests", _A + "requests-limit"),
    ("x-ratelimit-limit-tokens", _A + "tokens-limit"),
    ("x-ratelimit-remaining-requests", _A + "requests-remaining"),
    ("x-ratelimit-remaining-tokens", _A + "tokens-remaining"),
)

Limits = tuple[float | None, float | None, float | None, float | None]


def read_limits(headers: Mapping[str, str]) -> Limits:
    """(limit_requests, limit_tokens, remaining_requests, remaining_tokens): what admission
    learns from every answer that carries them, without the reset times it does not use
    (parsing those cost more than the rest)."""
    return (
        _either(headers, *_LIMITS[0]),
        _either(headers, *_LIMITS[1]),
        _either(headers, *_LIMITS[2]),
        _either(headers, *_LIMITS[3]),
    )


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitInfo:
    """OpenAI's x-ratelimit-*; where one is absent, Anthropic's anthropic-ratelimit-* instead.

    Anthropic's ``requests-*`` and ``tokens-*`` (its most restrictive token limit in effect)
    fill the same fields; its ``input-tokens-*`` / ``output-tokens-*`` are not used.
    """
    return RateLimitInfo(
        *read_limits(headers),
        reset_requests=_reset(headers, "x-ratelimit-reset-requests", _A + "requests-reset"),
        reset_tokens=_reset(headers, "x-ratelimit-reset-tokens", _A + "tokens-reset"),
    )
