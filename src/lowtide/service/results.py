"""A batch's result lines: committed segments while it runs, its published files once it ended."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from lowtide.blobs import BlobStore
from lowtide.errors import ApiError
from lowtide.runner import segment_lines
from lowtide.store.chunks import chunks_of
from lowtide.store.database import Database
from lowtide.store.files import get_file
from lowtide.store.rows import BatchRow, FileRow
from lowtide.store.segments import segments_of, shards_of


async def published(
    db: Database, blobs: BlobStore, batch: BatchRow, *, output: bool, errors: bool
) -> AsyncIterator[bytes]:
    """The ended batch's output and/or error file; 404 if one was deleted or has expired."""
    wanted = [
        (name, file_id)
        for name, file_id, asked in (
            ("output", batch.output_file_id, output),
            ("error", batch.error_file_id, errors),
        )
        if asked and file_id
    ]
    rows: list[FileRow] = []
    for name, file_id in wanted:
        row = await get_file(db, batch.project, file_id, int(time.time()))
        if row is None:
            raise ApiError(
                404,
                f"The {name} file {file_id} of batch {batch.id} was deleted or has expired, "
                "so its results are gone.",
                param="batch_id",
                code="file_not_found",
            )
        rows.append(row)
    return _concat(blobs, rows)


async def _concat(blobs: BlobStore, rows: list[FileRow]) -> AsyncIterator[bytes]:
    for row in rows:
        async for chunk in blobs.iter_chunks(row.blob_key):
            yield chunk


async def committed(
    db: Database, blobs: BlobStore, batch_id: str, *, output: bool, errors: bool
) -> AsyncIterator[bytes]:
    """Committed lines are final (they never change or repeat), so a consumer can start early.

    If the batch is finalized while this streams, its segments go and the stream ends early:
    what it sent is still true, only incomplete.
    """
    for shard in await shards_of(db, batch_id):
        for segment in await segments_of(db, batch_id, shard.idx):
            try:
                data = await blobs.read(segment.blob_key)
            except FileNotFoundError:
                return
            out = [r.line for r in segment_lines.decode(data) if (output if r.ok else errors)]
            if out:
                yield b"\n".join(out) + b"\n"
    for chunk in await chunks_of(db, batch_id):  # lines back from a provider's Batch API
        if chunk.result_key is None:
            continue
        try:
            async for r in segment_lines.stream(blobs.iter_chunks(chunk.result_key)):
                if output if r.ok else errors:
                    yield r.line + b"\n"
        except FileNotFoundError:
            return
