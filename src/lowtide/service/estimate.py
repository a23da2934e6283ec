"""What a batch would cost and how long it would take, before it runs (`POST
/v1/batches/estimate`, `lowtide estimate`, and `lowtide run` before it starts).

Tokens come from one streaming pass over the file (runner/estimate.py), counted with the
model's own tokenizer where Lowtide has it. Output lengths and speeds come from history across
all projects (store/history.py): a model's answers and an engine's speed do not depend on who
asked, and the queue ahead of a batch is everyone's. Only averages are read, never another
project's lines.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lowtide.config import ModelRoute
from lowtide.engines.router import Router
from lowtide.errors import ApiError
from lowtide.runner.estimate import FileTally, ModelTally, tally_file
from lowtide.runner.validation import first_request_url
from lowtide.service.batches import BatchRequest, BatchService
from lowtide.service.deps import Deps, UseCases
from lowtide.store import history
from lowtide.store.files import get_file

HISTORY_DAYS = 30
# With no limits configured and no finished batch to learn from, a route is assumed to finish
# one line per slot of its concurrency every 10 seconds: slow for an echo engine, about right
# for a loaded LLM server, and never the reason a batch that fits is said not to by much.
DEFAULT_SECONDS_PER_LINE_PER_SLOT = 10.0
MIN_HISTORY_LINES = 50  # smaller batches' speeds are mostly start-up and polling


@dataclass(slots=True)
class ModelEstimate:
    model: str
    lines: int
    input_tokens: int
    input_tokens_method: str  # "tokenizer" | "approximate"
    max_output_tokens: int
    expected_output_tokens: int  # the low bound's: recent average per request x lines, or 0
    low: float
    high: float
    sync_low: float
    sync_high: float
    priced: bool
    queued_lines: int  # lines of running batches ahead on the same route
    seconds: float  # the route's queue and these lines, at its throughput
    throughput: str  # where the speed came from: "limits" | "history" | "default"


@dataclass(slots=True)
class Estimate:
    endpoint: str
    completion_window: str
    window_seconds: int
    currency: str
    lines: int = 0
    invalid_lines: int = 0
    bytes: int = 0
    models: list[ModelEstimate] = field(default_factory=list)

    def _sum(self, name: str) -> Any:
        return sum(getattr(m, name) for m in self.models)

    @property
    def input_tokens_method(self) -> str:
        counted = self.models and all(m.input_tokens_method == "tokenizer" for m in self.models)
        return "tokenizer" if counted else "approximate"

    @property
    def estimated_seconds(self) -> float:
        return max((m.seconds for m in self.models), default=0.0)  # routes run side by side

    def as_object(self) -> dict[str, Any]:
        """The `batch.estimate` object (api/schemas.py documents it)."""
        seconds = round(self.estimated_seconds, 3)
        return {
            "object": "batch.estimate",
            "endpoint": self.endpoint,
            "completion_window": self.completion_window,
            "lines": self.lines,
            "invalid_lines": self.invalid_lines,
            "input_tokens": self._sum("input_tokens"),
            "input_tokens_method": self.input_tokens_method,
            "max_output_tokens": self._sum("max_output_tokens"),
            "cost": {
                "currency": self.currency,
                **{k: self._sum(k) for k in ("low", "high", "sync_low", "sync_high")},
            },
            "no_price_models": [m.model for m in self.models if not m.priced],
            "estimated_seconds": seconds,
            "fits_window": seconds <= self.window_seconds,
            "models": [
                {
                    "model": m.model,
                    "lines": m.lines,
                    "input_tokens": m.input_tokens,
                    "input_tokens_method": m.input_tokens_method,
                    "max_output_tokens": m.max_output_tokens,
                    "expected_output_tokens": m.expected_output_tokens,
                    "cost": {"low": m.low, "high": m.high},
                    "queued_lines": m.queued_lines,
                    "estimated_seconds": round(m.seconds, 3),
                    "throughput": m.throughput,
                }
                for m in self.models
            ],
        }


class EstimateService(UseCases):
    def __init__(self, deps: Deps, router: Router) -> None:
        super().__init__(deps)
        self._router = router
        self._rules = BatchService(deps)

    def _queued(self, batches: list[tuple[str, list[str], int]]) -> dict[str, int]:
        """Lines still to run per model, ahead of a new batch: what no commit and no line this
        process finished covers (a batch of several models counts for each of them: which of
        its lines are left is not known here)."""
        queued: dict[str, int] = {}
        for batch_id, models, left in batches:
            left = max(left - sum(self._finished(batch_id)), 0)
            for model in models:
                queued[model] = queued.get(model, 0) + left
        return queued

    async def estimate(self, project: str, request: BatchRequest) -> Estimate:
        """The estimate of the batch `POST /v1/batches` would create with the same body: the
        same checks and errors first; a file this project cannot see is a 404."""
        window, _ = self._rules.check(request)
        row = await get_file(self._db, project, request.input_file_id, int(time.time()))
        if row is None:
            raise ApiError(
                404, f"No such File object: {request.input_file_id}", param="input_file_id"
            )
        chunks = self._blobs.iter_chunks(row.blob_key)
        return await self._estimate(chunks, request.endpoint, request.completion_window, window)

    async def estimate_chunks(
        self, chunks: AsyncIterator[bytes], *, endpoint: str, completion_window: str
    ) -> Estimate:
        """The same for bytes that were never uploaded (`lowtide estimate FILE`)."""
        window, _ = self._rules.check(BatchRequest("", endpoint, completion_window))
        return await self._estimate(chunks, endpoint, completion_window, window)

    async def endpoint_of(self, chunks: AsyncIterator[bytes]) -> str | None:
        """The `url` of the first request line: the endpoint a batch of it most likely wants."""
        return await first_request_url(chunks)

    async def _estimate(
        self, chunks: AsyncIterator[bytes], endpoint: str, completion_window: str, window: int
    ) -> Estimate:
        router = self._router
        tally = await tally_file(chunks, endpoint, router.route_for, router.engine_for)
        now = int(time.time())
        since = now - HISTORY_DAYS * 86400
        names = [t.model for t in tally.models]
        first_day = since - since % 86400  # the ledger's days start at 00:00 UTC
        averages = await history.output_per_request(self._db, endpoint, names, first_day)
        speeds = await history.observed_speeds(self._db, names, since, MIN_HISTORY_LINES)
        queued = self._queued(await history.queued_lines(self._db))
        return Estimate(
            endpoint,
            completion_window,
            window,
            self._currency,
            lines=tally.lines,
            invalid_lines=tally.invalid_lines,
            bytes=tally.bytes,
            models=_price_and_time(tally, averages, speeds, queued, router),
        )


def _price_and_time(
    tally: FileTally,
    averages: dict[str, float],
    speeds: dict[str, tuple[int, float]],
    queued: dict[str, int],
    router: Router,
) -> list[ModelEstimate]:
    """Money per model; time per route (its models share its limits and its queue)."""
    by_route: dict[str, list[ModelTally]] = {}
    for t in tally.models:
        by_route.setdefault(t.route.name, []).append(t)
    ahead: dict[str, int] = {}
    for model, lines in queued.items():
        route = router.route_for(model)
        if route is not None:
            ahead[route.name] = ahead.get(route.name, 0) + lines
    out = []
    for name, tallies in by_route.items():
        route = tallies[0].route
        expected = {t.model: _expected_output(t, averages.get(t.model)) for t in tallies}
        # For token limits: what the lines will really use (the ledger's average output where
        # there is one, their limits where not).
        tokens = sum(
            t.input_tokens + (expected[t.model] if t.model in averages else t.max_output_tokens)
            for t in tallies
        )
        seen = [speeds[t.model] for t in tallies if t.model in speeds]
        observed = (sum(s[0] for s in seen), sum(s[1] for s in seen)) if seen else None
        lines = sum(t.lines for t in tallies)
        seconds, source = _route_seconds(route, lines, tokens, ahead.get(name, 0), observed)
        for t in tallies:
            sync_high = route.sync_price(t.input_tokens, 0, t.max_output_tokens)
            sync_low = route.sync_price(t.input_tokens, 0, expected[t.model])
            factor = route.batch_price_factor
            out.append(
                ModelEstimate(
                    model=t.model,
                    lines=t.lines,
                    input_tokens=t.input_tokens,
                    input_tokens_method="tokenizer"
                    if t.counted_lines == t.lines
                    else "approximate",
                    max_output_tokens=t.max_output_tokens,
                    expected_output_tokens=expected[t.model],
                    low=sync_low * factor,
                    high=sync_high * factor,
                    sync_low=sync_low,
                    sync_high=sync_high,
                    priced=route.priced,
                    queued_lines=ahead.get(name, 0),
                    seconds=seconds,
                    throughput=source,
                )
            )
    return out


def _expected_output(t: ModelTally, average: float | None) -> int:
    """The low bound's output: the model's recent average per request, never above the
    lines' own limits; 0 with no history."""
    if average is None:
        return 0
    return min(round(average * t.lines), t.max_output_tokens)


