"""The Files API: upload, list, retrieve, delete, download."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from lowtide.api.auth import project_of
from lowtide.api.objects import file_object, list_page
from lowtide.api.params import ASCII_DIGITS
from lowtide.api.responses import json_response
from lowtide.api.schemas import (
    FILE_CONTENT,
    UPLOAD_BODY,
    FileDeleted,
    FileList,
    FileObject,
    responses,
)
from lowtide.api.uploads import receive_upload
from lowtide.service import FileService

router = APIRouter(tags=["Files"])
Project = Annotated[str, Depends(project_of)]


def _files(request: Request) -> FileService:
    return request.app.state.runtime.files


@router.post(
    "/v1/files",
    summary="Upload a file",
    status_code=200,
    responses=responses(FileObject, 400, 401, (413, "The file is larger than the upload limit")),
    openapi_extra={"requestBody": UPLOAD_BODY},
)
async def create_file(request: Request, project: Project):
    """multipart/form-data with `file`, `purpose` and optional `expires_after[anchor|seconds]`."""
    service = _files(request)
    upload = await service.start_upload()
    form = await receive_upload(request, upload, service.max_bytes)
    row = await service.finish_upload(
        upload,
        project,
        purpose=form.fields.get("purpose"),
        filename=form.filename,
        expires_after_anchor=form.fields.get("expires_after[anchor]"),
        expires_after_seconds=form.fields.get("expires_after[seconds]"),
    )
    return json_response(file_object(row))


@router.get("/v1/files", summary="List files", responses=responses(FileList, 400, 401))
async def list_files(
    request: Request,
    project: Project,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000), ASCII_DIGITS] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
):
    rows, has_more = await _files(request).list(
        project, purpose=purpose, limit=limit, after=after, ascending=order == "asc"
    )
    return json_response(list_page([file_object(r) for r in rows], has_more))


@router.get(
    "/v1/files/{file_id}", summary="Retrieve a file", responses=responses(FileObject, 400, 401, 404)
)
async def retrieve_file(request: Request, file_id: str, project: Project):
    return json_response(file_object(await _files(request).get(project, file_id)))


@router.delete(
    "/v1/files/{file_id}", summary="Delete a file", responses=responses(FileDeleted, 400, 401, 404)
)
async def delete_file(request: Request, file_id: str, project: Project):
    await _files(request).delete(project, file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


@router.get(
    "/v1/files/{file_id}/content",
    summary="Download a file's content",
    response_class=StreamingResponse,
    responses=responses(FILE_CONTENT, 400, 401, 404),
)
async def file_content(request: Request, file_id: str, project: Project):
    row, chunks = await _files(request).content(project, file_id)
    media = "application/jsonl" if row.filename.endswith(".jsonl") else "application/octet-stream"
    return StreamingResponse(
        chunks,
        media_type=media,
        headers={
            "content-length": str(row.bytes),
            "content-disposition": _attachment(row.filename),
        },
    )


def _attachment(filename: str) -> str:
    """Content-Disposition for any filename: an ASCII fallback plus the exact UTF-8 name (RFC 6266)."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
