"""Blob store: file bodies and result segments. Local folder by default."""

from lowtide.blobs.base import BlobStore, BlobWriter
from lowtide.blobs.local import LocalBlobStore

__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "open_blob_store"]


def open_blob_store(
    data_dir: str,
    url: str | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> BlobStore:
    """The local folder DATA_DIR/blobs, or an S3-compatible bucket for `s3://bucket/prefix`."""
    from pathlib import Path

    if url:
        from lowtide.blobs.s3 import S3BlobStore

        return S3BlobStore(url, endpoint_url=endpoint_url, region=region)
    return LocalBlobStore(Path(data_dir) / "blobs")
