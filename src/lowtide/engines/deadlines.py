"""A route's `timeout` for every request in flight, kept by one sweep instead of a timer each.

aiohttp's own total timeout arms, enters and cancels a timer on every request: ~4 us of a
~70 us request against a fast upstream (bench/bare_client.py with and without it). Here a
request costs a dict entry; one task looks at the entries a few times a second and cancels
the requests past their time, which then fail as `request_timeout`. A request runs at most
its timeout plus one sweep interval (a quarter of the timeout, at most one second).

Cancels are counted as asyncio.timeout counts them: a request times out only when no cancel
but the sweep's is pending (a shard stopping stays a stop). A cancel that something inside the
request swallowed is sent again at the next sweep, and taken back when the request ends, so
the task (a shard's lane runs many lines) is never left marked cancelling.
"""

from __future__ import annotations

import asyncio
import time

_current_task = asyncio.current_task


class Deadlines:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.interval = min(1.0, seconds / 4)
        # task -> (when its request is due, its cancel count when the request began)
        self._due: dict[asyncio.Task[object], tuple[float, int]] = {}
        self._expired: dict[asyncio.Task[object], int] = {}  # task -> cancels the sweep sent
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sweep on the running loop (the one the requests run on)."""
        sweeper = self._sweeper
        if (
            sweeper is None
            or sweeper.done()
            or sweeper.get_loop() is not asyncio.get_running_loop()
        ):
            self._sweeper = asyncio.create_task(self._sweep())

    def enter(self) -> asyncio.Task[object]:
        """Start the calling task's request's clock; its request must end with leave()."""
        task = _current_task()
        assert task is not None, "a request runs in a task"
        self._due[task] = (time.monotonic() + self.seconds, task.cancelling())
        return task

    def leave(self, task: asyncio.Task[object]) -> None:
        self._due.pop(task, None)
        if self._expired:
            for _ in range(self._expired.pop(task, 0)):
                task.uncancel()  # the sweep's cancels that never reached the request

    def timed_out(self, task: asyncio.Task[object]) -> bool:
        """On a CancelledError in the request (before leave()): whether it was the sweep's
        alone (the request timed out), not a stop from elsewhere (which must stay a cancel)."""
        sent = self._expired.pop(task, 0)
        if not sent:
            return False
        remaining = task.cancelling()
        for _ in range(sent):
            remaining = task.uncancel()
        _, base = self._due.get(task, (0.0, 0))
        return remaining <= base

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.cancel_late(time.monotonic())

    def cancel_late(self, now: float) -> None:
        """Cancel the requests due by `now` (what each sweep does)."""
        late = [(task, base) for task, (due, base) in self._due.items() if due <= now]
        for task, base in late:
            self._expired[task] = self._expired.get(task, 0) + 1
            self._due[task] = (now + self.interval, base)  # again, if this one is swallowed
            task.cancel()

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is None or sweeper.done():
            return
        sweeper.cancel()
        try:
            await sweeper
        except asyncio.CancelledError:
            task = _current_task()
            if task is not None and task.cancelling():
                raise  # the closing task's own cancel, not the sweeper's
