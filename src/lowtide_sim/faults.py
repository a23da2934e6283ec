"""Latency and injected failures: what a batch engine must survive.

Latency (``--latency-dist fixed|uniform|lognormal``)
    fixed: ``latency_ms`` (+ uniform 0..jitter, the original behaviour);
    uniform: uniform in 0..2*``latency_ms`` (mean ``latency_ms``) + jitter;
    lognormal: median ``latency_ms``, shape ``--latency-sigma`` (default 0.5) + jitter.

Deterministic faults come from the request body (``"model": "sim-missing"``,
``sim_fault``, ``sim_fail_first``) so they happen every time; random ones come
from one draw of the seeded RNG per request (``--rate-*``).
"""

from __future__ import annotations

import math
import random
from typing import Any

from lowtide_sim.config import SimConfig

__all__ = ["DROP", "HANG", "MISSING_MODEL", "delay_ms", "draw_fault", "requested_status"]

MISSING_MODEL = "sim-missing"  # a model id that always answers 404
DROP = "drop"  # close the connection without an HTTP response
HANG = "hang"  # sleep hang_seconds, then answer normally


def delay_ms(cfg: SimConfig, rng: random.Random) -> float:
    """Latency of one request, in milliseconds."""
    if cfg.latency_dist == "uniform":
        delay = rng.uniform(0.0, 2.0 * cfg.latency_ms) if cfg.latency_ms > 0 else 0.0
    elif cfg.latency_dist == "lognormal":
        delay = (
            rng.lognormvariate(math.log(cfg.latency_ms), cfg.latency_sigma)
            if cfg.latency_ms > 0
            else 0.0
        )
    else:
        delay = cfg.latency_ms
    if cfg.latency_jitter_ms:
        delay += rng.uniform(0.0, cfg.latency_jitter_ms)
    return delay


def requested_status(body: dict[str, Any], seen: int) -> int | None:
    """The error status the body asks for on its ``seen``-th receipt, if any."""
    fault = body.get("sim_fault")
    fail_first = body.get("sim_fail_first")
    if isinstance(fail_first, int):
        # Fail only the first N receipts of this exact body (default 500), so
        # retry paths can be tested without randomness.
        fault = (fault if isinstance(fault, int) else 500) if seen <= fail_first else None
    if isinstance(fault, int) and 400 <= fault <= 599:
        return fault
    return None


def draw_fault(cfg: SimConfig, rng: random.Random) -> str | int | None:
    """DROP, HANG, 429, 500/502/503 or None: one draw, mutually exclusive bands of width rate_*."""
    r = rng.random()
    if r < cfg.rate_drop:
        return DROP
    r -= cfg.rate_drop
    if r < cfg.rate_timeout:
        return HANG
    r -= cfg.rate_timeout
    if r < cfg.rate_429:
        return 429
    r -= cfg.rate_429
    if r < cfg.rate_500:
        return rng.choice((500, 502, 503))
    return None
