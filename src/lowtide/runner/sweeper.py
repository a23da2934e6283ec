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
    """Orphaned segment blobs older than `grace` seconds, and incomplete writes."""
    removed = await blobs.sweep_incomplete(INCOMPLETE_WRITE_SECONDS)
    batch_id: str | None = None
    keys: list[str] = []
    async for key, modified in blobs.list_keys("segments/"):
        if modified > now - grace:
            continue
        owner = key.split("/")[1] if key.count("/") >= 2 else ""
        if owner != batch_id or len(keys) >= _CHUNK:
            removed += await _drop_unreferenced(db, blobs, batch_id, keys)
            batch_id, keys = owner, []
        keys.append(key)
    removed += await _drop_unreferenced(db, blobs, batch_id, keys)
    keys = []
    async for key, modified in blobs.list_keys("files/"):
        if modified <= now - grace:
            keys.append(key)
        if len(keys) >= _CHUNK:
            removed += await _drop_unrecorded(db, blobs, keys)
            keys = []
    removed += await _drop_unrecorded(db, blobs, keys)
    if removed:
        log.info("removed %d orphaned blobs and incomplete writes", removed)
    return removed


async def _drop_unreferenced(
    db: Database, blobs: BlobStore, batch_id: str | None, keys: list[str]
) -> int:
    if not keys:
        return 0
    status = await work.batch_status(db, batch_id) if batch_id else None
    if status is None or status in TERMINAL:
        keep: set[str] = set()  # nothing reads a finished batch's segments
    else:
        keep = await work.committed_segment_keys(db, batch_id, keys)  # type: ignore[arg-type]
    doomed = [k for k in keys if k not in keep]
    for key in doomed:
        await blobs.delete(key)
    return len(doomed)


async def _drop_unrecorded(db: Database, blobs: BlobStore, keys: list[str]) -> int:
    if not keys:
        return 0
    keep = await known_blob_keys(db, keys)
    doomed = [k for k in keys if k not in keep]
    for key in doomed:
        await blobs.delete(key)
    return len(doomed)
