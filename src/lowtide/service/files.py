"""Files: upload (streamed into the blob store), list, retrieve, delete, download."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator

from lowtide.blobs import BlobWriter
from lowtide.blobs.keys import file_key
from lowtide.config import parse_duration
from lowtide.errors import ApiError, invalid_value, missing_parameter, not_found
from lowtide.ids import new_file_id
from lowtide.service.deps import UseCases, expires_after_seconds
from lowtide.store import files as file_store
from lowtide.store.rows import FileRow
from lowtide.vocabulary import UPLOAD_PURPOSES, UTF8_BOM, FilePurpose


class FileUpload:
    """A file's bytes on their way into the blob store; nothing is visible before `finish`."""

    def __init__(self, file_id: str, writer: BlobWriter, max_bytes: int) -> None:
        self.file_id = file_id
        self.bytes = 0
        # The first non-blank byte after any byte-order mark (a JSONL file starts with '{'),
        # and the line it is on.
        self.first_byte = b""
        self.first_line = 1
        self._lead: bytes | None = b""  # the first bytes, until we know if they are a BOM
        self._writer = writer
        self._max_bytes = max_bytes

    async def write(self, data: bytes) -> None:
        if not self.first_byte:
            self._look_for_first_byte(data)
        self.bytes += len(data)
        if self.bytes > self._max_bytes:
            raise file_too_large(self._max_bytes)
        await self._writer.write(data)

    async def commit(self) -> None:
        await self._writer.commit()

    def _look_for_first_byte(self, data: bytes) -> None:
        if self._lead is not None:
            self._lead += data
            if len(self._lead) < len(UTF8_BOM) and UTF8_BOM.startswith(self._lead):
                return  # may still be a byte-order mark
            data, self._lead = self._lead.removeprefix(UTF8_BOM), None
        stripped = data.lstrip()
        self.first_line += data[: len(data) - len(stripped)].count(b"\n")
        self.first_byte = stripped[:1]

    async def abort(self) -> None:
        await self._writer.abort()


def file_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"File is too large: the limit is {limit:,} bytes.",
        code="file_too_large",
        param="file",
    )


class FileService(UseCases):
    @property
    def max_bytes(self) -> int:
        return self._limits.max_file_bytes

    async def start_upload(self) -> FileUpload:
        file_id = new_file_id()
        writer = await self._blobs.writer(file_key(file_id))
        return FileUpload(file_id, writer, self._limits.max_file_bytes)

    async def finish_upload(
        self,
        upload: FileUpload,
        project: str,
        *,
        purpose: str | None,
        filename: str | None,
        expires_after_anchor: str | None = None,
        expires_after_seconds: str | None = None,
    ) -> FileRow:
        """Check the form, then publish the blob and record the file; or abort the upload."""
        try:
            if filename and "\x00" in filename:
                raise invalid_value("file", "The filename contains a NUL character.")
            purpose = _check_purpose(purpose)
            now = int(time.time())
            expires_at = self._expiry(purpose, now, expires_after_anchor, expires_after_seconds)
            if purpose == FilePurpose.BATCH and upload.first_byte != b"{":
                problem = (
                    f"line {upload.first_line} is not a JSON object"
                    if upload.first_byte
                    else "the file has no lines"
                )
                raise ApiError(
                    400,
                    f"Invalid file format for Batch API: {problem}. Must be .jsonl: one JSON "
                    "request object per line.",
                    param="file",
                    code="invalid_file_format",
                )
            await upload.commit()
        except BaseException:
            await upload.abort()
            raise
        row = FileRow(
            id=upload.file_id,
            project=project,
            filename=filename or "upload",
            purpose=purpose,
            bytes=upload.bytes,
            created_at=now,
            expires_at=expires_at,
            blob_key=file_key(upload.file_id),
        )
        try:
            await file_store.add_file(self._db, row)
        except BaseException:
            await self._blobs.delete(row.blob_key)
            raise
        return row

    async def upload(
        self, project: str, chunks: AsyncIterable[bytes], *, purpose: str, filename: str
    ) -> FileRow:
        """A whole upload from a stream of bytes (the CLI's local files)."""
        upload = await self.start_upload()
        try:
            async for chunk in chunks:
                await upload.write(chunk)
        except BaseException:
            await upload.abort()
            raise
        return await self.finish_upload(upload, project, purpose=purpose, filename=filename)

    async def get(self, project: str, file_id: str) -> FileRow:
        row = await file_store.get_file(self._db, project, file_id, int(time.time()))
        if row is None:
            raise not_found("File", file_id)
        return row

    async def list(
        self, project: str, *, purpose: str | None, limit: int, after: str | None, ascending: bool
    ) -> tuple[list[FileRow], bool]:
        return await file_store.list_files(
            self._db,
            project,
            int(time.time()),
            purpose=purpose,
            limit=limit,
            after=after,
            ascending=ascending,
        )

    async def delete(self, project: str, file_id: str) -> None:
        """Gone from the API at once; the sweeper frees the blob once no batch reads it."""
        if not await file_store.soft_delete(self._db, project, file_id, int(time.time())):
            raise not_found("File", file_id)
        self._wake()

    def chunks(self, row: FileRow) -> AsyncIterator[bytes]:
        return self._blobs.iter_chunks(row.blob_key)

    async def content(self, project: str, file_id: str) -> tuple[FileRow, AsyncIterator[bytes]]:
        row = await self.get(project, file_id)
        return row, self._blobs.iter_chunks(row.blob_key)

    def _expiry(
        self, purpose: str, now: int, anchor: str | None, seconds: str | None
    ) -> int | None:
        if anchor is None and seconds is None:
            if purpose == FilePurpose.BATCH:
                return now + int(parse_duration(self._limits.default_file_ttl))
            return None
        return now + expires_after_seconds("expires_after", anchor, seconds)


def _check_purpose(purpose: str | None) -> FilePurpose:
    if not purpose:
        raise missing_parameter("purpose")
    if purpose not in UPLOAD_PURPOSES:
        allowed = ", ".join(f"'{p}'" for p in UPLOAD_PURPOSES)
        raise invalid_value(
            "purpose", f"Invalid value: '{purpose}'. Supported values are: {allowed}."
        )
    return FilePurpose(purpose)
