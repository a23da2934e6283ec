"""Send one request line to its engine: admission, retries with backoff, route refusals.

Shards run their lines through it, and so do provider-batch chunks that fall back to
synchronous calls near their deadline; both answer to the same admission controllers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, NamedTuple, Protocol

import orjson

from lowtide.admission.controller import ROUTE_DOWN_STATUSES, Permit, RouteController
from lowtide.admission.estimate import estimate_tokens
from lowtide.config import ModelRoute
from lowtide.engines.base import Engine, TransientEngineError
from lowtide.runner.accounting import FinishedLine, answered, unanswered
from lowtide.runner.context import RunnerContext
from lowtide.runner.results import error_line, response_line, usage_of
from lowtide.runner.retry import (
    RETRYABLE_STATUS,
    backoff_seconds,
    is_retryable_status,
    route_refusal,
)
from lowtide.runner.schema_check import (
    EXTENSION,
    answer_check,
    split_extension,
    violation_line,
)
from lowtide.store.rows import Usage
from lowtide.vocabulary import PRIORITIES

log = logging.getLogger("lowtide.shard")

_NO_USAGE = Usage()  # shared and never changed: what a line with no answer reports


class BatchScope(Protocol):
    """What a line needs to know of its batch (a ShardClaim has it all)."""

    batch_id: str
    project: str
    endpoint: str
    priority: str
    created_at: int
    expires_at: int


class Halt(Protocol):
    """Whoever runs the line: stopping (cancel, expiry, shutdown) or lost (lease taken over)."""

    stopping: bool
    lost: bool


class _Target(NamedTuple):
    """Where the lines naming one model go on this batch's endpoint (a tuple: unpacked on
    every line's path)."""

    route: ModelRoute
    engine: Engine
    controller: RouteController


