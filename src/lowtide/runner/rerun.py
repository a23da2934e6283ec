"""Rerun what did not succeed: plan a retried batch from the files it published.

Finalize writes the output and error files shard by shard, each shard's lines in input order, so
one pass over the input beside the two files tells every line's earlier result without holding
more than a shard in memory. Each shard gets a blob of its previous results: per line, the
result to keep or a mark to run the line again. The shard runner replays kept lines (no engine
call, no new charge) and runs the rest, so the new files come out merged, in input order, with
every custom_id once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from lowtide.blobs import BlobStore
from lowtide.blobs.keys import previous_results_key
from lowtide.runner import segment_lines
from lowtide.runner.validation import iter_request_lines, stream_lines
from lowtide.store.batches import start_rerun
from lowtide.store.database import Database
from lowtide.store.files import blob_key_of
from lowtide.store.leases import BatchTask
from lowtide.store.segments import shards_of

RERUN = b"r"  # a line of a previous-results blob: run this line again


@dataclass(slots=True)
class RerunRequest:
    """Which lines to run again: every line that did not succeed, or those of these error
    codes, or these custom_ids (both: a line must match both)."""

    codes: list[str] | None = None
    custom_ids: set[str] | None = field(default=None)

    def wants(self, custom_id: str, code: str | None) -> bool:
        if self.codes is not None and code not in self.codes:
            return False
        return self.custom_ids is None or custom_id in self.custom_ids

    def dumps(self) -> str:
        custom_ids = sorted(self.custom_ids) if self.custom_ids is not None else None
        return orjson.dumps({"codes": self.codes, "custom_ids": custom_ids}).decode()

    @classmethod
    def loads(cls, text: str) -> RerunRequest:
        data = orjson.loads(text)
        ids = data.get("custom_ids")
        return cls(codes=data.get("codes"), custom_ids=set(ids) if ids is not None else None)


class _ResultFile:
    """A published file's lines, read in order; `take` hands over the head line if it is the
    result of `custom_id`."""

    def __init__(self, blobs: BlobStore, key: str | None) -> None:
        self._lines = stream_lines(blobs.iter_chunks(key)) if key else None
        self._head: tuple[str, bytes] | None = None
        self._done = key is None

    async def take(self, custom_id: str) -> bytes | None:
        if self._head is None and not self._done:
            assert self._lines is not None
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                self._done = True
            else:
                self._head = (str(orjson.loads(line).get("custom_id")), line)
        if self._head is not None and self._head[0] == custom_id:
            line = self._head[1]
            self._head = None
            return line
        return None


async def plan_rerun(db: Database, blobs: BlobStore, task: BatchTask) -> bool:
    """Write each shard's previous results and start its shards again, if the lease holds."""
    batch = task.batch
    assert batch.retry_request is not None
    request = RerunRequest.loads(batch.retry_request)
    output = _ResultFile(blobs, await _key_of(db, batch.output_file_id))
    errors = _ResultFile(blobs, await _key_of(db, batch.error_file_id))
    input_key = await blob_key_of(db, batch.input_file_id)
    previous: dict[int, str] = {}
    written: list[str] = []
    try:
        for shard in await shards_of(db, batch.id):
            data = await blobs.read_range(input_key, shard.byte_start, shard.byte_end)
            plan = bytearray()
            for raw in iter_request_lines(data):
                custom_id = str(orjson.loads(raw)["custom_id"])
                line = await output.take(custom_id)
                if line is not None:
                    plan += segment_lines.encode([segment_lines.ResultLine(True, line)])
                    continue
                line = await errors.take(custom_id)
                code = _error_code(line) if line is not None else None
                if line is None or request.wants(custom_id, code):
                    plan += RERUN + b"\n"
                else:
                    plan += segment_lines.encode([segment_lines.ResultLine(False, line)])
            key = previous_results_key(batch.id, shard.idx)
            await blobs.put(key, bytes(plan))
            written.append(key)
            previous[shard.idx] = key
        started = await start_rerun(db, batch.id, task.epoch, previous)
    except BaseException:
        for key in written:
            await blobs.delete(key)
        raise
    if not started:
        for key in written:
            await blobs.delete(key)
    return started


def parse_previous(data: bytes) -> list[segment_lines.ResultLine | None]:
    """A previous-results blob: per line, the result to keep, or None to run it again."""
    return [
        None if raw == RERUN else segment_lines.ResultLine(raw[:1] == b"o", raw[1:])
        for raw in data.split(b"\n")
        if raw
    ]


def _error_code(line: bytes) -> str | None:
    error: Any = orjson.loads(line).get("error")
    if isinstance(error, dict) and error.get("code") is not None:
        return str(error["code"])
    return None


async def _key_of(db: Database, file_id: str | None) -> str | None:
    return await blob_key_of(db, file_id) if file_id else None
