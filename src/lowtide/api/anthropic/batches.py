"""Anthropic's Message Batches API: create, retrieve, list, cancel, delete, results."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import ijson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from lowtide.api.anthropic.objects import batch_page, message_batch, result_line
from lowtide.api.auth import project_of
from lowtide.api.params import ASCII_DIGITS
from lowtide.api.responses import json_response
from lowtide.errors import ApiError
from lowtide.service import MessageBatchService, MessageRequest

router = APIRouter()
Project = Annotated[str, Depends(project_of)]


def _service(request: Request) -> MessageBatchService:
    return request.app.state.runtime.message_batches


def _base_url(request: Request) -> str:
    """Where results_url points: the configured public URL, else the URL this request came to
    (the SDK fetches results_url as it is, so it must be ours, never Anthropic's)."""
    configured = request.app.state.runtime.config.server.public_url
    return configured or str(request.base_url).rstrip("/").removesuffix("/v1/messages")


class _Body:
    """The request body as a file ijson reads from, counted against the create limit as it
    arrives: a 256 MB create is parsed as a stream, never held whole."""

    def __init__(self, request: Request, limit: int) -> None:
        self._chunks = request.stream()
        self._limit = limit
        self.bytes = 0

    async def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson asks for nothing first, to learn that this gives bytes
            return b""
        try:
            chunk = b""
            while not chunk:
                chunk = await anext(self._chunks)
        except StopAsyncIteration:
            return b""
        except ClientDisconnect:
            raise ApiError(
                400, "The client went away before the request body was complete."
            ) from None
        self.bytes += len(chunk)
        if self.bytes > self._limit:
            raise ApiError(
                413,
                f"The request body is larger than {self._limit:,} bytes, the limit of a "
                "message batch.",
                type="request_too_large",
            )
        return chunk


async def _requests(request: Request, limit: int) -> AsyncIterator[MessageRequest]:
    body = _Body(request, limit)
    index = 0
    try:
        async for item in ijson.items(body, "requests.item", use_float=True):
            if not isinstance(item, dict):
                raise ApiError(400, f"requests.{index}: Input should be a valid dictionary.")
            extra = [key for key in item if key not in ("custom_id", "params")]
            yield MessageRequest(index, item.get("custom_id"), item.get("params"), extra)
            index += 1
    except ijson.JSONError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid JSON in UTF-8.") from None


@router.post("/batches")
async def create_message_batch(request: Request, project: Project):
    service = _service(request)
    view = await service.create(project, _requests(request, service.limits.max_bytes))
    return json_response(message_batch(view, _base_url(request)))


@router.get("/batches/{batch_id}")
async def retrieve_message_batch(request: Request, batch_id: str, project: Project):
    view = await _service(request).get(project, batch_id)
    return json_response(message_batch(view, _base_url(request)))


@router.get("/batches")
async def list_message_batches(
    request: Request,
    project: Project,
    before_id: Annotated[str | None, Query(max_length=128)] = None,
    after_id: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000), ASCII_DIGITS] = 20,
):
    if before_id is not None and after_id is not None:
        raise ApiError(400, "Give before_id or after_id, not both.")
    views, has_more = await _service(request).list(
        project, before=before_id, after=after_id, limit=limit
    )
    base = _base_url(request)
    return json_response(batch_page([message_batch(v, base) for v in views], has_more))


@router.post("/batches/{batch_id}/cancel")
async def cancel_message_batch(request: Request, batch_id: str, project: Project):
    view = await _service(request).cancel(project, batch_id)
    return json_response(message_batch(view, _base_url(request)))


@router.delete("/batches/{batch_id}")
async def delete_message_batch(request: Request, batch_id: str, project: Project):
    await _service(request).delete(project, batch_id)
    return json_response({"id": batch_id, "type": "message_batch_deleted"})


@router.get("/batches/{batch_id}/results")
async def message_batch_results(request: Request, batch_id: str, project: Project):
    lines = await _service(request).result_lines(project, batch_id)

    async def jsonl() -> AsyncIterator[bytes]:
        out: list[bytes] = []
        async for raw in lines:
            out.append(result_line(raw))
            if len(out) >= 256:
                yield b"\n".join(out) + b"\n"
                out.clear()
        if out:
            yield b"\n".join(out) + b"\n"

    return StreamingResponse(jsonl(), media_type="application/x-jsonl")
