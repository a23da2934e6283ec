"""Merge committed segments, in input order, into the output file and the error file.

Nothing becomes visible until one transaction publishes both files and the terminal status,
and only if this worker still holds the finalize lease; a finalizer that dies midway leaves
temporary blobs that the next one simply writes again.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import orjson

from lowtide.blobs import BlobStore, BlobWriter
from lowtide.blobs.keys import file_key
from lowtide.ids import new_file_id, request_line_id
from lowtide.runner import segment_lines
from lowtide.runner.rerun import parse_previous
from lowtide.runner.results import CANCELLED_MESSAGE, EXPIRED_MESSAGE, error_line
from lowtide.runner.validation import iter_request_lines
from lowtide.store.chunks import chunks_of
from lowtide.store.database import Database
from lowtide.store.files import blob_key_of
from lowtide.store.leases import BatchTask
from lowtide.store.rows import BatchRow, Counts, FileRow, ShardRow
from lowtide.store.segments import batch_counts, publish_batch, segments_by_shard, shards_of
from lowtide.vocabulary import BatchStatus, FilePurpose, ShardStatus, StopReason

_FLUSH_BYTES = 1 << 20
DEFAULT_OUTPUT_TTL = 30 * 86400


class _OutputFile:
    """A streamed JSONL blob that is only published if it got at least one line."""

    def __init__(self, writer: BlobWriter, file_id: str, key: str) -> None:
        self.writer = writer
        self.file_id = file_id
        self.key = key
        self.lines = 0
        self._buffer = bytearray()

    async def add(self, line: bytes | memoryview) -> None:
        self._buffer += line
        self._buffer += b"\n"
        self.lines += 1
        if len(self._buffer) >= _FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            # Handed over as it is, not copied to bytes: a writer may keep it (an S3 part).
            data, self._buffer = self._buffer, bytearray()
            await self.writer.write(data)


async def finalize_batch(db: Database, blobs: BlobStore, task: BatchTask) -> bool:
    batch = task.batch
    outputs: list[_OutputFile] = []
    for _ in range(2):
        file_id = new_file_id()
        outputs.append(
            _OutputFile(await blobs.writer(file_key(file_id)), file_id, file_key(file_id))
        )
    out, err = outputs
    segment_keys: list[str] = []
    try:
        shards = await shards_of(db, batch.id)
        input_key = await blob_key_of(db, batch.input_file_id) if shards else ""
        kept = Counts()  # lines a stopped rerun never replayed: they keep their results
        by_shard = await segments_by_shard(db, batch.id) if shards else {}
        for shard in shards:
            for segment in by_shard.get(shard.idx, []):
                segment_keys.append(segment.blob_key)
                results = list(segment_lines.decode_views(await blobs.read(segment.blob_key)))
                if len(results) != segment.count:
                    raise RuntimeError(
                        f"segment {segment.blob_key} has {len(results)} lines, {segment.count} committed"
                    )
                for ok, line in results:
                    await (out if ok else err).add(line)
            if shard.prev_key is not None:
                segment_keys.append(shard.prev_key)
            if shard.status != ShardStatus.UPSTREAM and shard.committed < shard.request_count:
                kept += await _unfinished_lines(blobs, input_key, batch, shard, out, err)
        # Lines that went to a provider: each chunk committed a result for every line it did
        # not hand on to a later chunk.
        for chunk in await chunks_of(db, batch.id):
            if chunk.result_key is None:
                continue
            segment_keys.append(chunk.result_key)
            async for result in segment_lines.stream(blobs.iter_chunks(chunk.result_key)):
                await (out if result.ok else err).add(result.line)
        for f in outputs:
            await f.flush()
            if f.lines:
                await f.writer.commit()
            else:
                await f.writer.abort()
    except BaseException:
        for f in outputs:
            await f.writer.abort()
        raise

    now = int(time.time())
    ttl = batch.output_expires_seconds or DEFAULT_OUTPUT_TTL
    file_rows = [
        FileRow(
            id=f.file_id,
            project=batch.project,
            filename=f"{batch.id}_{name}.jsonl",
            purpose=FilePurpose.BATCH_OUTPUT,
            bytes=f.writer.bytes_written,
            created_at=now,
            expires_at=now + ttl,
            blob_key=f.key,
        )
        for f, name in ((out, "output"), (err, "error"))
        if f.lines
    ]
    terminal = _TERMINAL_STATUS[batch.stop_reason]
    values: dict[str, Any] = {
        "status": terminal,
        f"{terminal}_at": now,
        "output_file_id": out.file_id if out.lines else None,
        "error_file_id": err.file_id if err.lines else None,
        **asdict(await batch_counts(db, batch.id) + kept),
    }
    if not await publish_batch(db, batch.id, task.epoch, values, file_rows):
        for f in outputs:
            if f.lines:
                await blobs.delete(f.key)
        return False
    for key in segment_keys:
        await blobs.delete(key)
    return True


_TERMINAL_STATUS = {
    None: BatchStatus.COMPLETED,
    StopReason.CANCELLED: BatchStatus.CANCELLED,
    StopReason.EXPIRED: BatchStatus.EXPIRED,
}


async def _unfinished_lines(
    blobs: BlobStore,
    input_key: str,
    batch: BatchRow,
    shard: ShardRow,
    out: _OutputFile,
    err: _OutputFile,
) -> Counts:
    """Lines that never ran become batch_cancelled / batch_expired error lines; in a rerun that
    stopped early, lines that keep an earlier result keep it."""
    code, message = (
        ("batch_expired", EXPIRED_MESSAGE)
        if batch.stop_reason == StopReason.EXPIRED
        else ("batch_cancelled", CANCELLED_MESSAGE)
    )
    data = await blobs.read_range(input_key, shard.byte_start, shard.byte_end)
    lines = iter_request_lines(data)
    previous = parse_previous(await blobs.read(shard.prev_key)) if shard.prev_key else None
    kept = Counts()
    for offset in range(shard.committed, shard.request_count):
        if previous is not None and (line := previous[offset]) is not None:
            await (out if line.ok else err).add(line.line)
            if line.ok:
                kept.completed += 1
            else:
                kept.failed += 1
            continue
        custom_id = orjson.loads(lines[offset]).get("custom_id")
        line_id = request_line_id(batch.id, shard.first_request + offset)
        await err.add(error_line(line_id, custom_id, code, message).line)
    return kept
