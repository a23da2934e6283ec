"""Streaming multipart upload straight into the blob store.

The file part never sits whole in memory or in a temp file: each piece the parser yields is
written to the blob writer at once, the size limit is checked as bytes arrive, and the blob
becomes visible only when the upload completed and the form checked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from lowtide.blobs import BlobStore, BlobWriter
from lowtide.errors import ApiError

_MAX_FIELD_BYTES = 64 * 1024
_MAX_FIELDS = 64
_MAX_FIELD_TOTAL = 1024 * 1024


@dataclass
class UploadedForm:
    fields: dict[str, str]
    filename: str | None
    bytes: int
    first_byte: bytes
    writer: BlobWriter | None


@dataclass
class _PartState:
    name: str = ""
    filename: str | None = None
    is_file: bool = False
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"File is too large: the limit is {limit:,} bytes.",
        code="file_too_large",
        param="file",
    )


async def receive_upload(
    request: Request, blobs: BlobStore, key: str, max_bytes: int
) -> UploadedForm:
    """Parse the form; the `file` part streams into `key`. The caller commits or aborts."""
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
        raise _too_large(max_bytes)

    writer = await blobs.writer(key)
    form = UploadedForm(fields={}, filename=None, bytes=0, first_byte=b"", writer=writer)
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
                if not form.first_byte:
                    stripped = piece.lstrip()
                    form.first_byte = stripped[:1]
                form.bytes += len(piece)
                if form.bytes > max_bytes:
                    raise _too_large(max_bytes)
                await writer.write(piece)
            pending.clear()
        parser.finalize()
        if parser.state != MultipartState.END:
            raise ApiError(
                400,
                "The multipart body ended before its closing boundary: the upload is incomplete.",
            )
    except ClientDisconnect:
        await writer.abort()
        raise
    except ApiError:
        await writer.abort()
        raise
    except Exception as exc:
        await writer.abort()
        raise ApiError(400, f"The multipart body could not be parsed: {exc}") from exc
    if file_parts_seen == 0:
        await writer.abort()
        raise ApiError(
            400,
            "Missing required parameter: 'file'.",
            param="file",
            code="missing_required_parameter",
        )
    if file_parts_seen > 1:
        await writer.abort()
        raise ApiError(400, "Only one 'file' part may be uploaded per request.", param="file")
    return form
