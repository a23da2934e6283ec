"""The Batches API: create, retrieve, list, cancel, and partial results (an extension)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from lowtide.api.auth import project_of
from lowtide.api.objects import batch_object, list_page
from lowtide.api.responses import json_response
from lowtide.service import BatchService

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


def _batches(request: Request) -> BatchService:
    return request.app.state.runtime.batches


@router.post(
    "/v1/batches",
    summary="Create a batch",
    description="Send an `Idempotency-Key` header to make retries safe: a create with a key this "
    "project already used returns the batch the first one made instead of starting another.",
)
async def create_batch(request: Request, body: CreateBatch, project: Project):
    oea = body.output_expires_after
    view = await _batches(request).create(
        project,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
        output_expires_after=(oea.anchor, oea.seconds) if oea else None,
        idempotency_key=request.headers.get("idempotency-key"),
    )
    return json_response(batch_object(view))


@router.get("/v1/batches/{batch_id}", summary="Retrieve a batch")
async def retrieve_batch(request: Request, batch_id: str, project: Project):
    return json_response(batch_object(await _batches(request).get(project, batch_id)))


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(request: Request, batch_id: str, project: Project):
    return json_response(batch_object(await _batches(request).cancel(project, batch_id)))


@router.get("/v1/batches", summary="List batches, newest first")
async def list_batches(
    request: Request,
    project: Project,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
):
    views, has_more = await _batches(request).list(project, after=after, limit=limit)
    return json_response(list_page([batch_object(v) for v in views], has_more))


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
    change or repeat); once it has ended it is its output and/or error file (404 if one of them
    was deleted or has expired).
    """
    chunks = await _batches(request).results(
        project, batch_id, output=type != "error", errors=type != "output"
    )
    return StreamingResponse(chunks, media_type="application/x-jsonl")
