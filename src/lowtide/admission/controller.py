"""Per-route admission: an adaptive window, RPM/TPM budgets, Retry-After pauses and fair share.

Every request for a route asks `acquire(batch, weight, cost)` for a permit. Permits are granted
while the route has room in its window, its budgets and is not paused by a Retry-After. When
requests must wait, they are granted by weighted fair queuing across batches: each batch has a
virtual time that advances by 1/weight per grant, and the waiting batch with the smallest
virtual time goes next. So a 10-line batch behind a million-line one is served at once, and a
'high' priority batch gets four times the share of a 'normal' one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from lowtide import metrics
from lowtide.admission.budgets import TokenBucket
from lowtide.admission.headers import read_limits
from lowtide.admission.window import ConcurrencyWindow
from lowtide.config import ModelRoute

log = logging.getLogger("lowtide.admission")

# Answers that may say the route is wrong (key refused, no access, no such model) rather than
# the line: they teach nothing about the upstream's load.
ROUTE_DOWN_STATUSES = frozenset({401, 403, 404})


class Permit(msgspec.Struct, gc=False):
    batch: str
    cost: int
    started: float = 0.0


@dataclass(slots=True)
class _Waiter:
    permit: Permit
    future: asyncio.Future[Permit]


@dataclass
class _BatchQueue:
    weight: float
    vtime: float
    waiters: deque[_Waiter] = field(default_factory=deque)


class RouteController:
    def __init__(self, route: ModelRoute, probe_seconds: float = 30.0) -> None:
        self.route = route
        self.name = route.name
        adaptive = route.adaptive if route.adaptive is not None else route.engine == "openai"
        self.window = ConcurrencyWindow(
            initial=route.initial_concurrency or min(route.max_concurrency, 8),
            minimum=route.min_concurrency,
            maximum=route.max_concurrency,
            adaptive=adaptive,
            delay_based=route.shared,
        )
        self.rpm = TokenBucket(route.rpm) if route.rpm else None
        self.tpm = TokenBucket(route.tpm) if route.tpm else None
        self._learn_rpm = route.rpm is None
        self._learn_tpm = route.tpm is None
        self.in_flight = 0
        self.in_flight_cost = 0
        self.paused_until = 0.0
        # Set while the upstream refuses the route itself (bad key, no such model): nothing is
        # sent but one probe every `probe_seconds`, and the first probe that passes reopens it.
        self.problem: str | None = None
        self._probe_seconds = probe_seconds
        self._next_probe = 0.0
        self._queues: dict[str, _BatchQueue] = {}
        self._waiting = 0
        # Lanes running lines of each batch on this route in this process (the shards keep
        # it), and lines asleep in a retry backoff (the senders keep it).
        self.lanes: dict[str, int] = {}
        self.backing_off = 0
        self._vclock = 0.0  # virtual time of the last grant: new batches start here
        self._kick = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # The two gauges are read from this controller when /metrics is scraped, not set per
        # request; so are the counters, plain numbers here (metrics.RouteCounts).
        self._m_in_flight = metrics.route_in_flight.labels(self.name)
        self._m_window = metrics.route_window.labels(self.name)
        me = weakref.ref(self)
        self._m_in_flight.set_function(lambda: _read(me, "in_flight"))
        self._m_window.set_function(lambda: _read(me, "window_limit"))
        self.requests: dict[int | str, int] = {}  # answered requests by outcome
        self.tokens = 0
        self.rate_limited = 0
        self.retries = 0
        metrics.watch_route(self)
        self._last_log = (time.monotonic(), 0.0, 0.0, 0.0)

    def count(self, outcome: int | str) -> None:
        """One request that got no answer (`outcome`: the transient error's code); release
        counts the answers."""
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def retried(self) -> None:
        self.retries += 1

    @property
    def window_limit(self) -> int:
        return self.window.limit

    def lanes_wanted(self, batch: str) -> int:
        """Whether a shard of `batch` should run one lane more (+1), one fewer (-1) or as many
        (0), asked by a lane that has just finished a line.

        Fewer: the window is full and only this batch's lines wait for it, so a lane fewer
        costs the batch nothing, and every line it would have taken skips waiting (a future, a
        wake-up: a fifth of Lowtide's own CPU per line). Fewer too: the batch runs more lanes
        here than the window holds (two shards overlap, the window shrank), even while nobody
        waits: with one lane too many, each release hands its slot to that lane's waiting line
        and the releasing lane's next line waits in turn, for good. Lines of other batches
        waiting keep every lane: then weighted fair queuing needs each batch's lines in the
        queue. More:
        nobody waits, a slot of the window is unused, and the batch runs fewer lanes here than
        the window holds, besides those asleep in a retry backoff (the window grew, or lines
        back off). A slot is often free for a moment only, between one line of a lane and its
        next: counting lanes keeps that from starting lanes that would then wait."""
        limit = self.window.limit
        if self._waiting:
            if self.in_flight < limit:
                return 0  # waiting for a budget or a pause, not for the window
            queue = self._queues.get(batch)
            return -1 if queue is not None and len(queue.waiters) == self._waiting else 0
        lanes, room = self.lanes.get(batch, 0), limit + self.backing_off
        if lanes > room:
            return -1
        return 1 if self.in_flight + 1 < limit and lanes < room else 0

    def lanes_to_start(self, batch: str) -> int:
        """Lanes a new shard of `batch` starts: what the window holds beyond the lanes the
        batch already runs here, at least one. Each lane beyond the window would make every
        line wait for a permit (a future and a wake-up); lanes_wanted adds lanes as the window
        grows, and another batch's shard still starts a window's worth, so both queue."""
        return max(1, self.window.limit - self.lanes.get(batch, 0))

    def lane_started(self, batch: str) -> None:
        self.lanes[batch] = self.lanes.get(batch, 0) + 1

    def lane_ended(self, batch: str) -> None:
        left = self.lanes.get(batch, 0) - 1
        if left > 0:
            self.lanes[batch] = left
        else:
            self.lanes.pop(batch, None)

    # -- asking for a permit -------------------------------------------------------------
    def try_acquire(self, batch: str, weight: float, cost: int) -> Permit | None:
        """A permit now, when the route has room and nobody waits; else None (then `acquire`).

        On every request's path: the usual route (nothing waits, only the window limits it)
        counts the permit and nothing more, without a call."""
        if self._watch_task is None and self.route.metrics_url:
            self._ensure_watch()
        if self._waiting or self.in_flight >= self.window.limit:
            return None
        if not (
            self.problem is None
            and self.rpm is None
            and self.tpm is None
            and self.paused_until == 0.0
        ):
            if self._blocked_for(cost) != 0.0:
                return None
            permit = Permit(batch, cost)
            self._grant(permit, self._queue(batch, weight))
            return permit
        # Nothing waits: no turn to take, and no fair-share time kept. Virtual times order
        # waiters only: a batch that starts waiting starts at the clock (no credit for the
        # time nothing waited), or where its last wait left it if that is ahead (at most one
        # grant's worth).
        self.in_flight += 1
        self.in_flight_cost += cost
        # Timed only for an adaptive window (its latency): a clock read less on a fixed one.
        return Permit(batch, cost, time.monotonic() if self.window.adaptive else 0.0)

    async def acquire(self, batch: str, weight: float, cost: int, *, tried: bool = False) -> Permit:
        """A permit, once there is room and it is this batch's turn. (`tried`: the caller's
        try_acquire just failed, with nothing awaited since: no need to try again.)"""
        if not tried:
            permit = self.try_acquire(batch, weight, cost)
            if permit is not None:
                return permit
        permit = Permit(batch, cost)
        future: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        queue = self._queue(batch, weight)
        queue.waiters.append(_Waiter(permit, future))
        self._waiting += 1
        if self.in_flight < self.window.limit:  # a full window grants nothing: a release will
            self._serve_waiters()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result(), status=None)  # granted as we were cancelled
            raise

    def _queue(self, batch: str, weight: float) -> _BatchQueue:
        queue = self._queues.get(batch)
        if queue is None:
            queue = self._queues[batch] = _BatchQueue(weight, self._vclock)
        else:
            queue.weight = weight
            if not queue.waiters:
                queue.vtime = max(queue.vtime, self._vclock)  # no credit for idle time
        return queue

    def _blocked_for(self, cost: int) -> float:
        """0 if a request of `cost` may go now; else seconds to wait (inf: until a release)."""
        if self.in_flight >= self.window.limit:
            return float("inf")
        if (
            self.problem is None
            and self.rpm is None
            and self.tpm is None
            and self.paused_until == 0.0  # never paused (a pause sets it for good)
        ):
            return 0.0  # nothing but the window limits this route
        now = time.monotonic()
        if self.problem is not None:  # only a probe, one at a time, once an interval
            if self.in_flight:
                return float("inf")
            if now < self._next_probe:
                return self._next_probe - now
        wait = max(0.0, self.paused_until - now)
        if self.rpm is not None:
            wait = max(wait, self.rpm.wait_time(1, now))
        if self.tpm is not None:
            wait = max(wait, self.tpm.wait_time(cost, now))
        return wait

    def _grant(self, permit: Permit, queue: _BatchQueue) -> None:
        now = time.monotonic()
        if self.rpm is not None:
            self.rpm.take(1, now)
        if self.tpm is not None:
            self.tpm.take(permit.cost, now)
        queue.vtime += 1.0 / queue.weight
        self._vclock = queue.vtime
        self.in_flight += 1
        self.in_flight_cost += permit.cost
        permit.started = now

    def _ensure_watch(self) -> None:
        if self.route.metrics_url and self._watch_task is None:
            self._watch_task = asyncio.create_task(
                self._watch_upstream_load(self.route.metrics_url)
            )

    async def _watch_upstream_load(self, url: str) -> None:
        """Shared upstreams: while the server has requests waiting, batch load steps back."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        text = await resp.text()
                    if _gauge_sum(text, "vllm:num_requests_waiting") > 0:
                        self.window.on_overload(0.7)
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    pass
                await asyncio.sleep(0.5)

    def _serve_waiters(self) -> None:
        """Grant what may go now, fairest batch first, here rather than in the pump task. The
        pump is woken only for what must wait for a time (a pause, a budget, a probe) or, once
        nobody waits, to tidy up; a full window needs neither: the next release comes here."""
        delay = self._grant_ready()
        if self._waiting and delay == float("inf"):
            return
        self._ensure_pump()
        self._kick.set()

    def _ensure_pump(self) -> None:
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        """Grant waiting requests, fairest batch first, whenever the route has room."""
        while self._waiting:
            self._kick.clear()
            delay = self._grant_ready()
            if not self._waiting:
                break
            timeout = None if delay == float("inf") else max(delay, 0.001)
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=timeout)
            except TimeoutError:
                pass
        for batch in [b for b, q in self._queues.items() if not q.waiters]:
            if self._queues[batch].vtime <= self._vclock:
                del self._queues[batch]  # forget idle batches that have no credit left

    def _grant_ready(self) -> float:
        queues = self._queues
        while self._waiting:
            if len(queues) == 1:  # one batch on the route: it is the one that waits
                queue = next(iter(queues.values()))
            else:
                queue = min((q for q in queues.values() if q.waiters), key=lambda q: q.vtime)
            waiter = queue.waiters[0]
            if waiter.future.done():  # cancelled while waiting
                queue.waiters.popleft()
                self._waiting -= 1
                continue
            delay = self._blocked_for(waiter.permit.cost)
            if delay > 0:
                return delay
            queue.waiters.popleft()
            self._waiting -= 1
            self._grant(waiter.permit, queue)
            waiter.future.set_result(waiter.permit)
        return 0.0

    # -- the route itself --------------------------------------------------------------
    def block(self, problem: str) -> bool:
        """The upstream refuses this route (401, 403, 404): stop sending until a probe passes.
        Returns True when the route was open until now."""
        opened = self.problem is None
        self.problem = problem
        self._next_probe = time.monotonic() + self._probe_seconds
        if opened:
            log.warning(
                "route %s stopped: %s; its lines wait, and one probe goes every %g s",
                self.name,
                problem,
                self._probe_seconds,
            )
        return opened

    def route_ok(self) -> None:
        """An answer that is not a refusal of the route: if it was stopped, it works again."""
        if self.problem is not None:
            log.info("route %s works again: resuming", self.name)
            self.problem = None
            if self._waiting:
                self._serve_waiters()

    # -- what happened -------------------------------------------------------------------
    def release(
        self,
        permit: Permit,
        status: int | None,
        used_tokens: int | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Return the permit, and count the answer by its status. status None: no answer
        (timeout, connection: the caller counts why); 0: cancelled. (Positional arguments too:
        once for every request.)"""
        self.in_flight -= 1
        self.in_flight_cost -= permit.cost
        if status:
            requests = self.requests
            requests[status] = requests.get(status, 0) + 1
        if status == 0 or status in ROUTE_DOWN_STATUSES:  # nothing learned about load
            pass
        elif status == 429:
            now = time.monotonic()
            self.rate_limited += 1
            if self.rpm is not None:
                self.rpm.give_back(1)  # a refused request does not count against the limit
            if self.tpm is not None:
                self.tpm.give_back(permit.cost)
            if retry_after:
                self.paused_until = max(self.paused_until, now + min(retry_after, 120.0))
            self.window.on_overload()
        elif status is None or status >= 500 or status == 408:
            self.window.on_overload()
        else:
            window = self.window
            if window.adaptive:  # a fixed window learns nothing from a success
                window.on_success(
                    time.monotonic() - permit.started, self.in_flight, used_tokens or 0
                )
            if self.tpm is not None and used_tokens is not None:
                self.tpm.give_back(permit.cost - used_tokens)
            if used_tokens:
                self.tokens += used_tokens
        if headers:
            # Last: what the upstream says is left bounds whatever our own accounting believes
            # (an upstream that charges max_tokens up front never refunds the difference).
            self._learn(headers)
        if self._waiting:
            if status in ROUTE_DOWN_STATUSES:
                # The caller may stop the route next (block): let the pump decide, after it.
                self._ensure_pump()
                self._kick.set()
            else:
                self._serve_waiters()  # the freed slot goes to the next waiter now

    def _learn(self, headers: Mapping[str, str]) -> None:
        limit_requests, limit_tokens, remaining_requests, remaining_tokens = read_limits(headers)
        if self._learn_rpm and limit_requests:
            if self.rpm is None:
                self.rpm = TokenBucket(limit_requests)
                log.info("route %s: learned a limit of %g requests/min", self.name, limit_requests)
            self.rpm.resize(limit_requests)
        if self._learn_tpm and limit_tokens:
            if self.tpm is None:
                self.tpm = TokenBucket(limit_tokens)
                log.info("route %s: learned a limit of %g tokens/min", self.name, limit_tokens)
            self.tpm.resize(limit_tokens)
        # `remaining` was counted before our requests still in transit reached the upstream.
        if self.rpm is not None and remaining_requests is not None:
            self.rpm.clamp(remaining_requests - self.in_flight)
        if self.tpm is not None and remaining_tokens is not None:
            self.tpm.clamp(remaining_tokens - self.in_flight_cost)

    def log_line(self) -> str | None:
        """A summary since the last call, or None if the route was idle."""
        now = time.monotonic()
        tokens, limited, retries = self.tokens, self.rate_limited, self.retries
        last_t, last_tokens, last_limited, last_retries = self._last_log
        self._last_log = (now, tokens, limited, retries)
        if not (
            self.in_flight or self._waiting or tokens != last_tokens or retries != last_retries
        ):
            return None
        rate = (tokens - last_tokens) / max(now - last_t, 1e-3)
        return (
            f"route {self.name}: in_flight={self.in_flight} window={self.window.limit} "
            f"waiting={self._waiting} tokens/s={rate:.0f} 429s={limited - last_limited:.0f} "
            f"retries={retries - last_retries:.0f}"
            + (f" rpm={self.rpm.per_minute:g}" if self.rpm else "")
            + (f" tpm={self.tpm.per_minute:g}" if self.tpm else "")
        )


def _read(ref: weakref.ref[RouteController], name: str) -> float:
    """A gauge's value from its controller at scrape time (0 once the controller is gone)."""
    controller = ref()
    return float(getattr(controller, name)) if controller is not None else 0.0


def _gauge_sum(text: str, name: str) -> float:
    """Sum a Prometheus gauge over its label sets (`name{...} value` lines)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[-1])
    return total
