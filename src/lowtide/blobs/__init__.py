"""Blob store: file bodies and result segments. Local folder by default."""

from lowtide.blobs.base import BlobStore, BlobWriter
from lowtide.blobs.local import LocalBlobStore

__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "open_blob_store"]


def open_blob_store(data_dir: str) -> BlobStore:
    from pathlib import Path

    return LocalBlobStore(Path(data_dir) / "blobs")
