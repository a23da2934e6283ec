"""The Batches API: create, retrieve, list, cancel, and partial results (an extension)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError
from starlette.convertors import Convertor, register_url_convertor

from lowtide.api.auth import project_of
from lowtide.api.objects import batch_object, list_page
from lowtide.api.params import ASCII_DIGITS
from lowtide.api.responses import json_response
from lowtide.api.schemas import (
    IDEMPOTENCY_KEY_HEADER,
    JSONL_BODY,
    MAX_TTL_SECONDS,
    METADATA_SCHEMA,
    MIN_TTL_SECONDS,
    Batch,
    BatchEstimate,
    BatchList,
    responses,
)
from lowtide.service import BatchRequest, BatchService, RerunRequest
from lowtide.vocabulary import ENDPOINTS

router = APIRouter(tags=["Batches"])
Project = Annotated[str, Depends(project_of)]


class _BatchId(Convertor[str]):
    """A path segment that is a batch id: anything but 'estimate', which is its own route, so
    GET /v1/batches/estimate is a 405 (Allow: POST), as the document says."""

    regex = "(?!estimate$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("batch_id", _BatchId())


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: 3600 and 3600.0 (the same JSON number), not "3600" or true."""
    if isinstance(value, str | bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


JsonInteger = Annotated[int, BeforeValidator(_json_integer)]


class OutputExpiresAfter(BaseModel):
    anchor: str = Field("created_at", json_schema_extra={"enum": ["created_at"]})
    seconds: JsonInteger = Field(
        json_schema_extra={"minimum": MIN_TTL_SECONDS, "maximum": MAX_TTL_SECONDS}
    )


class CreateBatch(BaseModel):
    input_file_id: str = Field(max_length=64, pattern="^[^\x00]*$")  # no NUL: never stored
    endpoint: str = Field(max_length=64, json_schema_extra={"enum": list(ENDPOINTS)})
    completion_window: str = Field(
        max_length=16,
        description="'24h', or any duration from the server's minimum to its maximum (default 1h..7d), e.g. '1h', '90m', '7d'",
    )
    metadata: dict[str, Any] | None = Field(None, json_schema_extra=METADATA_SCHEMA)
    output_expires_after: OutputExpiresAfter | None = None
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="Extension: also announce this batch's end here (signed webhooks); the "
        "host must be in the server's [batch_webhooks] allowed_hosts",
    )

    def request(self) -> BatchRequest:
        oea = self.output_expires_after
        return BatchRequest(
            self.input_file_id,
            self.endpoint,
            self.completion_window,
            self.metadata,
            (oea.anchor, oea.seconds) if oea else None,
            webhook_url=self.webhook_url,
        )


def _batches(request: Request) -> BatchService:
    return request.app.state.runtime.batches


@router.post(
    "/v1/batches",
    summary="Create a batch",
    description="Send an `Idempotency-Key` header to make retries safe: a create with a key this "
    "project already used returns the batch the first one made instead of starting another.",
    responses=responses(
        Batch, 400, 401, (409, "Idempotency-Key reused with different parameters"), 413
    ),
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_HEADER]},
)
async def create_batch(request: Request, body: CreateBatch, project: Project):
    view = await _batches(request).create(
        project, body.request(), idempotency_key=request.headers.get("idempotency-key")
    )
    return json_response(batch_object(view))


@router.post(
    "/v1/batches/estimate",
    summary="Estimate a batch's tokens, cost and duration (extension)",
    description="Takes the body of `POST /v1/batches`, makes the same checks, reads the file "
    "once and creates nothing.",
    responses=responses(BatchEstimate, 400, 401, 404, 413),
)
async def estimate_batch(request: Request, body: CreateBatch, project: Project):
    estimate = await request.app.state.runtime.estimates.estimate(project, body.request())
    return json_response(estimate.as_object())


@router.get(
    "/v1/batches/{batch_id:batch_id}",
    summary="Retrieve a batch",
    responses=responses(Batch, 400, 401, 404),
)
async def retrieve_batch(request: Request, batch_id: str, project: Project):
    return json_response(batch_object(await _batches(request).get(project, batch_id)))


@router.post(
    "/v1/batches/{batch_id}/cancel",
    summary="Cancel a batch",
    responses=responses(
        Batch, 400, 401, 404, (409, "The batch has finished (or is finalizing): too late")
    ),
)
async def cancel_batch(request: Request, batch_id: str, project: Project):
    return json_response(batch_object(await _batches(request).cancel(project, batch_id)))


class RetryBatch(BaseModel):
    codes: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=100, description="rerun only error lines with these error codes"
    )
    custom_ids: list[Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=100_000, description="rerun only these lines"
    )
    completion_window: str | None = Field(
        None, max_length=16, description="a new window for the rerun (default: the batch's own)"
    )


@router.post(
    "/v1/batches/{batch_id}/retry",
    summary="Rerun the lines that did not succeed (extension)",
    description="On a completed, expired or cancelled batch: runs again every line that "
    "failed, expired or was cancelled (or those of `codes` / `custom_ids`), keeps every other "
    "result, and publishes merged output and error files. Cancel then retry is pause and resume.",
    responses=responses(Batch, 400, 401, 404, (409, "The batch has not ended")),
)
async def retry_batch(
    request: Request, batch_id: str, project: Project, body: RetryBatch | None = None
):
    body = body or RetryBatch()
    selection = RerunRequest(
        codes=body.codes, custom_ids=set(body.custom_ids) if body.custom_ids is not None else None
    )
    view = await _batches(request).retry(project, batch_id, selection, body.completion_window)
    return json_response(batch_object(view))


@router.get(
    "/v1/batches", summary="List batches, newest first", responses=responses(BatchList, 400, 401)
)
async def list_batches(
    request: Request,
    project: Project,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100), ASCII_DIGITS] = 20,
):
    views, has_more = await _batches(request).list(project, after=after, limit=limit)
    return json_response(list_page([batch_object(v) for v in views], has_more))


@router.get(
    "/v1/batches/{batch_id}/results",
    summary="Stream the result lines committed so far (extension)",
    response_class=StreamingResponse,
    responses=responses(
        {"description": "Result lines", "content": {"application/x-jsonl": {"schema": JSONL_BODY}}},
        400,
        401,
        404,
    ),
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
