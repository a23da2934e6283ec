"""The blob interface every backend implements: streamed writes that appear atomically."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator


class BlobWriter(ABC):
    """Bytes go in piece by piece; nothing is visible under the key until commit()."""

    bytes_written: int = 0

    @abstractmethod
    async def write(self, data: bytes | bytearray) -> None: ...

    @abstractmethod
    async def commit(self) -> None: ...

    @abstractmethod
    async def abort(self) -> None: ...

    async def __aenter__(self) -> BlobWriter:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is not None:
            await self.abort()


class BlobStore(ABC):
    @abstractmethod
    async def writer(self, key: str) -> BlobWriter: ...

    @abstractmethod
    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the blob."""

    @abstractmethod
    async def read(self, key: str) -> bytes:
        """The whole blob; only for blobs known to be small (result segments)."""

    @abstractmethod
    def iter_chunks(
        self, key: str, chunk_size: int = 1 << 20, start: int = 0
    ) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        """(key, last-modified unix time) of each committed blob under the folder `prefix`,
        in key order. Streams: a listing of millions of keys is never held whole."""

    @abstractmethod
    async def sweep_incomplete(self, older_than_seconds: float) -> int:
        """Drop the leftovers of writes that were never committed or aborted (the writer died):
        temp files here, multipart uploads in S3. Returns how many went."""

    async def put(self, key: str, data: bytes) -> None:
        writer = await self.writer(key)
        async with writer:
            await writer.write(data)
            await writer.commit()
