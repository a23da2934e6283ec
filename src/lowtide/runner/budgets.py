"""Per-project budgets (`[projects.NAME]`): what a batch may start with, and when the lines of a
running batch must wait.

A batch is refused at validation (the way OpenAI refuses one over its enqueued-token limit)
when its input tokens alone — an estimate it cannot come in under — do not fit: the tokens
already enqueued by the project's unfinished batches, or what is left of the day's budget. A
running batch whose project reaches its daily budget pauses: its lines wait for the next UTC
day (or a raised budget and a restart), nothing fails; the completion window still applies.
"""

from __future__ import annotations

import time
from typing import Any

from lowtide.config import Config
from lowtide.engines.router import Router
from lowtide.store.batches import enqueued_tokens
from lowtide.store.database import Database
from lowtide.store.rows import BatchRow
from lowtide.store.usage import cost_on, day_of

_SPEND_TTL = 1.0  # seconds a project's spend today is cached between looks


async def refusals(
    db: Database, config: Config, router: Router, batch: BatchRow, input_tokens: dict[str, int]
) -> list[dict[str, Any]]:
    """Validation errors for a batch its project's budgets cannot take; [] when it fits."""
    limits = config.projects.get(batch.project)
    if limits is None:
        return []
    errors = []
    tokens = sum(input_tokens.values())
    if limits.max_enqueued_tokens is not None:
        queued = await enqueued_tokens(db, batch.project, besides=batch.id)
        if queued + tokens > limits.max_enqueued_tokens:
            errors.append(
                _error(
                    "token_limit_exceeded",
                    f"Enqueued token limit reached for project {batch.project}. Limit: "
                    f"{limits.max_enqueued_tokens:,} enqueued tokens; {queued:,} are enqueued and "
                    f"this batch has about {tokens:,}. Please try again once some in_progress "
                    "batches have been completed.",
                )
            )
    if limits.max_cost_per_day is not None:
        cost = 0.0
        for model, count in input_tokens.items():
            route = router.route_for(model)
            if route is not None:
                cost += route.sync_price(count, 0, 0) * route.batch_price_factor
        left = limits.max_cost_per_day - await cost_on(db, batch.project, day_of(time.time()))
        if cost > left:
            errors.append(
                _error(
                    "budget_exceeded",
                    f"The input of this batch alone costs about {cost:.6g} {config.currency}, "
                    f"more than the {max(left, 0.0):.6g} {config.currency} left of project "
                    f"{batch.project}'s daily budget ({limits.max_cost_per_day:g}). Try again "
                    "tomorrow (UTC) or raise max_cost_per_day.",
                )
            )
    return errors


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "line": None, "param": None, "message": message}


class DailySpend:
    """Whether a project has reached its daily budget, looked up at most once a second."""

    def __init__(self, db: Database, config: Config) -> None:
        self._db = db
        self._config = config
        self._seen: dict[str, tuple[float, float]] = {}  # project -> (looked at, spent)

    def limited(self, project: str) -> bool:
        """Whether the project has a daily budget at all (most have none: then every line
        skips the look, and its await)."""
        limits = self._config.projects.get(project)
        return limits is not None and limits.max_cost_per_day is not None

    async def over_budget(self, project: str) -> str | None:
        """Why the project's lines must wait now, or None."""
        limits = self._config.projects.get(project)
        if limits is None or limits.max_cost_per_day is None:
            return None
        now = time.monotonic()
        looked, spent = self._seen.get(project, (0.0, 0.0))
        if now - looked > _SPEND_TTL:
            spent = await cost_on(self._db, project, day_of(time.time()))
            self._seen[project] = (now, spent)
        if spent < limits.max_cost_per_day:
            return None
        return (
            f"project {project} reached its daily budget ({spent:.6g} of "
            f"{limits.max_cost_per_day:g} {self._config.currency} spent today, UTC): its lines "
            "wait for tomorrow or a raised budget"
        )
