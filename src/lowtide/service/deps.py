"""What the use cases need, and nothing more: not the worker, not the engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lowtide.blobs import BlobStore
from lowtide.config import BatchLimits, BatchWebhooks
from lowtide.errors import invalid_value
from lowtide.store.database import Database

_MIN_TTL, _MAX_TTL = 3600, 2_592_000  # an expires_after of 1 hour to 30 days


@dataclass(frozen=True, slots=True)
class Deps:
    db: Database
    blobs: BlobStore
    limits: BatchLimits
    wake: Callable[[], None]  # new work, a delete or a cancel: tell this process's worker now
    currency: str = "USD"
    batch_webhooks: BatchWebhooks = field(default_factory=BatchWebhooks)  # per-batch URL policy
    # Lines of a batch this process finished but has not committed yet (ok, failed): shown in
    # request_counts so they move line by line, not a segment at a time.
    finished: Callable[[str], tuple[int, int]] = lambda batch_id: (0, 0)


class UseCases:
    """The base of each service: its narrow dependencies, nothing else."""

    def __init__(self, deps: Deps) -> None:
        self._db, self._blobs, self._limits, self._wake = (
            deps.db,
            deps.blobs,
            deps.limits,
            deps.wake,
        )
        self._currency = deps.currency
        self._batch_webhooks = deps.batch_webhooks
        self._finished = deps.finished


def expires_after_seconds(param: str, anchor: str | None, seconds: object) -> int:
    """OpenAI's `expires_after` rule, for uploads and batch outputs alike: anchored at
    created_at, an integer number of seconds from an hour to 30 days."""
    if anchor != "created_at":
        raise invalid_value(
            f"{param}.anchor",
            f"Invalid value for '{param}.anchor': only 'created_at' is supported.",
        )
    if isinstance(seconds, str) and seconds.isascii() and seconds.isdigit() and len(seconds) <= 10:
        seconds = int(seconds)
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int)
        or not _MIN_TTL <= seconds <= _MAX_TTL
    ):
        raise invalid_value(
            f"{param}.seconds",
            f"Invalid value for '{param}.seconds': must be an integer between {_MIN_TTL} and "
            f"{_MAX_TTL}.",
        )
    return seconds
