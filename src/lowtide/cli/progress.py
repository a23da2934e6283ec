"""Progress-bar columns for batches: line counts, lines a second, time left, cost.

Each column reads a task field when the caller has a better figure (the server's own rate and
estimated finish, say) and falls back to what Rich measures from the task's progress.
"""

from __future__ import annotations

from datetime import timedelta

from rich.progress import ProgressColumn, Task
from rich.text import Text


class LineCountsColumn(ProgressColumn):
    """`120 ok, 3 failed / 500`; the fields `ok` and `failed` split `completed`."""

    def render(self, task: Task) -> Text:
        ok, failed = task.fields.get("ok"), task.fields.get("failed")
        total = f"{task.total:,.0f}" if task.total is not None else "?"
        if ok is None or failed is None:
            return Text(f"{task.completed:,.0f} / {total}", style="progress.download")
        text = Text(f"{ok:,} ok", style="green")
        if failed:
            text.append(f", {failed:,} failed", style="red")
        text.append(f" / {total}", style="progress.download")
        return text


class LinesPerSecondColumn(ProgressColumn):
    """Lines a second: the field `rate` when set, else Rich's estimate from recent progress."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        if rate is None:
            rate = task.speed
        if not rate:
            return Text("- lines/s", style="progress.data.speed")
        shown = f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}"
        return Text(f"{shown} lines/s", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """Time left: the field `eta` (seconds) when set, else Rich's estimate from the rate."""

    max_refresh = 0.5  # a steadier figure than one recomputed on every refresh

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("ETA 0:00:00", style="progress.remaining")
        eta = task.fields.get("eta")
        if eta is None:
            eta = task.time_remaining
        if eta is None:
            return Text("ETA -:--:--", style="progress.remaining")
        return Text(f"ETA {timedelta(seconds=int(max(eta, 0)))}", style="progress.remaining")


class CostColumn(ProgressColumn):
    """The field `cost` (text), if any: what the batch has cost so far."""

    def render(self, task: Task) -> Text:
        cost = task.fields.get("cost")
        return Text(str(cost), style="cyan") if cost else Text("")
