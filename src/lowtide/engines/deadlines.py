"""A route's `timeout` for every request in flight, kept by one sweep instead of a timer each.

aiohttp's own total timeout arms, enters and cancels a timer on every request: ~4 us of a
~70 us request against a fast upstream (bench/bare_client.py with and without it). Here a
request costs a dict entry; one task looks at the entries a few times a second and cancels
the requests past their time, which then fail as `request_timeout`. A request runs at most
its timeout plus one sweep interval (a quarter of the timeout, at most one second).
"""

from __future__ import annotations

import asyncio
import time

_current_task = asyncio.current_task


class Deadlines:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.interval = min(1.0, seconds / 4)
        self._due: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sweeping, on the running loop (the one the requests run on)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())

    def enter(self) -> asyncio.Task[object]:
        """Start the calling task's request's clock; its request must end with leave()."""
        task = _current_task()
        assert task is not None, "a request runs in a task"
        self._due[task] = time.monotonic() + self.seconds
        return task

    def leave(self, task: asyncio.Task[object]) -> None:
        self._due.pop(task, None)

    def timed_out(self, task: asyncio.Task[object]) -> bool:
        """On a CancelledError in the request: whether the cancel was this sweep's alone (the
        request timed out), not a stop from elsewhere (which must stay a cancel)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            late = [task for task, due in self._due.items() if due <= now]
            for task in late:
                del self._due[task]
                self._expired.add(task)
                task.cancel()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
