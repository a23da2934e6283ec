"""Streaming multipart upload straight into the blob store.

The file part never sits whole in memory or in a temp file: each piece the parser yields is
handed to the service's upload at once (which checks the size limit as bytes arrive), and the
file becomes visible only when the service finishes the upload after the form checked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from lowtide.errors import ApiError, missing_parameter
from lowtide.service import FileUpload
from lowtide.service.files import file_too_large

_MAX_FIELD_BYTES = 64 * 1024
_MAX_FIELDS = 64
_MAX_FIELD_TOTAL = 1024 * 1024


@dataclass
class UploadedForm:
    fields: dict[str, str]
    filename: str | None


@dataclass
class _PartState:
    name: str = ""
    filename: str | None = None
    is_file: bool = False
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)


async def receive_upload(request: Request, upload: FileUpload, max_bytes: int) -> UploadedForm:
    """Parse the form, streaming the `file` part into `upload`; abort it on any failure."""
    try:
        return await _receive(request, upload, max_bytes)
    except BaseException:
        await upload.abort()
        raise


async def _receive(request: Request, upload: FileUpload, max_bytes: int) -> UploadedForm:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            400, "The request must be multipart/form-data with a 'file' part.", param="file"
        )
    declared = request.headers.get("content-length")
    if (
        declared
        and declared.isdecimal()
        and len(declared) < 20
        and int(declared) > max_bytes + _MAX_FIELD_TOTAL
    ):
        raise file_too_large(max_bytes)

    form = UploadedForm(fields={}, filename=None)
    part = _PartState()
    file_parts_seen = 0
    field_bytes = 0
    pending: list[bytes] = []

    def on_part_begin() -> None:
        nonlocal part
        part = _PartState()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        nonlocal file_parts_seen
        if bytes(part.header_field).lower() == b"content-disposition":
            _, opts = parse_options_header(bytes(part.header_value))
            part.name = opts.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in opts:
                part.filename = opts[b"filename"].decode("utf-8", "replace")
            if part.name == "file":
                part.is_file = True
                file_parts_seen += 1
                form.filename = part.filename
        part.header_field.clear()
        part.header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal field_bytes
        if part.is_file:
            if file_parts_seen == 1:
                pending.append(data[start:end])
            return
        field_bytes += end - start
        if len(part.value) + (end - start) <= _MAX_FIELD_BYTES:
            part.value += data[start:end]

    def on_part_end() -> None:
        if not part.is_file and part.name:
            form.fields[part.name] = part.value.decode("utf-8", "replace")

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
        async for chunk in request.stream():
            parser.write(chunk)
            if len(form.fields) > _MAX_FIELDS or field_bytes > _MAX_FIELD_TOTAL:
                raise ApiError(400, "Too many or too large form fields in the upload.")
            for piece in pending:
                await upload.write(piece)
            pending.clear()
        parser.finalize()
        if parser.state != MultipartState.END:
            raise ApiError(
                400,
                "The multipart body ended before its closing boundary: the upload is incomplete.",
            )
    except ClientDisconnect as exc:
        # Nobody is left to read the answer: an ordinary error response, not a traceback.
        raise ApiError(400, "The client closed the connection before the upload finished.") from exc
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(400, f"The multipart body could not be parsed: {exc}") from exc
    if file_parts_seen == 0:
        raise missing_parameter("file")
    if file_parts_seen > 1:
        raise ApiError(400, "Only one 'file' part may be uploaded per request.", param="file")
    return form
