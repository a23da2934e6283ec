"""What finished lines add up to: line counts, tokens, money, and the ledger's daily rows.

A line's cost is its usage at its route's synchronous prices (per 1M tokens) times the route's
`batch_price_factor`; a segment carries the sum, committed with the lines themselves.
"""

from __future__ import annotations

from operator import attrgetter

import msgspec

from lowtide.config import ModelRoute
from lowtide.runner.segment_lines import ResultLine
from lowtide.store.rows import Counts, Usage
from lowtide.store.usage import UsageDelta


class FinishedLine(msgspec.Struct, gc=False):
    """One line's result and what it adds up to. (A msgspec Struct, as the other per-line
    records: built without a Python call, and never scanned by the cyclic collector while a
    shard holds a segment's worth of them.)"""

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
        return FinishedLine(result, usage, model, True, False)
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
    """The segment's counts, and its usage by model for the daily ledger. Sums run in C over
    the segment's lines (in line order, as a loop would add them); only a segment that mixes
    models or unanswered, unpriced or kept lines walks them one by one for the ledger."""
    usages = list(map(_USAGE, items))
    completed = sum(map(_OK, items))
    counts = Counts(
        sum(map(_INPUT, usages)),
        sum(map(_OUTPUT, usages)),
        sum(map(_CACHED, usages)),
        sum(map(_REASONING, usages)),
        completed=completed,
        failed=len(items) - completed,
        cost=sum(map(_COST, items), 0.0),
        sync_cost=sum(map(_SYNC_COST, items), 0.0),
    )
    models = set(map(_MODEL, items))
    if len(models) == 1 and all(map(_ANSWERED, items)) and not any(map(_REPLAYED, items)):
        counts.unpriced = len(items) - sum(map(_PRICED, items))
        delta = UsageDelta(
            model=models.pop(),
            endpoint=endpoint,
            requests=len(items),
            input_tokens=counts.input_tokens,
            output_tokens=counts.output_tokens,
            cached_tokens=counts.cached_tokens,
            cost=counts.cost,
            sync_cost=counts.sync_cost,
        )
        return counts, [delta]
    by_model: dict[str, UsageDelta] = {}
    for line in items:
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
        delta.input_tokens += line.usage.input_tokens
        delta.output_tokens += line.usage.output_tokens
        delta.cached_tokens += line.usage.cached_tokens
        delta.cost += line.cost
        delta.sync_cost += line.sync_cost
    return counts, list(by_model.values())


_USAGE, _MODEL, _COST, _SYNC_COST = (attrgetter(n) for n in ("usage", "model", "cost", "sync_cost"))
_OK, _ANSWERED, _PRICED, _REPLAYED = (
    attrgetter(n) for n in ("result.ok", "answered", "priced", "replayed")
)
_INPUT, _OUTPUT, _CACHED, _REASONING = (
    attrgetter(n) for n in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
)
