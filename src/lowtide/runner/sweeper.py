"""Retention and leftovers: nothing a user deleted, nothing that expired and nothing a crashed
process half-wrote stays in the blob store.

- Expired or deleted files: rows and blobs go once no unfinished batch reads them.
- Segment blobs nobody will read: those of finished batches (a finalizer died before it
  deleted them) and those never committed (a worker died, or lost its lease, between writing
  the blob and committing it). Only blobs older than a grace period are touched, so a commit
  in flight is never raced.
- File blobs with no row: a process died between writing a file and recording it.
- Writes that were never completed: local temp files, S3 multipart uploads.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from lowtide.blobs import BlobStore
from lowtide.store import work
from lowtide.store.batches import TERMINAL
from lowtide.store.database import Database
from lowtide.store.files import known_blob_keys, take_removable

log = logging.getLogger("lowtide.sweeper")

_CHUNK = 500
# An upload of a very large file can take hours; a write older than this has surely died.
INCOMPLETE_WRITE_SECONDS = 24 * 3600


async def sweep_files(db: Database, blobs: BlobStore, now: int) -> int:
    removed = 0
    while keys := await take_removable(db, now):
        for key in keys:
            await blobs.delete(key)
        removed += len(keys)
    if removed:
        log.info("removed %d expired or deleted files", removed)
    return removed


async def sweep_leftovers(db: Database, blobs: BlobStore, now: float, grace: float) -> int:
    """Orphaned blobs last written more than `grace` seconds ago, and incomplete writes."""
    removed = await blobs.sweep_incomplete(INCOMPLETE_WRITE_SECONDS)
    cutoff = now - grace
    async for batch_id, keys in _old_keys(blobs, "segments/", cutoff, _batch_of):
        removed += await _delete_except(blobs, keys, await _live_segments(db, batch_id, keys))
    async for _, keys in _old_keys(blobs, "files/", cutoff, lambda key: ""):
        removed += await _delete_except(blobs, keys, await known_blob_keys(db, keys))
    if removed:
        log.info("removed %d orphaned blobs and incomplete writes", removed)
    return removed


def _batch_of(segment_key: str) -> str:
    """segments/<batch id>/<name> -> the batch id ("" for a key of another shape)."""
    parts = segment_key.split("/")
    return parts[1] if len(parts) >= 3 else ""


async def _old_keys(
    blobs: BlobStore, prefix: str, cutoff: float, group_of: Callable[[str], str]
) -> AsyncIterator[tuple[str, list[str]]]:
    """Keys under `prefix` last written before `cutoff`, in chunks whose keys share a group."""
    group, keys = "", []
    async for key, modified in blobs.list_keys(prefix):
        if modified > cutoff:
            continue
        if keys and (group_of(key) != group or len(keys) >= _CHUNK):
            yield group, keys
            keys = []
        group = group_of(key)
        keys.append(key)
    if keys:
        yield group, keys


async def _live_segments(db: Database, batch_id: str, keys: list[str]) -> set[str]:
    """The keys a committed segment of an unfinished batch names; nothing reads the others."""
    status = await work.batch_status(db, batch_id)
    if status is None or status in TERMINAL:
        return set()
    return await work.committed_segment_keys(db, batch_id, keys)


async def _delete_except(blobs: BlobStore, keys: list[str], keep: set[str]) -> int:
    doomed = [k for k in keys if k not in keep]
    for key in doomed:
        await blobs.delete(key)
    return len(doomed)
