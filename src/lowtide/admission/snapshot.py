"""Read-only views of this process's route controllers, for the dashboard: what each route does
now, and a bounded history of its throughput (one sample every `step` seconds, an hour kept).

Nothing here changes a controller; it reads the same numbers `log_line()` and /metrics show.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lowtide.admission.controller import RouteController


@dataclass(frozen=True, slots=True)
class _Totals:
    """A route's counters since the process started."""

    tokens: float
    requests: float
    limited: float
    retries: float


def _totals(c: RouteController) -> _Totals:
    return _Totals(
        tokens=float(c.tokens),
        requests=float(sum(list(c.requests.values()))),
        limited=float(c.rate_limited),
        retries=float(c.retries),
    )


class RouteWatch:
    """Samples every route's counters every `step` seconds into a ring of `span` seconds."""

    def __init__(
        self,
        controllers: Callable[[], Mapping[str, RouteController]],
        routes: list[Any],
        *,
        step: float = 5.0,
        span: float = 3600.0,
    ) -> None:
        self._controllers = controllers
        self._routes = {r.name: r for r in routes}  # configured routes, used or not
        self.step = step
        # (time, {route: totals}) — cumulative, so any two samples give a rate between them.
        self._ring: deque[tuple[float, dict[str, _Totals]]] = deque(maxlen=int(span / step) + 1)

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._ring.append((now, {n: _totals(c) for n, c in list(self._controllers().items())}))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.step)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every route: window, in flight, waiting, live rates, 429s, retries, learned limits."""
        now, mono = time.time(), time.monotonic()
        controllers = dict(self._controllers())
        # Live rates over the last 15-70 s: from the newest sample at least 15 s old.
        base_t, base = now, {}
        for t, totals in reversed(self._ring):
            base_t, base = t, totals
            if now - t >= 15:
                break
        minute_ago = next(((t, s) for t, s in self._ring if now - t <= 60), (now, {}))
        out: list[dict[str, Any]] = []
        for name in [*self._routes, *(n for n in controllers if n not in self._routes)]:
            route = self._routes.get(name)
            c = controllers.get(name)
            row: dict[str, Any] = {
                "name": name,
                "engine": route.engine if route is not None else None,
                "max_concurrency": route.max_concurrency if route is not None else None,
                "active": c is not None,
            }
            if c is not None:
                totals = _totals(c)
                before = base.get(name)
                dt = now - base_t
                last = minute_ago[1].get(name)
                row.update(
                    in_flight=c.in_flight,
                    window=c.window.limit,
                    window_max=c.window.maximum,
                    adaptive=c.window.adaptive,
                    waiting=c._waiting,
                    tokens_per_second=(totals.tokens - before.tokens) / dt
                    if before is not None and dt >= 1
                    else None,
                    requests_per_second=(totals.requests - before.requests) / dt
                    if before is not None and dt >= 1
                    else None,
                    tokens_total=int(totals.tokens),
                    requests_total=int(totals.requests),
                    rate_limited_total=int(totals.limited),
                    retries_total=int(totals.retries),
                    rate_limited_last_minute=int(totals.limited - last.limited) if last else None,
                    retries_last_minute=int(totals.retries - last.retries) if last else None,
                    rpm=c.rpm.per_minute if c.rpm is not None else None,
                    rpm_learned=c.rpm is not None and c._learn_rpm,
                    tpm=c.tpm.per_minute if c.tpm is not None else None,
                    tpm_learned=c.tpm is not None and c._learn_tpm,
                    paused_for=max(0.0, c.paused_until - mono),
                    problem=c.problem,
                )
            out.append(row)
        return out

    def history(self) -> dict[str, Any]:
        """Per-interval rates over the ring: times, and per route tokens/s and requests/s."""
        samples = list(self._ring)
        times: list[float] = []
        tokens: dict[str, list[float | None]] = {}
        requests: dict[str, list[float | None]] = {}
        for (t0, a), (t1, b) in zip(samples, samples[1:], strict=False):
            dt = max(t1 - t0, 1e-3)
            times.append(t1)
            for name, now_totals in b.items():
                was = a.get(name, _Totals(0, 0, 0, 0))
                series_t = tokens.setdefault(name, [None] * (len(times) - 1))
                series_r = requests.setdefault(name, [None] * (len(times) - 1))
                series_t.append(max(0.0, now_totals.tokens - was.tokens) / dt)
                series_r.append(max(0.0, now_totals.requests - was.requests) / dt)
            for series in (*tokens.values(), *requests.values()):
                if len(series) < len(times):
                    series.append(None)
        return {"step": self.step, "times": times, "tokens": tokens, "requests": requests}