class LineSender:
    """Sends the lines of one batch (a shard's, a chunk's). What is the same for all of them
    is worked out once here, not on every line's path: the route, engine and admission of each
    model named (looked up at its first line), the batch's share and when it is boosted, whether
    its project has a budget to look at."""

    def __init__(self, ctx: RunnerContext, batch: BatchScope, halt: Halt) -> None:
        self.ctx = ctx
        self.batch = batch
        self.halt = halt
        self.queued: set[asyncio.Task[Any]] = set()  # line tasks waiting for a permit
        self._targets: dict[str, _Target] = {}
        self._budgeted = ctx.spend is not None and ctx.spend.limited(batch.project)
        self._weight = PRIORITIES.get(batch.priority, 1.0)
        window = batch.expires_at - batch.created_at
        # The last quarter of the completion window: the batch's lines go first (weight x8).
        self._boost_at = batch.expires_at - 0.25 * window if window > 0 else math.inf

    def _target(self, model: str) -> _Target | tuple[str, str]:
        """The model's target, or (code, message) for its lines' error."""
        route = self.ctx.router.route_for(model)
        endpoint = self.batch.endpoint
        if route is None:
            return "model_not_found", (
                f"The provided model '{model}' is not served by this Lowtide server."
            )
        if endpoint not in route.served_endpoints():  # Messages lines get here
            return (
                "unsupported_endpoint",
                f"The model '{route.name}' does not serve {endpoint} here.",
            )
        try:
            engine = self.ctx.router.engine_for(route).for_endpoint(endpoint)
        except Exception as exc:  # a misconfigured route fails its lines, never the shard
            return "engine_error", f"The engine for '{route.name}' could not be created: {exc}"
        target = self._targets[model] = _Target(route, engine, self.ctx.admission(route))
        return target

    async def run_line(self, line_id: str, raw: bytes) -> FinishedLine | None:
        """The line's result, or None if it is left for later (never sent, halted).

        The line is sent until it gets a final answer, its retries run out, or the shard stops;
        an answer that does not match the schema the line asks for is asked for again, at most
        `check.retries` times, then written as a schema_violation line. One loop, in the one
        coroutine a line runs in: every coroutine a line's answer passes through costs it.

        A refusal of the route itself (401, 403, 404) uses no retry: the line waits with every
        other line of the route until a probe finds the route working again.
        """
        request = orjson.loads(raw)
        custom_id = request["custom_id"]
        body = request["body"]
        check_flag = None
        if EXTENSION in body:
            body, check_flag = split_extension(body)  # never sent to an engine
        model = body.get("model")
        if type(model) is not str:
            model = str(model)
        target = self._targets.get(model)
        if target is None:
            target = self._target(model)
            if type(target) is not _Target:
                return unanswered(error_line(line_id, custom_id, *target))
        route, engine, controller = target
        batch, halt = self.batch, self.halt
        check = None
        if check_flag is not None or route.validate_schema:
            check = answer_check(route, batch.endpoint, body, check_flag)
        # The token estimate matters only to a token budget; a route without one (yet: it may
        # learn one from the answers' headers) skips it, on every line's path.
        cost: int | None = None
        attempt = schema_retries = 0
        discarded = _NO_USAGE  # answers asked for again (their schema): paid for too
        while True:
            if cost is None and controller.tpm is not None:
                cost = estimate_tokens(batch.endpoint, body)
            permit = None
            if not self._budgeted and not halt.stopping and not halt.lost:
                # The usual case: room now, no wait (and no budget to look at).
                weight = self._weight if time.time() < self._boost_at else 8 * self._weight
                permit = controller.try_acquire(batch.batch_id, weight, cost or 0)
            if permit is None:
                permit = await self._permit(controller, cost or 0)
                if permit is None:
                    return None  # stopped while waiting: it never starts
            try:
                response, failure = await engine.execute(batch.endpoint, body), None
            except TransientEngineError as exc:
                response, failure = None, exc
            except asyncio.CancelledError:
                controller.release(permit, status=0)
                raise
            except Exception as exc:  # an engine bug must fail the line, not the shard
                controller.release(permit, status=0)
                log.exception("engine %s failed on %s", route.name, custom_id)
                message = f"The engine failed: {exc.__class__.__name__}: {exc}"
                response, failure = None, TransientEngineError("engine_error", message)
                break
            if response is None:
                controller.release(permit, status=None)
                controller.count(failure.code if failure else "error")
                usage = _NO_USAGE
            else:
                status = response.status_code
                tokens = response.tokens
                usage = usage_of(response.body) if tokens is None else Usage(*tokens)
                controller.release(  # permit, status, used_tokens, retry_after, headers
                    permit,
                    status,
                    usage.input_tokens + usage.output_tokens,
                    response.retry_after,
                    response.headers,
                )
                if status in ROUTE_DOWN_STATUSES:
                    refusal = route_refusal(route.name, status, response.body)
                    if refusal is not None:
                        controller.block(refusal)
                        await self.ctx.note_paused(batch.batch_id, refusal)
                        continue
                if controller.problem is not None:
                    controller.route_ok()
                if (paused := self.ctx.paused) and paused.get(batch.batch_id) is not None:
                    await self.ctx.note_paused(batch.batch_id, None)
                if status < 500 and status not in RETRYABLE_STATUS:
                    if check is None or not 200 <= status < 300 or halt.lost:
                        break  # a final answer
                    reason = check.violation(batch.endpoint, response.body)
                    if reason is None:
                        break
                    if schema_retries >= check.retries or halt.stopping:
                        result = violation_line(line_id, custom_id, response, reason)
                        usage = _sum(usage, discarded)
                        return answered(result, usage, route, model, provider_batch=False)
                    schema_retries += 1  # the answer does not match its schema: ask again
                    controller.retried()
                    discarded = _sum(usage, discarded)
                    attempt = 0
                    continue
            if attempt == route.max_retries or halt.stopping or halt.lost:
                break
            controller.retried()
            retry_after = response.retry_after if response is not None else None
            cfg = self.ctx.config
            delay = backoff_seconds(
                attempt, cfg.retry_base_seconds, cfg.retry_max_seconds, retry_after
            )
            controller.backing_off += 1  # its lane holds no slot meanwhile: another may run
            try:
                await asyncio.sleep(delay)
            finally:
                controller.backing_off -= 1
            attempt += 1
        if halt.lost:
            return None
        if response is None:
            if failure is None or halt.stopping:
                return None  # left for finalize to report as cancelled/expired
            return unanswered(error_line(line_id, custom_id, failure.code, failure.message))
        if halt.stopping and is_retryable_status(response.status_code):
            return None
        if discarded is not _NO_USAGE:
            usage = _sum(usage, discarded)
        result = response_line(line_id, custom_id, response)
        return answered(result, usage, route, model, provider_batch=False)

    async def _permit(self, controller: RouteController, cost: int) -> Permit | None:
        """Wait for admission; None if the shard stopped meanwhile (then the line never starts:
        after a cancel only requests already sent may finish)."""
        spend = self.ctx.spend
        if spend is not None and spend.limited(self.batch.project):
            while reason := await spend.over_budget(self.batch.project):
                await self.ctx.note_paused(self.batch.batch_id, reason)
                if self.halt.stopping or self.halt.lost:
                    return None
                await asyncio.sleep(1.0)
        if self.halt.stopping or self.halt.lost:
            return None
        weight = self._weight if time.time() < self._boost_at else 8 * self._weight
        permit = controller.try_acquire(self.batch.batch_id, weight, cost)
        if permit is not None:  # the usual case: room now, no wait
            return permit
        task = asyncio.current_task()
        assert task is not None
        self.queued.add(task)
        try:
            permit = await controller.acquire(self.batch.batch_id, weight, cost, tried=True)
        finally:
            self.queued.discard(task)
        if self.halt.stopping or self.halt.lost:
            controller.release(permit, status=0)
            return None
        return permit


def _sum(a: Usage, b: Usage) -> Usage:
    return Usage(
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        reasoning_tokens=a.reasoning_tokens + b.reasoning_tokens,
    )
