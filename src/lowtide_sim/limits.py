"""Provider rate limits (``--rpm N``, ``--tpm N``; 0 = unlimited) and their headers.

Enforced per API key (the bearer token; requests without one share the key
``""``) with two continuously refilling token buckets per key, each holding
one minute's worth (capacity ``rpm`` / ``tpm``, refilled at ``limit/60`` per
second, starting full). A request costs 1 request and ``prompt + max_out``
tokens: ``prompt`` is the simulator's word-count estimate of the input,
``max_out`` is ``max_completion_tokens`` / ``max_tokens`` (``max_output_tokens``
for /v1/responses, 0 for embeddings), 16 when absent. The estimate is charged
at admission and never refunded (like OpenAI). A request that does not fit
gets 429 with the OpenAI envelope (``type`` "requests" or "tokens", code
``rate_limit_exceeded``) plus ``retry-after`` (whole seconds, rounded up) and
``retry-after-ms``: the time until the bucket holds enough. A request costing
more tokens than ``tpm`` can never fit; it gets 429 "Request too large".
Every /v1 POST response carries ``x-ratelimit-{limit,remaining,reset}-
{requests,tokens}`` for each configured limit (``remaining`` rounded down,
``reset`` = time until the bucket is full again, in OpenAI's duration format
such as ``20ms``, ``1s``, ``1m30.5s``, ``6m0s``) unless
``--no-ratelimit-headers``. Changing rpm/tpm at runtime or POST /sim/reset
refills every bucket.

Anthropic's ``POST /v1/messages`` is limited by the same buckets (its key is
``x-api-key``, or the bearer token) but reports them Anthropic's way:
``anthropic-ratelimit-requests-{limit,remaining,reset}`` from ``--rpm`` and
``anthropic-ratelimit-{tokens,input-tokens,output-tokens}-{limit,remaining,reset}``
from ``--tpm`` (the simulator keeps one token bucket for input plus output, so
the three token families report the same bucket); ``reset`` is the RFC 3339
time (UTC, whole seconds, rounded up) when the bucket is full again.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from lowtide_sim.config import SimConfig

__all__ = ["RateLimiter", "Refusal", "format_duration", "format_rfc3339", "limits_on"]

# (type, message, seconds until it would fit)
Refusal = tuple[str, str, float]


def limits_on(cfg: SimConfig) -> bool:
    return cfg.rpm > 0 or cfg.tpm > 0


def format_duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format: ``20ms``, ``1s``, ``1m30.5s``, ``6m0s``, ``1h2m3s``.

    Rounded up to whole milliseconds, so a positive wait never reads as ``0s``.
    """
    ms = math.ceil(seconds * 1000 - 1e-6) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def format_rfc3339(seconds_from_now: float, now: float | None = None) -> str:
    """Anthropic's reset format: the UTC time ``seconds_from_now`` ahead, whole seconds, rounded up."""
    at = (time.time() if now is None else now) + max(0.0, seconds_from_now)
    return datetime.fromtimestamp(math.ceil(at - 1e-6), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimiter:
    """Per-key request and token buckets, each holding one minute's worth, refilling continuously."""

    def __init__(self) -> None:
        # key -> [request level, token level, last refill time]
        self.buckets: dict[str, list[float]] = {}

    def clear(self) -> None:
        self.buckets.clear()

    def _bucket(self, key: str, cfg: SimConfig, now: float) -> list[float]:
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = [float(cfg.rpm), float(cfg.tpm), now]
            return b
        dt = max(0.0, now - b[2])
        b[0] = min(float(cfg.rpm), b[0] + cfg.rpm / 60.0 * dt)
        b[1] = min(float(cfg.tpm), b[1] + cfg.tpm / 60.0 * dt)
        b[2] = now
        return b

    @staticmethod
    def _headers(b: list[float], cfg: SimConfig, anthropic: bool = False) -> dict[str, str]:
        if anthropic:
            return RateLimiter._anthropic_headers(b, cfg)
        headers: dict[str, str] = {}
        for name, limit, level in (("requests", cfg.rpm, b[0]), ("tokens", cfg.tpm, b[1])):
            if limit > 0:
                headers[f"x-ratelimit-limit-{name}"] = str(limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(level + 1e-9)))
                headers[f"x-ratelimit-reset-{name}"] = format_duration(
                    (limit - level) * 60.0 / limit
                )
        return headers

    @staticmethod
    def _anthropic_headers(b: list[float], cfg: SimConfig) -> dict[str, str]:
        headers: dict[str, str] = {}
        now = time.time()
        for names, limit, level in (
            (("requests",), cfg.rpm, b[0]),
            (("tokens", "input-tokens", "output-tokens"), cfg.tpm, b[1]),
        ):
            if limit <= 0:
                continue
            remaining = str(max(0, math.floor(level + 1e-9)))
            reset = format_rfc3339((limit - level) * 60.0 / limit, now)
            for name in names:
                headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{name}-remaining"] = remaining
                headers[f"anthropic-ratelimit-{name}-reset"] = reset
        return headers

    def peek(self, key: str, cfg: SimConfig, anthropic: bool = False) -> dict[str, str]:
        """Current rate-limit headers for ``key`` without charging anything."""
        return self._headers(self._bucket(key, cfg, time.monotonic()), cfg, anthropic)

    def admit(
        self, key: str, tokens: int, cfg: SimConfig, model: str, anthropic: bool = False
    ) -> tuple[dict[str, str], Refusal | None]:
        """Charge one request of ``tokens``; returns (headers, None) or (headers, refusal)."""
        b = self._bucket(key, cfg, time.monotonic())
        refusal: Refusal | None = None
        if cfg.rpm > 0 and b[0] < 1.0 - 1e-9:
            wait = (1.0 - b[0]) * 60.0 / cfg.rpm
            used = cfg.rpm - max(0, math.floor(b[0] + 1e-9))
            refusal = (
                "requests",
                f"Rate limit reached for {model} on requests per min (RPM): Limit {cfg.rpm}, "
                f"Used {used}, Requested 1. Please try again in {format_duration(wait)}.",
                wait,
            )
        elif cfg.tpm > 0 and tokens > cfg.tpm:
            refusal = (
                "tokens",
                f"Request too large for {model} on tokens per min (TPM): Limit {cfg.tpm}, "
                f"Requested {tokens}. The input or output tokens must be reduced in order "
                "to run successfully.",
                (cfg.tpm - b[1]) * 60.0 / cfg.tpm,
            )
        elif cfg.tpm > 0 and b[1] < tokens - 1e-9:
            wait = (tokens - b[1]) * 60.0 / cfg.tpm
            used = cfg.tpm - max(0, math.floor(b[1] + 1e-9))
            refusal = (
                "tokens",
                f"Rate limit reached for {model} on tokens per min (TPM): Limit {cfg.tpm}, "
                f"Used {used}, Requested {tokens}. Please try again in {format_duration(wait)}.",
                wait,
            )
        else:
            if cfg.rpm > 0:
                b[0] -= 1.0
            if cfg.tpm > 0:
                b[1] -= tokens
        return self._headers(b, cfg, anthropic), refusal
