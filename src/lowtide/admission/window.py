"""An adaptive concurrency window: grow while the upstream keeps up, shrink fast when it pushes back.

Slow start (one more slot per success while the window is full: doubling per round trip) until
the first sign of overload, then additive increase (about one slot per round trip) and
multiplicative decrease (halve, at most once per round trip, so one burst of 429s counts once).
"""

from __future__ import annotations

import time


class ConcurrencyWindow:
    limit: int  # the window in whole requests: int(size), kept by the size setter

    def __init__(
        self,
        initial: int,
        minimum: int,
        maximum: int,
        adaptive: bool = True,
        delay_based: bool = False,
    ) -> None:
        self.minimum = max(1, minimum)
        self.maximum = max(self.minimum, maximum)
        self.size = float(min(self.maximum, max(self.minimum, initial if adaptive else maximum)))
        self.adaptive = adaptive
        self.slow_start = True
        self._last_cut = 0.0
        self.latency_ewma: float | None = None
        # Delay-based mode (routes shared with interactive users): the best latency per token
        # seen is the unloaded baseline; latency rising above it means we are crowding others.
        self.delay_based = delay_based
        self.baseline: float | None = None
        self.tolerance = 1.2

    @property
    def size(self) -> float:
        return self._size

    @size.setter
    def size(self, value: float) -> None:
        self._size = value
        self.limit = int(value)  # read on every request's admission: kept, not computed

    def on_success(self, latency: float, in_flight: int, tokens: int = 0) -> None:
        self.latency_ewma = (
            latency if self.latency_ewma is None else 0.9 * self.latency_ewma + 0.1 * latency
        )
        if self.delay_based and self.adaptive and tokens > 0:
            per_token = latency / tokens
            if self.baseline is None or per_token < self.baseline:
                self.baseline = per_token
            else:
                self.baseline *= 1.0005  # forget a stale best slowly
            if per_token > self.baseline * self.tolerance:
                self.on_overload(0.8)  # the upstream is slowing down: make room
                return
        if not self.adaptive or in_flight + 1 < self.limit:
            return  # grow only when the window is actually the constraint
        step = 1.0 if self.slow_start else 1.0 / self.size
        self.size = min(float(self.maximum), self.size + step)

    def on_overload(self, factor: float = 0.5) -> bool:
        """Cut the window; returns False when a cut already happened within a round trip."""
        if not self.adaptive:
            return False
        now = time.monotonic()
        if now - self._last_cut < max(0.2, self.latency_ewma or 0.0):
            return False
        self._last_cut = now
        self.slow_start = False
        self.size = max(float(self.minimum), self.size * factor)
        return True
