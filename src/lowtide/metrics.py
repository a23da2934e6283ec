"""Prometheus metrics, served at /metrics: per route in flight, window, tokens, 429s, retries."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

route_in_flight = Gauge("lowtide_route_in_flight", "Requests in flight to a route", ["route"])
route_window = Gauge("lowtide_route_window", "Concurrency window of a route", ["route"])
route_waiting = Gauge(
    "lowtide_route_waiting", "Requests waiting for admission to a route", ["route"]
)
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


class RouteCounts(Protocol):
    """A route's counters as its admission controller keeps them: plain numbers, added to on
    every request's path, read only when /metrics is scraped (a Prometheus child's inc() is a
    lock and four calls; two a request were ~3 us of a worker's CPU per line)."""

    name: str
    requests: dict[int | str, int]  # by outcome: the HTTP status, or the transient error's code
    tokens: int
    rate_limited: int
    retries: int


_routes: weakref.WeakSet[RouteCounts] = weakref.WeakSet()


def watch_route(counts: RouteCounts) -> None:
    """Export this route's counters (summed with any other live controller of the same route)."""
    _routes.add(counts)


class _RouteCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "lowtide_route_requests",
            "Requests sent to a route, by outcome",
            labels=["route", "outcome"],
        )
        tokens = CounterMetricFamily(
            "lowtide_route_tokens", "Tokens (input+output) reported by a route", labels=["route"]
        )
        limited = CounterMetricFamily(
            "lowtide_route_rate_limited", "429 answers from a route", labels=["route"]
        )
        retries = CounterMetricFamily(
            "lowtide_route_retries", "Retries of transient failures", labels=["route"]
        )
        by_outcome: dict[tuple[str, str], int] = {}
        sums: dict[str, list[int]] = {}
        for route in list(_routes):
            for outcome, n in list(route.requests.items()):
                key = (route.name, str(outcome))
                by_outcome[key] = by_outcome.get(key, 0) + n
            total = sums.setdefault(route.name, [0, 0, 0])
            total[0] += route.tokens
            total[1] += route.rate_limited
            total[2] += route.retries
        for (name, outcome), n in sorted(by_outcome.items()):
            requests.add_metric([name, outcome], n)
        for name, (n_tokens, n_limited, n_retries) in sorted(sums.items()):
            tokens.add_metric([name], n_tokens)
            limited.add_metric([name], n_limited)
            retries.add_metric([name], n_retries)
        yield from (requests, tokens, limited, retries)


REGISTRY.register(_RouteCollector())
