"""What finished lines add up to: line counts, tokens, money, and the ledger's daily rows.

A line's cost is its usage at its route's synchronous prices (per 1M tokens) times the route's
`batch_price_factor`; a segment carries the sum, committed with the lines themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowtide.config import ModelRoute
from lowtide.runner.segment_lines import ResultLine
from lowtide.store.rows import Counts, Usage
from lowtide.store.usage import UsageDelta


@dataclass(slots=True)
class FinishedLine:
    result: ResultLine
    usage: Usage
    model: str = ""
    answered: bool = False  # the engine answered it: a request was made (and may be billed)
    priced: bool = True
    cost: float = 0.0
    sync_cost: float = 0.0
    replayed: bool = False  # kept from an earlier run of a retried batch: already in the ledger


def answered(
    result: ResultLine, usage: Usage, route: ModelRoute, model: str, *, provider_batch: bool
) -> FinishedLine:
    """A line the engine answered, priced at its route's prices: the batch price, or the full
    price for a synchronous call on a route whose lines normally go as provider batches."""
    if not route.priced:  # on every line's path: a route without prices asks nothing more
        return FinishedLine(result, usage, model, answered=True, priced=False)
    sync = route.sync_price(usage.input_tokens, usage.cached_tokens, usage.output_tokens)
    return FinishedLine(
        result,
        usage,
        model,
        answered=True,
        cost=sync * route.price_factor(provider_batch=provider_batch),
        sync_cost=sync,
    )


def replayed(
    result: ResultLine, usage: Usage, route: ModelRoute | None, model: str
) -> FinishedLine:
    """A result kept from an earlier run: it counts (tokens, cost) in the merged batch, but it
    is not charged again. Its cost is read at the route's prices of today."""
    sync = (
        route.sync_price(usage.input_tokens, usage.cached_tokens, usage.output_tokens)
        if route
        else 0.0
    )
    return FinishedLine(
        result,
        usage,
        model,
        answered=result.ok or usage.input_tokens > 0,
        priced=route is not None and route.priced,
        cost=sync * route.price_factor() if route else 0.0,
        sync_cost=sync,
        replayed=True,
    )


def unanswered(result: ResultLine) -> FinishedLine:
    """A line that failed before any engine answered (no route, timeouts): it costs nothing."""
    return FinishedLine(result, Usage())


def tally(items: list[FinishedLine], endpoint: str) -> tuple[Counts, list[UsageDelta]]:
    """The segment's counts, and its usage by model for the daily ledger."""
    counts = Counts()
    by_model: dict[str, UsageDelta] = {}
    for line in items:
        if line.result.ok:
            counts.completed += 1
        else:
            counts.failed += 1
        _add(counts, line)
        counts.reasoning_tokens += line.usage.reasoning_tokens
        if not line.answered:
            continue
        if not line.priced:
            counts.unpriced += 1
        if line.replayed:
            continue  # in the ledger since the run that answered it
        delta = by_model.get(line.model)
        if delta is None:
            delta = by_model[line.model] = UsageDelta(model=line.model, endpoint=endpoint)
        delta.requests += 1
        _add(delta, line)
    return counts, list(by_model.values())


def _add(sums: Counts | UsageDelta, line: FinishedLine) -> None:
    sums.input_tokens += line.usage.input_tokens
    sums.output_tokens += line.usage.output_tokens
    sums.cached_tokens += line.usage.cached_tokens
    sums.cost += line.cost
    sums.sync_cost += line.sync_cost
