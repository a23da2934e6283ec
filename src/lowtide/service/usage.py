"""Usage and costs over time, per project, from the daily ledger: OpenAI's organization usage
and costs APIs, answered in daily buckets."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lowtide.errors import invalid_value
from lowtide.service.deps import UseCases
from lowtide.store.usage import DAY, UsageSums, day_of, usage_rows
from lowtide.vocabulary import ENDPOINTS

COMPLETIONS = tuple(e for e in ENDPOINTS if e != "/v1/embeddings")
EMBEDDINGS = ("/v1/embeddings",)
MAX_BUCKETS = 31


@dataclass(slots=True, kw_only=True)
class UsageGroup(UsageSums):
    """One result of a bucket: the sums of the ledger rows that share the grouped fields."""

    project: str | None = None
    model: str | None = None


@dataclass(slots=True)
class Bucket:
    start_time: int
    end_time: int
    groups: list[UsageGroup] = field(default_factory=list)


@dataclass(slots=True)
class UsagePage:
    buckets: list[Bucket]
    next_page: str | None


class UsageService(UseCases):
    @property
    def currency(self) -> str:
        return self._currency

    async def buckets(
        self,
        project: str,
        *,
        admin: bool,
        start_time: int,
        end_time: int | None,
        bucket_width: str,
        group_by: list[str],
        limit: int,
        page: str | None,
        endpoints: tuple[str, ...] | None,
        project_ids: list[str] | None = None,
        models: list[str] | None = None,
    ) -> UsagePage:
        """Daily buckets from `start_time` (or the `page` cursor) on, up to `limit` of them.

        A project's key sees its own project; an admin key sees every project, or `project_ids`.
        """
        if bucket_width != "1d":
            raise invalid_value(
                "bucket_width", "Lowtide keeps usage in daily buckets: use bucket_width=1d."
            )
        if not 1 <= limit <= MAX_BUCKETS:
            raise invalid_value("limit", f"limit must be between 1 and {MAX_BUCKETS}.")
        first = day_of(start_time)
        if page is not None:  # the next_page of an earlier answer: a day to go on from
            if not (page.isascii() and page.isdigit()):
                raise invalid_value("page", f"Unknown page cursor {page!r}.")
            first = max(first, day_of(int(page)))
        end = int(end_time if end_time is not None else time.time() + 1)
        last = max(first, min(end, first + limit * DAY))  # exclusive; empty if end <= first
        rows = await usage_rows(
            self._db,
            project=None if admin else project,
            start_day=first,
            end_day=last,
            endpoints=endpoints,
        )
        buckets = {day: Bucket(day, day + DAY) for day in range(first, last, DAY)}
        for row in rows:
            if admin and project_ids and row["project"] not in project_ids:
                continue
            if models and row["model"] not in models:
                continue
            key_project = row["project"] if "project_id" in group_by else None
            key_model = row["model"] if ("model" in group_by or "line_item" in group_by) else None
            bucket = buckets[row["day"]]
            group = next(
                (g for g in bucket.groups if (g.project, g.model) == (key_project, key_model)),
                None,
            )
            if group is None:
                group = UsageGroup(project=key_project, model=key_model)
                bucket.groups.append(group)
            group.add(row)
        next_page = str(last) if last < end and last < day_of(time.time()) + DAY else None
        return UsagePage(list(buckets.values()), next_page)
