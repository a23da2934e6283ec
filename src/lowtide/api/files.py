"""The Files API: upload, list, retrieve, delete, download."""

from __future__ import annotations

import time
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from lowtide.api.auth import project_of
from lowtide.api.objects import file_object, list_page
from lowtide.api.responses import json_response
from lowtide.api.uploads import receive_upload
from lowtide.config import parse_duration
from lowtide.errors import ApiError, not_found
from lowtide.ids import new_file_id
from lowtide.runtime import Runtime
from lowtide.store import files as file_store

router = APIRouter()

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
Project = Annotated[str, Depends(project_of)]


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


@router.post("/v1/files", summary="Upload a file", status_code=200)
async def create_file(request: Request, project: Project):
    """multipart/form-data with `file`, `purpose` and optional `expires_after[anchor|seconds]`."""
    rt = _runtime(request)
    file_id = new_file_id()
    key = f"files/{file_id}"
    form = await receive_upload(request, rt.blobs, key, rt.config.batches.max_file_bytes)
    assert form.writer is not None
    try:
        purpose = form.fields.get("purpose")
        if not purpose:
            raise ApiError(
                400,
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in UPLOAD_PURPOSES:
            allowed = ", ".join(f"'{p}'" for p in UPLOAD_PURPOSES)
            raise ApiError(
                400,
                f"Invalid value: '{purpose}'. Supported values are: {allowed}.",
                param="purpose",
                code="invalid_value",
            )
        now = int(time.time())
        expires_at = _expiry(form.fields, purpose, now, rt.config.batches.default_file_ttl)
        if purpose == "batch" and (form.bytes == 0 or form.first_byte != b"{"):
            raise ApiError(
                400,
                "Invalid file format for Batch API. Must be .jsonl: one JSON request object per line.",
                param="file",
                code="invalid_file_format",
            )
        await form.writer.commit()
    except BaseException:
        await form.writer.abort()
        raise
    row = {
        "id": file_id,
        "project": project,
        "filename": form.filename or "upload",
        "purpose": purpose,
        "bytes": form.bytes,
        "created_at": now,
        "expires_at": expires_at,
        "blob_key": key,
    }
    try:
        async with rt.db.write() as conn:
            await file_store.insert_file(conn, row)
    except BaseException:
        await rt.blobs.delete(key)
        raise
    return json_response(file_object(row))


def _expiry(fields: dict[str, str], purpose: str, now: int, default_ttl: str) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return now + int(parse_duration(default_ttl)) if purpose == "batch" else None
    if anchor != "created_at":
        raise ApiError(
            400,
            "Invalid value for 'expires_after.anchor': only 'created_at' is supported.",
            param="expires_after.anchor",
            code="invalid_value",
        )
    if (
        seconds is None
        or not (seconds.isdecimal() and len(seconds) <= 10)
        or not 3600 <= int(seconds) <= 2_592_000
    ):
        raise ApiError(
            400,
            "Invalid value for 'expires_after.seconds': must be an integer between 3600 and 2592000.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return now + int(seconds)


@router.get("/v1/files", summary="List files")
async def list_files(
    request: Request,
    project: Project,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
):
    rows, has_more = await file_store.list_files(
        _runtime(request).db,
        project,
        int(time.time()),
        purpose=purpose,
        limit=limit,
        after=after,
        ascending=order == "asc",
    )
    return json_response(list_page([file_object(r) for r in rows], has_more))


@router.get("/v1/files/{file_id}", summary="Retrieve a file")
async def retrieve_file(request: Request, file_id: str, project: Project):
    row = await file_store.get_file(_runtime(request).db, project, file_id, int(time.time()))
    if row is None:
        raise not_found("File", file_id)
    return json_response(file_object(row))


@router.delete("/v1/files/{file_id}", summary="Delete a file")
async def delete_file(request: Request, file_id: str, project: Project):
    rt = _runtime(request)
    if not await file_store.soft_delete(rt.db, project, file_id, int(time.time())):
        raise not_found("File", file_id)
    rt.wake_worker()
    return json_response({"id": file_id, "object": "file", "deleted": True})


@router.get("/v1/files/{file_id}/content", summary="Download a file's content")
async def file_content(request: Request, file_id: str, project: Project):
    rt = _runtime(request)
    row = await file_store.get_file(rt.db, project, file_id, int(time.time()))
    if row is None:
        raise not_found("File", file_id)
    media = (
        "application/jsonl" if row["filename"].endswith(".jsonl") else "application/octet-stream"
    )
    return StreamingResponse(
        rt.blobs.iter_chunks(row["blob_key"]),
        media_type=media,
        headers={
            "content-length": str(row["bytes"]),
            "content-disposition": _attachment(row["filename"]),
        },
    )


def _attachment(filename: str) -> str:
    """Content-Disposition for any filename: an ASCII fallback plus the exact UTF-8 name (RFC 6266)."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
