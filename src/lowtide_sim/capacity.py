"""Engine capacity (``--capacity-tokens-per-s T``, ``--max-running N``).

The engine model is on when either is > 0. Chat, completions and responses
then produce exactly ``max_out`` completion tokens (``finish_reason``
"length") and take time to decode them: the requests running share the
decode rate, each generating at ``min(--max-tokens-per-s-per-request, T / n)``
tokens per second (T = 0: no shared ceiling; per-request rate 0: no per-request
ceiling). The model is processor sharing, computed exactly from event times
(no polling). With ``--max-running N`` at most N requests decode at once; the
rest wait in a queue ordered by the body's ``priority`` (vLLM's field: lower
is more urgent, default 0), then arrival. Decoding happens after the latency
delay and fault injection. Embeddings never enter the engine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math

from lowtide_sim.config import SimConfig

__all__ = ["DecodeEngine"]

_EPS = 1e-6


class _Seq:
    __slots__ = ("future", "order", "priority", "target")

    def __init__(self, target: float, priority: int, order: int, future: asyncio.Future) -> None:
        self.target = target
        self.priority = priority
        self.order = order
        self.future = future


class DecodeEngine:
    """Continuous batching as processor sharing, driven by one timer (no polling).

    ``v`` is the number of tokens every running request has generated since an
    arbitrary origin; all running requests advance ``v`` at the same rate, so a
    request admitted at ``v0`` with ``target`` tokens finishes when ``v`` reaches
    ``v0 + target``. Running requests sit in a heap by that finish point, waiting
    ones in a heap by (priority, arrival).
    """

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.v = 0.0
        self.t = 0.0
        self.running: list[tuple[float, int, _Seq]] = []
        self.waiting: list[tuple[int, int, _Seq]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def active(self) -> bool:
        return self.cfg.capacity_tokens_per_s > 0 or self.cfg.max_running > 0

    def _rate(self, n: int) -> float:
        rate = math.inf
        per = self.cfg.max_tokens_per_s_per_request
        if per > 0:
            rate = per
        cap = self.cfg.capacity_tokens_per_s
        if cap > 0:
            rate = min(rate, cap / n)
        return rate

    def step(self) -> None:
        """Advance to now: finish what is done, admit what fits, set the next timer."""
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        while True:
            if self.running:
                rate = self._rate(len(self.running))
                if math.isinf(rate):
                    self.v = max(self.v, max(e[0] for e in self.running))
                else:
                    self.v += rate * (now - self.t)
            self.t = now
            while self.running and self.running[0][0] <= self.v + _EPS:
                seq = heapq.heappop(self.running)[2]
                if not seq.future.done():
                    seq.future.set_result(None)
            limit = self.cfg.max_running
            admitted = False
            while self.waiting and (limit <= 0 or len(self.running) < limit):
                seq = heapq.heappop(self.waiting)[2]
                heapq.heappush(self.running, (self.v + seq.target, seq.order, seq))
                admitted = True
            if not admitted:
                break
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.running:
            dt = (self.running[0][0] - self.v) / self._rate(len(self.running))
            self._timer = loop.call_at(now + max(dt, 0.0), self.step)

    async def generate(self, tokens: int, priority: int) -> None:
        """Wait in the queue, then decode ``tokens`` at the shared rate."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        seq = _Seq(float(max(0, tokens)), priority, next(self._order), future)
        heapq.heappush(self.waiting, (priority, seq.order, seq))
        self.step()
        try:
            await future
        except asyncio.CancelledError:
            self.step()
            for queue in (self.waiting, self.running):
                for i, entry in enumerate(queue):
                    if entry[2] is seq:
                        queue.pop(i)
                        heapq.heapify(queue)
                        break
            self.step()
            raise
