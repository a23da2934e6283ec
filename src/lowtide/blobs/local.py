"""Blobs as files under one folder; a write lands in a temp file and is renamed into place."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from lowtide.blobs.base import BlobStore, BlobWriter


class _LocalWriter(BlobWriter):
    def __init__(self, final_path: Path, tmp_path: Path) -> None:
        self._final = final_path
        self._tmp = tmp_path
        self._fh = open(tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self.bytes_written = 0

    async def write(self, data: bytes | bytearray) -> None:
        # Local page-cache writes are fast enough to do inline on the event loop.
        self._fh.write(data)
        self.bytes_written += len(data)

    async def commit(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, self._final)

    async def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        # Resolved once: every key's path is checked against it, and listing reports keys
        # relative to it, so a relative data folder must not make the two disagree.
        self.root = root.resolve()
        self._root_slash = os.path.join(str(self.root), "")
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Lexical, not Path.resolve(): resolving stats every folder on the way (~50 us a key,
        # several keys a shard). Keys come from Lowtide; ".." is what could walk out of the
        # root, and normpath removes it before the check. (A symlink inside the data folder
        # is the operator's own doing.)
        path = os.path.normpath(os.path.join(self._root_slash, key))
        if not path.startswith(self._root_slash) or path == self._root_slash:
            raise ValueError(f"blob key escapes the store: {key!r}")
        return Path(path)

    async def writer(self, key: str) -> BlobWriter:
        return _LocalWriter(self._path(key), self._tmp / uuid.uuid4().hex)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        with open(self._path(key), "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)

    async def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    async def iter_chunks(
        self, key: str, chunk_size: int = 1 << 20, start: int = 0
    ) -> AsyncIterator[bytes]:
        with open(self._path(key), "rb") as fh:
            fh.seek(start)
            while chunk := fh.read(chunk_size):
                yield chunk

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        return self._path(key).exists()

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for folder, dirs, names in os.walk(base):
            dirs.sort()
            here = Path(folder)
            for name in sorted(names):
                path = here / name
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                yield path.relative_to(self.root).as_posix(), mtime

    async def sweep_incomplete(self, older_than_seconds: float) -> int:
        removed = 0
        cutoff = time.time() - older_than_seconds
        for entry in self._tmp.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
