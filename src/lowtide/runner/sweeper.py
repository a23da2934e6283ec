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

from lowtide.blobs import BlobStore, keys
from lowtide.store.database import Database
from lowtide.store.files import known_file_ids, take_removable
from lowtide.store.leftovers import live_segment_keys

log = logging.getLogger("lowtide.sweeper")

_CHUNK = 500
# An upload of a very large file can take hours; a write older than this has surely died.
INCOMPLETE_WRITE_SECONDS = 24 * 3600


async def sweep_files(db: Database, blobs: BlobStore, now: int) -> int:
    removed = 0
    while gone := await take_removable(db, now):
        for key in gone:
            await blobs.delete(key)
        removed += len(gone)
    if removed:
        log.info("removed %d expired or deleted files", removed)
    return removed


async def sweep_leftovers(db: Database, blobs: BlobStore, now: float, grace: float) -> int:
    """Orphaned blobs last written more than `grace` seconds ago, and incomplete writes."""
    removed = await blobs.sweep_incomplete(INCOMPLETE_WRITE_SECONDS)
    cutoff = now - grace
    async for batch_id, chunk in _old_keys(blobs, keys.SEGMENTS, cutoff, keys.batch_of_segment):
        removed += await _delete_except(blobs, chunk, await live_segment_keys(db, batch_id, chunk))
    async for _, chunk in _old_keys(blobs, keys.FILES, cutoff, lambda key: ""):
        known = await known_file_ids(db, [keys.file_id_of(k) for k in chunk])
        removed += await _delete_except(blobs, chunk, {keys.file_key(i) for i in known})
    if removed:
        log.info("removed %d orphaned blobs and incomplete writes", removed)
    return removed


async def _old_keys(
    blobs: BlobStore, prefix: str, cutoff: float, group_of: Callable[[str], str]
) -> AsyncIterator[tuple[str, list[str]]]:
    """Keys under `prefix` last written before `cutoff`, in chunks whose keys share a group."""
    group, chunk = "", []
    async for key, modified in blobs.list_keys(prefix):
        if modified > cutoff:
            continue
        if chunk and (group_of(key) != group or len(chunk) >= _CHUNK):
            yield group, chunk
            chunk = []
        group = group_of(key)
        chunk.append(key)
    if chunk:
        yield group, chunk


async def _delete_except(blobs: BlobStore, chunk: list[str], keep: set[str]) -> int:
    doomed = [k for k in chunk if k not in keep]
    for key in doomed:
        await blobs.delete(key)
    return len(doomed)
