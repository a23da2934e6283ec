"""Anthropic's Message Batches, as batches of the one core.

A create writes its `requests` into an input file of request lines (url `/v1/messages`) as they
arrive and makes an ordinary batch of it; everything after that (scheduling, retries, crash
safety, cost, webhooks, the dashboard) is the core's. Only what Anthropic's API does beyond
OpenAI's lives here: ids of its own, listing both ways, deleting an ended batch.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from lowtide.config import MessageBatchLimits
from lowtide.errors import ApiError
from lowtide.ids import new_message_batch_id
from lowtide.runner.validation import stream_lines
from lowtide.service.batches import BatchRequest, BatchService, BatchView, batch_not_found
from lowtide.service.deps import Deps
from lowtide.service.files import FileService
from lowtide.store import batches as batch_store
from lowtide.store import files as file_store
from lowtide.vocabulary import MESSAGES_ENDPOINT, TERMINAL, BatchStatus

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}", re.ASCII)
_FLUSH_BYTES = 1024 * 1024


@dataclass(slots=True)
class MessageRequest:
    """One item of a create's `requests`, as the face parsed it."""

    index: int
    custom_id: Any
    params: Any
    extra: list[str]  # keys besides custom_id and params


class MessageBatchService:
    def __init__(
        self, deps: Deps, limits: MessageBatchLimits, files: FileService, batches: BatchService
    ) -> None:
        self._db = deps.db
        self._wake = deps.wake
        self.limits = limits
        self._files = files
        self._batches = batches

    async def create(self, project: str, requests: AsyncIterable[MessageRequest]) -> BatchView:
        """Stream the requests into an input file, then start a batch on it; a bad item is a
        400 naming it (`requests.<i>...`), and nothing is created."""
        batch_id = new_message_batch_id()
        upload = await self._files.start_upload()
        seen: set[str] = set()
        buffer = bytearray()
        try:
            async for item in requests:
                custom_id = _checked(item)
                if custom_id in seen:
                    raise _invalid(
                        f"requests.{item.index}.custom_id: Duplicate custom_id {custom_id!r}: "
                        "each request in a batch needs its own."
                    )
                seen.add(custom_id)
                if len(seen) > self.limits.max_requests:
                    raise ApiError(
                        413,
                        f"A message batch holds at most {self.limits.max_requests:,} requests.",
                        type="request_too_large",
                    )
                line = {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": MESSAGES_ENDPOINT,
                    "body": item.params,
                }
                try:
                    buffer += orjson.dumps(line) + b"\n"
                except orjson.JSONEncodeError as exc:
                    raise _invalid(f"requests.{item.index}.params: {exc}") from None
                if len(buffer) >= _FLUSH_BYTES:
                    await upload.write(bytes(buffer))
                    buffer.clear()
            if not seen:
                raise _invalid("requests: List should have at least 1 item.")
            await upload.write(bytes(buffer))
        except BaseException:
            await upload.abort()
            raise
        file = await self._files.finish_upload(
            upload, project, purpose="batch", filename=f"{batch_id}_requests.jsonl"
        )
        request = BatchRequest(file.id, MESSAGES_ENDPOINT, self.limits.completion_window)
        return await self._batches.create(project, request, batch_id=batch_id, total=len(seen))

    async def get(self, project: str, batch_id: str) -> BatchView:
        view = await self._batches.get(project, batch_id)
        if view.row.endpoint != MESSAGES_ENDPOINT:
            raise batch_not_found(batch_id)  # an OpenAI batch: its answers are not Messages
        return view

    async def list(
        self, project: str, *, before: str | None, after: str | None, limit: int
    ) -> tuple[list[BatchView], bool]:
        """Newest first, message batches only."""
        rows, has_more = await batch_store.list_batches(
            self._db, project, limit=limit, after=after, before=before, endpoint=MESSAGES_ENDPOINT
        )
        return await self._batches.views(rows), has_more

    async def cancel(self, project: str, batch_id: str) -> BatchView:
        """Cancelling an ended batch changes nothing: it answers the batch as it is."""
        view = await self.get(project, batch_id)
        if view.row.status in TERMINAL or view.row.status == BatchStatus.CANCELLING:
            return view
        try:
            return await self._batches.cancel(project, batch_id)
        except ApiError as exc:
            if exc.status != 409:
                raise
            return await self.get(project, batch_id)  # it ended meanwhile

    async def delete(self, project: str, batch_id: str) -> None:
        """An ended batch, its results and its input go; a running one must be cancelled first."""
        await self.get(project, batch_id)
        row, deleted = await batch_store.delete_ended_batch(self._db, project, batch_id)
        if row is None:
            raise batch_not_found(batch_id)
        if not deleted:
            raise _invalid(
                f"Batch {batch_id} is still {row.status.replace('_', ' ')}: cancel it, and "
                "delete it once its processing_status is 'ended'."
            )
        for file_id in (row.input_file_id, row.output_file_id, row.error_file_id):
            if file_id:
                await file_store.soft_delete(self._db, project, file_id, _now())
        self._wake()

    async def result_lines(self, project: str, batch_id: str) -> AsyncIterator[bytes]:
        """The ended batch's result lines (output file, then error file), one at a time."""
        view = await self.get(project, batch_id)
        if view.row.status not in TERMINAL:
            raise _invalid(
                f"Batch {batch_id} has not ended yet: its results are ready once its "
                "processing_status is 'ended'."
            )
        if view.row.status == BatchStatus.FAILED:
            return self._refused_lines(view)
        chunks = await self._batches.results(project, batch_id, output=True, errors=True)
        return stream_lines(chunks)

    async def _refused_lines(self, view: BatchView) -> AsyncIterator[bytes]:
        """A batch refused as a whole (a budget, a limit) has no files: each of its requests
        gets the refusal as its own error line, so the results still name every request."""
        errors = orjson.loads(view.row.errors or "{}").get("data") or [{}]
        code = errors[0].get("code") or "batch_failed"
        message = errors[0].get("message") or "The batch was refused."
        file = await self._files.get(view.row.project, view.row.input_file_id)
        async for raw in stream_lines(self._files.chunks(file)):
            custom_id = orjson.loads(raw).get("custom_id")
            yield orjson.dumps(
                {
                    "custom_id": custom_id,
                    "response": None,
                    "error": {"code": code, "message": message},
                }
            )


def _checked(item: MessageRequest) -> str:
    where = f"requests.{item.index}"
    if item.extra:
        raise _invalid(f"{where}.{item.extra[0]}: Extra inputs are not permitted.")
    if item.custom_id is None:
        raise _invalid(f"{where}.custom_id: Field required.")
    if not isinstance(item.custom_id, str) or not CUSTOM_ID.fullmatch(item.custom_id):
        raise _invalid(f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'.")
    if item.params is None:
        raise _invalid(f"{where}.params: Field required.")
    if not isinstance(item.params, dict):
        raise _invalid(f"{where}.params: Input should be a valid dictionary.")
    return item.custom_id


def _invalid(message: str) -> ApiError:
    return ApiError(400, message)


def _now() -> int:
    return int(time.time())
