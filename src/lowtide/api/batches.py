"""The Batches API: create, retrieve, list, cancel."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from lowtide.api.auth import project_of
from lowtide.api.objects import batch_object, list_page
from lowtide.api.responses import json_response
from lowtide.config import parse_duration
from lowtide.errors import ApiError
from lowtide.ids import new_batch_id
from lowtide.runner.results import ERROR_PREFIX, OK_PREFIX
from lowtide.runner.validation import SUPPORTED_ENDPOINTS
from lowtide.runtime import Runtime
from lowtide.store import batches as batch_store
from lowtide.store import work
from lowtide.store.batches import PRIORITIES, TERMINAL
from lowtide.store.files import get_file_any_project

router = APIRouter()
Project = Annotated[str, Depends(project_of)]


class OutputExpiresAfter(BaseModel):
    anchor: str = "created_at"
    seconds: int


class CreateBatch(BaseModel):
    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(
        max_length=16,
        description="'24h', or any duration from the server's minimum to its maximum (default 1h..7d), e.g. '1h', '90m', '7d'",
    )
    metadata: dict[str, Any] | None = None
    output_expires_after: OutputExpiresAfter | None = None


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")


async def _render(rt: Runtime, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    running = [r["id"] for r in rows if r["status"] not in TERMINAL]
    progress = await batch_store.live_progress(rt.db, running)
    return [batch_object(r, progress.get(r["id"])) for r in rows]


def _check_window(value: str, rt: Runtime) -> int:
    limits = rt.config.batches
    low, high = (
        parse_duration(limits.min_completion_window),
        parse_duration(limits.max_completion_window),
    )
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = -1
    if not low <= seconds <= high:
        raise ApiError(
            400,
            f"Invalid value for 'completion_window': {value!r}. Use a duration such as '24h' between "
            f"{limits.min_completion_window} and {limits.max_completion_window}.",
            param="completion_window",
            code="invalid_value",
        )
    return int(seconds)


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16:
        raise ApiError(
            400,
            "Invalid 'metadata': at most 16 key-value pairs are allowed.",
            param="metadata",
            code="invalid_value",
        )
    for key, value in metadata.items():
        if len(key) > 64:
            raise ApiError(
                400,
                f"Invalid 'metadata': key {key[:70]!r} is longer than 64 characters.",
                param=f"metadata.{key[:64]}",
                code="invalid_value",
            )
        if not isinstance(value, str):
            kind = {
                list: "an array",
                dict: "an object",
                bool: "a boolean",
                int: "an integer",
                float: "a number",
            }.get(type(value), "null")
            raise ApiError(
                400,
                f"Invalid type for 'metadata.{key}': expected a string, but got {kind} instead.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if key == "priority" and value not in PRIORITIES:
            raise ApiError(
                400,
                f"Invalid 'metadata.priority': {value!r}. Use one of 'high', 'normal', 'low'.",
                param="metadata.priority",
                code="invalid_value",
            )
        if len(value) > 512:
            raise ApiError(
                400,
                f"Invalid 'metadata.{key}': string too long. Expected at most 512 characters.",
                param=f"metadata.{key}",
                code="invalid_value",
            )


@router.post(
    "/v1/batches",
    summary="Create a batch",
    description="Send an `Idempotency-Key` header to make retries safe: a create with a key this "
    "project already used returns the batch the first one made instead of starting another.",
)
async def create_batch(request: Request, body: CreateBatch, project: Project):
    rt = _runtime(request)
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise ApiError(
            400,
            "The Idempotency-Key header must be 1 to 255 characters long.",
            param="Idempotency-Key",
            code="invalid_value",
        )
    if body.endpoint not in SUPPORTED_ENDPOINTS:
        allowed = ", ".join(f"'{e}'" for e in SUPPORTED_ENDPOINTS)
        raise ApiError(
            400,
            f"Invalid value: '{body.endpoint}'. Supported values are: {allowed}.",
            param="endpoint",
            code="invalid_value",
        )
    window = _check_window(body.completion_window, rt)
    _check_metadata(body.metadata)
    output_ttl = None
    if body.output_expires_after is not None:
        oea = body.output_expires_after
        if oea.anchor != "created_at":
            raise ApiError(
                400,
                "Invalid value for 'output_expires_after.anchor': only 'created_at' is supported.",
                param="output_expires_after.anchor",
                code="invalid_value",
            )
        if not 3600 <= oea.seconds <= 2_592_000:
            raise ApiError(
                400,
                "Invalid value for 'output_expires_after.seconds': must be between 3600 and 2592000.",
                param="output_expires_after.seconds",
                code="invalid_value",
            )
        output_ttl = oea.seconds
    row = batch_store.new_batch_row(
        batch_id=new_batch_id(),
        project=project,
        endpoint=body.endpoint,
        input_file_id=body.input_file_id,
        completion_window=body.completion_window,
        window_seconds=window,
        now=int(time.time()),
        metadata_json=orjson.dumps(body.metadata).decode() if body.metadata is not None else None,
        output_expires_seconds=output_ttl,
        priority=(body.metadata or {}).get("priority", "normal"),
        idempotency_key=idempotency_key,
    )
    earlier = await batch_store.insert_batch(rt.db, row)
    if earlier is not None:
        asked = (body.input_file_id, body.endpoint, body.completion_window)
        if (earlier["input_file_id"], earlier["endpoint"], earlier["completion_window"]) != asked:
            raise ApiError(
                409,
                f"Idempotency-Key {idempotency_key!r} was already used for batch {earlier['id']} "
                "with different parameters; use a new key for a new batch.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
                headers={"x-should-retry": "false"},
            )
        return json_response((await _render(rt, [earlier]))[0])
    rt.wake_worker()
    full = await batch_store.get_batch(rt.db, project, row["id"])
    assert full is not None
    return json_response(batch_object(full))


@router.get("/v1/batches/{batch_id}", summary="Retrieve a batch")
async def retrieve_batch(request: Request, batch_id: str, project: Project):
    rt = _runtime(request)
    row = await batch_store.get_batch(rt.db, project, batch_id)
    if row is None:
        raise _not_found(batch_id)
    return json_response((await _render(rt, [row]))[0])


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(request: Request, batch_id: str, project: Project):
    rt = _runtime(request)
    row = await batch_store.request_cancel(rt.db, project, batch_id, int(time.time()))
    if row is None:
        raise _not_found(batch_id)
    if row["status"] not in ("cancelling", "cancelled"):
        raise ApiError(
            409,
            f"Cannot cancel a batch with status '{row['status']}'.",
            headers={"x-should-retry": "false"},
        )
    if rt.worker is not None:
        rt.worker.stop_batch(batch_id)
    return json_response((await _render(rt, [row]))[0])


@router.get("/v1/batches", summary="List batches, newest first")
async def list_batches(
    request: Request,
    project: Project,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
):
    rt = _runtime(request)
    rows, has_more = await batch_store.list_batches(rt.db, project, limit=limit, after=after)
    return json_response(list_page(await _render(rt, rows), has_more))


@router.get(
    "/v1/batches/{batch_id}/results",
    summary="Stream the result lines committed so far (extension)",
    response_class=StreamingResponse,
)
async def batch_results(
    request: Request,
    batch_id: str,
    project: Project,
    type: Literal["all", "output", "error"] = "all",
):
    """Results committed so far, in input order, in the output/error file line format.

    While a batch runs this is every committed segment (committed lines are final: they never
    change or repeat); once it has ended it is its output and/or error file.
    """
    rt = _runtime(request)
    row = await batch_store.get_batch(rt.db, project, batch_id)
    if row is None:
        raise _not_found(batch_id)
    wanted = {"all": (OK_PREFIX, ERROR_PREFIX), "output": (OK_PREFIX,), "error": (ERROR_PREFIX,)}[
        type
    ]
    if row["status"] in TERMINAL:
        ids = [row["output_file_id"] if p == OK_PREFIX else row["error_file_id"] for p in wanted]
        chunks = _files_content(rt, [i for i in ids if i])
    else:
        chunks = _committed_lines(rt, batch_id, wanted)
    return StreamingResponse(chunks, media_type="application/x-jsonl")


async def _files_content(rt: Runtime, file_ids: list[str]) -> AsyncIterator[bytes]:
    for file_id in file_ids:
        row = await get_file_any_project(rt.db, file_id)
        if row is not None:
            async for chunk in rt.blobs.iter_chunks(row["blob_key"]):
                yield chunk


async def _committed_lines(
    rt: Runtime, batch_id: str, wanted: tuple[bytes, ...]
) -> AsyncIterator[bytes]:
    for shard in await work.shards_of(rt.db, batch_id):
        for segment in await work.segments_of(rt.db, batch_id, shard["idx"]):
            try:
                data = await rt.blobs.read(segment["blob_key"])
            except FileNotFoundError:  # finalize published the files and removed segments
                return
            out = [line[1:] for line in data.split(b"\n") if line and line[:1] in wanted]
            if out:
                yield b"\n".join(out) + b"\n"
