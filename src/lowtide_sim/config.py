"""Every option of the simulator: the config object, its command-line flags, runtime changes."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["LATENCY_DISTS", "RUNTIME_FIELDS", "SimConfig", "apply_updates", "parse_args"]

LATENCY_DISTS = ("fixed", "uniform", "lognormal")


@dataclass
class SimConfig:
    """Every option of the simulator; CLI flags map 1:1 onto these fields."""

    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    seed: int | None = None
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_drop: float = 0.0
    hang_seconds: float = 30.0
    retry_after: str = "0"
    require_key: str | None = None
    embedding_dim: int = 8
    models: list[str] = field(default_factory=lambda: ["sim-model"])
    rpm: int = 0
    tpm: int = 0
    no_ratelimit_headers: bool = False
    capacity_tokens_per_s: float = 0.0
    max_tokens_per_s_per_request: float = 50.0
    max_running: int = 0
    prefill_tokens_per_s: float = 0.0
    prefix_cache_tokens: int = 0
    latency_dist: str = "fixed"
    latency_sigma: float = 0.5
    # Files + Batch API (batches.py)
    batch_turnaround_seconds: float = 1.0
    batch_lines_per_second: float = 0.0
    batch_cancel_seconds: float = 0.2
    batch_rate_500: float = 0.0
    batch_rate_expired: float = 0.0
    batch_rate_drop: float = 0.0
    batch_max_lines: int = 0
    batch_token_limit: int = 0


# Options that POST /sim/config may change while the server runs.
RUNTIME_FIELDS = frozenset(
    {
        "latency_ms",
        "latency_jitter_ms",
        "seed",
        "rate_429",
        "rate_500",
        "rate_timeout",
        "rate_drop",
        "hang_seconds",
        "retry_after",
        "rpm",
        "tpm",
        "no_ratelimit_headers",
        "capacity_tokens_per_s",
        "max_tokens_per_s_per_request",
        "max_running",
        "prefill_tokens_per_s",
        "prefix_cache_tokens",
        "latency_dist",
        "latency_sigma",
        "require_key",
        "batch_turnaround_seconds",
        "batch_lines_per_second",
        "batch_cancel_seconds",
        "batch_rate_500",
        "batch_rate_expired",
        "batch_rate_drop",
        "batch_max_lines",
        "batch_token_limit",
    }
)
RATE_FIELDS = (
    "rate_429",
    "rate_500",
    "rate_timeout",
    "rate_drop",
    "batch_rate_500",
    "batch_rate_expired",
    "batch_rate_drop",
)
INT_FIELDS = (
    "rpm",
    "tpm",
    "max_running",
    "prefix_cache_tokens",
    "batch_max_lines",
    "batch_token_limit",
)
ENGINE_FIELDS = ("capacity_tokens_per_s", "max_tokens_per_s_per_request", "max_running")


# ---------------------------------------------------------------- runtime changes


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number")
    if not math.isfinite(value) or value < 0 or (name in RATE_FIELDS and value > 1):
        raise ValueError(f"{name} out of range: {value}")
    return value


def apply_updates(cfg: SimConfig, updates: dict[str, Any]) -> None:
    """Validate and apply runtime updates (all or none); raises ValueError on bad input."""
    unknown = set(updates) - RUNTIME_FIELDS
    if unknown:
        raise ValueError(f"not changeable at runtime: {sorted(unknown)}")
    checked: dict[str, Any] = {}
    for name, value in updates.items():
        if name == "retry_after":
            checked[name] = str(value)
        elif name == "seed":
            checked[name] = None if value is None else int(value)
        elif name == "require_key":  # a key rotated (or revoked) upstream
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or null")
            checked[name] = value
        elif name == "latency_dist":
            if value not in LATENCY_DISTS:
                raise ValueError(f"latency_dist must be one of {list(LATENCY_DISTS)}")
            checked[name] = value
        elif name == "no_ratelimit_headers":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            checked[name] = value
        elif name in INT_FIELDS:
            number = _check_number(name, value)
            if number != int(number):
                raise ValueError(f"{name} must be a whole number")
            checked[name] = int(number)
        else:
            checked[name] = float(_check_number(name, value))
    for name, value in checked.items():
        setattr(cfg, name, value)


# ---------------------------------------------------------------- command line


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"rate must be within 0..1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> SimConfig:
    defaults = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m lowtide_sim",
        description="Simulated OpenAI-compatible and Anthropic Messages upstream, with faults.",
    )
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    p.add_argument("--latency-jitter-ms", type=float, default=defaults.latency_jitter_ms)
    p.add_argument(
        "--latency-dist",
        choices=LATENCY_DISTS,
        default=defaults.latency_dist,
        help="fixed: latency-ms; uniform: 0..2*latency-ms; lognormal: median latency-ms",
    )
    p.add_argument(
        "--latency-sigma",
        type=_non_negative,
        default=defaults.latency_sigma,
        help="shape of the lognormal latency",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--rate-429", type=_rate, default=0.0)
    p.add_argument("--rate-500", type=_rate, default=0.0, help="500/502/503 at random")
    p.add_argument("--rate-timeout", type=_rate, default=0.0, help="hang, then answer")
    p.add_argument("--rate-drop", type=_rate, default=0.0, help="close the TCP connection")
    p.add_argument("--hang-seconds", type=float, default=defaults.hang_seconds)
    p.add_argument("--retry-after", default=defaults.retry_after, help="seconds, may be fractional")
    p.add_argument(
        "--require-key",
        default=None,
        help="demand 'Authorization: Bearer KEY' (/v1/messages: or 'x-api-key: KEY')",
    )
    p.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    p.add_argument(
        "--models", default=",".join(defaults.models), help="comma-separated ids for /v1/models"
    )
    p.add_argument(
        "--rpm", type=_non_negative_int, default=0, help="requests per minute per key (0: off)"
    )
    p.add_argument(
        "--tpm", type=_non_negative_int, default=0, help="tokens per minute per key (0: off)"
    )
    p.add_argument(
        "--no-ratelimit-headers",
        action="store_true",
        help="omit x-ratelimit-* headers (429s still carry retry-after)",
    )
    p.add_argument(
        "--capacity-tokens-per-s",
        type=_non_negative,
        default=0.0,
        help="decode tokens/s shared by all running requests (0: no ceiling)",
    )
    p.add_argument(
        "--max-tokens-per-s-per-request",
        type=_non_negative,
        default=defaults.max_tokens_per_s_per_request,
        help="decode speed of one request when the server is idle",
    )
    p.add_argument(
        "--max-running",
        type=_non_negative_int,
        default=0,
        help="requests decoding at once; the rest queue by priority (0: unlimited)",
    )
    p.add_argument(
        "--prefill-tokens-per-s",
        type=_non_negative,
        default=0.0,
        help="prompt tokens/s prefilled, one request at a time, before decoding (0: no prefill)",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=_non_negative_int,
        default=0,
        help="prompt tokens kept in the prefix cache, LRU; cached ones skip prefill (0: none)",
    )
    b = p.add_argument_group("Files + Batch API")
    b.add_argument(
        "--batch-turnaround-seconds",
        type=_non_negative,
        default=defaults.batch_turnaround_seconds,
        help="time a batch spends validating before it runs",
    )
    b.add_argument(
        "--batch-lines-per-second",
        type=_non_negative,
        default=0.0,
        help="pace of answering a batch's lines (0: all at once)",
    )
    b.add_argument(
        "--batch-cancel-seconds",
        type=_non_negative,
        default=defaults.batch_cancel_seconds,
        help="time from cancelling to cancelled",
    )
    b.add_argument(
        "--batch-rate-500", type=_rate, default=0.0, help="per line: status 500 in the error file"
    )
    b.add_argument(
        "--batch-rate-expired",
        type=_rate,
        default=0.0,
        help="per line: not run, batch_expired in the error file, batch ends expired",
    )
    b.add_argument(
        "--batch-rate-drop",
        type=_rate,
        default=0.0,
        help="per Files/Batches request: close the connection (half after the action)",
    )
    b.add_argument(
        "--batch-max-lines",
        type=_non_negative_int,
        default=0,
        help="more lines fail validation (0: unlimited)",
    )
    b.add_argument(
        "--batch-token-limit",
        type=_non_negative_int,
        default=0,
        help="enqueued tokens per key; more: token_limit_exceeded (0: unlimited)",
    )
    args = p.parse_args(argv)
    values = vars(args)
    values["models"] = [m for m in args.models.split(",") if m] or defaults.models
    known = {f.name for f in fields(SimConfig)}
    return SimConfig(**{k: v for k, v in values.items() if k in known})
