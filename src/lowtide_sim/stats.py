"""What the simulator saw: counters for GET /sim/stats and vLLM-style GET /metrics.

``GET /metrics`` serves vLLM-style Prometheus metrics: gauges
``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` and counters
``vllm:request_success_total`` (label ``finished_reason``),
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total``, all labelled
``model_name`` (the first of ``--models``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["Metrics", "Stats", "render_metrics"]

# Thresholds reported as "bodies_over" in /sim/stats.
_OVER_THRESHOLDS = (1, 2, 3)


class Stats:
    """Counters for /sim/stats; bodies are kept as hash -> count to stay small."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.body_counts: dict[int, int] = {}
        self.max_per_body = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rate_limited = 0
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.cached_tokens_total = 0  # prompt tokens the prefix cache spared (prefill.py)
        # Files + Batch API. files_live is a gauge that batches.py keeps in sync (also after reset).
        self.batches_created = 0
        self.batches_cancelled = 0
        self.batch_lines = 0
        self.files_created = 0
        self.files_deleted = 0
        self.files_live = 0
        self.batch_drops = 0

    def note_body(self, raw: bytes) -> int:
        """Record one received body and return how often it has been seen so far."""
        self.requests += 1
        key = hash(raw)
        seen = self.body_counts.get(key, 0) + 1
        self.body_counts[key] = seen
        if seen > self.max_per_body:
            self.max_per_body = seen
        return seen

    def snapshot(self) -> dict[str, Any]:
        counts = self.body_counts.values()
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "distinct_bodies": len(self.body_counts),
            "max_per_body": self.max_per_body,
            "bodies_over": {str(k): sum(1 for c in counts if c > k) for k in _OVER_THRESHOLDS},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "rate_limited": self.rate_limited,
            "prompt_tokens_total": self.prompt_tokens_total,
            "completion_tokens_total": self.completion_tokens_total,
            "cached_tokens_total": self.cached_tokens_total,
            "batches_created": self.batches_created,
            "batches_cancelled": self.batches_cancelled,
            "batch_lines": self.batch_lines,
            "files_created": self.files_created,
            "files_deleted": self.files_deleted,
            "files_live": self.files_live,
            "batch_drops": self.batch_drops,
        }


class Metrics:
    """Prometheus counters; unlike Stats they survive /sim/reset (counters only grow)."""

    def __init__(self) -> None:
        self.success: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, found there


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(metrics: Metrics, model_name: str, running: int, waiting: int) -> str:
    """Prometheus text exposition, named and labelled like vLLM's."""
    model = f'model_name="{_label(model_name)}"'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{model}}} {float(running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{model}}} {float(waiting)}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for reason in sorted({"stop", "length", *metrics.success}):
        lines.append(
            f'vllm:request_success_total{{finished_reason="{_label(reason)}",{model}}} '
            f"{float(metrics.success[reason])}"
        )
    lines += [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{model}}} {float(metrics.prompt_tokens)}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{model}}} {float(metrics.generation_tokens)}",
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{model}}} {float(metrics.prefix_cache_queries)}",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{model}}} {float(metrics.prefix_cache_hits)}",
    ]
    return "\n".join(lines) + "\n"
