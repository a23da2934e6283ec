"""Prometheus metrics, served at /metrics: per route in flight, window, tokens, 429s, retries."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

route_in_flight = Gauge("lowtide_route_in_flight", "Requests in flight to a route", ["route"])
route_window = Gauge("lowtide_route_window", "Concurrency window of a route", ["route"])
route_waiting = Gauge(
    "lowtide_route_waiting", "Requests waiting for admission to a route", ["route"]
)
route_requests = Counter(
    "lowtide_route_requests_total", "Requests sent to a route, by outcome", ["route", "outcome"]
)
route_tokens = Counter(
    "lowtide_route_tokens_total", "Tokens (input+output) reported by a route", ["route"]
)
route_rate_limited = Counter(
    "lowtide_route_rate_limited_total", "429 answers from a route", ["route"]
)
route_retries = Counter("lowtide_route_retries_total", "Retries of transient failures", ["route"])
lines_committed = Counter("lowtide_lines_committed_total", "Result lines committed in segments")
tokens_committed = Counter(
    "lowtide_tokens_total",
    "Tokens of committed result lines, by route, project and kind (input, output)",
    ["route", "project", "kind"],
)
cost_committed = Counter(
    "lowtide_cost_total",
    "Batch-price cost of committed result lines, in the server's currency",
    ["route", "project"],
)
