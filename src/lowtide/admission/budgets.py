"""Continuous request and token budgets (RPM/TPM), corrected by what was really spent."""

from __future__ import annotations

import time


class TokenBucket:
    """Refills continuously at `per_minute / 60` a second, holding at most one minute's worth.

    Unlike a fixed window this never lets a whole minute's budget out in one burst after a
    quiet spell... and unlike a per-second limiter it lets a short burst use what was saved.
    The level may go negative: a correction that finds a request cost more than estimated
    becomes debt that later requests wait for.
    """

    def __init__(self, per_minute: float, burst_seconds: float = 60.0) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # a second (kept, not computed: read on every request)
        self.capacity = per_minute * burst_seconds / 60.0
        self.level = self.capacity
        self._updated = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_time(self, cost: float, now: float | None = None) -> float:
        """Seconds until `cost` fits (0 if it fits now)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        need = min(cost, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate

    def take(self, cost: float, now: float | None = None) -> None:
        self._refill(time.monotonic() if now is None else now)
        self.level -= cost

    def give_back(self, amount: float) -> None:
        """Correct an estimate: positive returns budget, negative charges more."""
        self.level = min(self.capacity, self.level + amount)

    def resize(self, per_minute: float) -> None:
        """Adopt a limit learned from the upstream's headers."""
        if per_minute <= 0 or abs(per_minute - self.per_minute) < 1e-9:
            return
        self._refill(time.monotonic())
        fraction = self.level / self.capacity if self.capacity else 1.0
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = fraction * self.capacity

    def clamp(self, remaining: float) -> None:
        """The upstream says only `remaining` is left: never believe we have more."""
        self._refill(time.monotonic())
        self.level = min(self.level, remaining)
