"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph, R2...), for many hosts.

boto3 is synchronous, so each call runs on a worker thread. Writes are multipart uploads in
8 MiB parts: memory stays bounded whatever the size, and nothing is visible under the key until
the upload is completed; an aborted or abandoned upload never shows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

from lowtide.blobs.base import BlobStore, BlobWriter

PART_BYTES = 8 * 1024 * 1024  # S3 needs >= 5 MiB for every part but the last


class _S3Writer(BlobWriter):
    def __init__(self, store: S3BlobStore, key: str) -> None:
        self._store = store
        self._key = key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.bytes_written = 0

    async def write(self, data: bytes | bytearray) -> None:
        self._buffer += data
        self.bytes_written += len(data)
        if len(self._buffer) >= PART_BYTES:
            await self._flush_part()

    async def _flush_part(self) -> None:
        s3, bucket = self._store.client, self._store.bucket
        if self._upload_id is None:
            created = await asyncio.to_thread(
                s3.create_multipart_upload, Bucket=bucket, Key=self._key
            )
            self._upload_id = created["UploadId"]
        body, self._buffer = bytes(self._buffer), bytearray()
        number = len(self._parts) + 1
        part = await asyncio.to_thread(
            s3.upload_part,
            Bucket=bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        self._parts.append({"PartNumber": number, "ETag": part["ETag"]})

    async def commit(self) -> None:
        s3, bucket = self._store.client, self._store.bucket
        if self._upload_id is None:  # small blob: one plain PUT
            await asyncio.to_thread(
                s3.put_object, Bucket=bucket, Key=self._key, Body=bytes(self._buffer)
            )
            return
        if self._buffer:
            await self._flush_part()
        await asyncio.to_thread(
            s3.complete_multipart_upload,
            Bucket=bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    async def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            await asyncio.to_thread(
                self._store.client.abort_multipart_upload,
                Bucket=self._store.bucket,
                Key=self._key,
                UploadId=upload_id,
            )


class S3BlobStore(BlobStore):
    def __init__(
        self, url: str, *, endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        import boto3

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"storage url {url!r}: expected s3://bucket[/prefix]")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL"),
            region_name=region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def writer(self, key: str) -> BlobWriter:
        return _S3Writer(self, self._key(key))

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        response = await asyncio.to_thread(
            self.client.get_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Range=f"bytes={start}-{end - 1}",
        )
        return await asyncio.to_thread(response["Body"].read)

    async def read(self, key: str) -> bytes:
        try:
            response = await asyncio.to_thread(
                self.client.get_object, Bucket=self.bucket, Key=self._key(key)
            )
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(key) from exc
        return await asyncio.to_thread(response["Body"].read)

    async def iter_chunks(
        self, key: str, chunk_size: int = 1 << 20, start: int = 0
    ) -> AsyncIterator[bytes]:
        extra = {"Range": f"bytes={start}-"} if start else {}
        response = await asyncio.to_thread(
            self.client.get_object, Bucket=self.bucket, Key=self._key(key), **extra
        )
        body = response["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, chunk_size):
                yield chunk
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        strip = len(self._key(""))
        token: dict[str, str] = {}
        while True:
            page = await asyncio.to_thread(
                self.client.list_objects_v2, Bucket=self.bucket, Prefix=self._key(prefix), **token
            )
            for item in page.get("Contents", []):
                yield item["Key"][strip:], item["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    async def sweep_incomplete(self, older_than_seconds: float) -> int:
        """Abort multipart uploads that a dead process started; S3 keeps (and bills) their parts
        until then. A bucket lifecycle rule (AbortIncompleteMultipartUpload) does the same."""
        cutoff = time.time() - older_than_seconds
        aborted = 0
        marker: dict[str, str] = {}
        while True:
            page = await asyncio.to_thread(
                self.client.list_multipart_uploads,
                Bucket=self.bucket,
                Prefix=self._key(""),
                **marker,
            )
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    await asyncio.to_thread(
                        self.client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            marker = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    async def exists(self, key: str) -> bool:
        try:
            await asyncio.to_thread(self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.ClientError:
            return False
        return True