def _route_seconds(
    route: ModelRoute,
    lines: int,
    tokens: int,
    queued: int,
    observed: tuple[int, float] | None,
) -> tuple[float, str]:
    """Seconds for the route's queue plus these lines, and which speed said so.

    Configured `rpm`/`tpm` bound the speed (an idle route first spends the one minute's burst
    its admission buckets hold); what finished batches of these models achieved bounds it too;
    where both are known the slower wins. With neither, the conservative default above.
    """
    total = queued + lines
    candidates: list[tuple[float, str]] = []
    if route.rpm or route.tpm:
        idle = queued == 0
        seconds = 0.0
        if route.rpm:
            left = total - (route.rpm if idle else 0)
            seconds = max(seconds, max(left, 0) * 60 / route.rpm)
        if route.tpm:
            left_tokens = total * tokens / max(lines, 1) - (route.tpm if idle else 0)
            seconds = max(seconds, max(left_tokens, 0) * 60 / route.tpm)
        candidates.append((seconds, "limits"))
    if observed is not None:
        done, spent = observed
        candidates.append((total * spent / done, "history"))
    if candidates:
        return max(candidates)
    slots = route.max_concurrency
    if route.engine == "llamacpp":
        slots = min(slots, route.parallel)
    return total * DEFAULT_SECONDS_PER_LINE_PER_SLOT / slots, "default"
