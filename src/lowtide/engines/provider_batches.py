"""A provider's own Files and Batches API (OpenAI's shape: OpenAI, Azure, Groq, Together, Lowtide).

Only what sending lines as provider batches needs: upload a file (streamed), create, find by
metadata, retrieve, cancel, download a file (streamed), delete a file. Every call raises
`ProviderUnavailable` when trying again later may help (connection dropped, timeout, 429, 5xx)
and `ProviderRefused` when it will not.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from lowtide.config import ModelRoute
from lowtide.engines.openai_http import parse_retry_after

_LIST_PAGE = 100


class ProviderError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    """Try again later: the call may or may not have taken effect."""


class ProviderRefused(ProviderError):
    """The provider answered no (4xx other than 408/409/429): trying again will not help."""


def _is_transient(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


class ProviderBatchClient:
    def __init__(self, route: ModelRoute) -> None:
        assert route.base_url
        self.base_url = route.base_url
        self._timeout = route.timeout
        self._headers = dict(route.headers)
        key = route.resolved_api_key()
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No total timeout: a 200 MB upload or download may take long. Reads that stall
            # for `timeout` seconds fail.
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=min(30.0, self._timeout), sock_read=self._timeout
            )
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self._http().request(method, self.base_url + path, **kwargs) as resp:
                raw = await resp.read()
                self._raise_for(resp.status, raw, resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                0, "connection_error", f"{method} {path}: {exc.__class__.__name__}: {exc}"
            ) from exc
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProviderUnavailable(
                502, "invalid_response", f"{method} {path} answered a body that is not JSON"
            ) from exc

    @staticmethod
    def _raise_for(status: int, raw: bytes, headers: Any) -> None:
        if 200 <= status < 300:
            return
        code, message = f"http_{status}", raw[:1000].decode("utf-8", "replace")
        try:
            err = orjson.loads(raw).get("error")
            if isinstance(err, dict):
                code = str(err.get("code") or err.get("type") or code)
                message = str(err.get("message") or message)
        except (orjson.JSONDecodeError, AttributeError):
            pass
        kind = ProviderUnavailable if _is_transient(status) else ProviderRefused
        raise kind(status, code, message, parse_retry_after(headers))

    # -- files ---------------------------------------------------------------------------
    async def upload(self, filename: str, length: int, content: AsyncIterator[bytes]) -> str:
        """Upload `length` bytes as a purpose=batch file, streamed; the provider's file id."""
        boundary = "lowtide" + secrets.token_hex(12)
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
            "\r\nContent-Type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        async def body() -> AsyncIterator[bytes]:
            yield head
            async for piece in content:
                yield piece
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + length + len(tail)),
        }
        created = await self._call("POST", "/files", data=body(), headers=headers)
        return str(created["id"])

    async def download(self, file_id: str) -> AsyncIterator[bytes]:
        """A file's content, in pieces as they arrive."""
        try:
            async with self._http().get(f"{self.base_url}/files/{file_id}/content") as resp:
                if resp.status != 200:
                    self._raise_for(resp.status, await resp.read(), resp.headers)
                async for piece in resp.content.iter_chunked(1 << 20):
                    yield piece
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                0, "connection_error", f"download {file_id}: {exc.__class__.__name__}: {exc}"
            ) from exc

    async def delete_file(self, file_id: str) -> None:
        try:
            await self._call("DELETE", f"/files/{file_id}")
        except ProviderRefused as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise

    # -- batches -------------------------------------------------------------------------
    async def create(
        self, file_id: str, endpoint: str, window: str, metadata: dict[str, str]
    ) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": window,
            "metadata": metadata,
        }
        return dict(await self._call("POST", "/batches", json=body))

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return dict(await self._call("POST", f"/batches/{batch_id}/cancel"))

    async def find(self, key: str, value: str, *, since: float) -> dict[str, Any] | None:
        """The batch whose metadata[key] == value, among those created after `since`.

        Lists newest first and stops at the first batch older than `since`, so the lookup
        after a crash reads only the batches created since the create that may have landed.
        """
        after: str | None = None
        while True:
            params = {"limit": str(_LIST_PAGE)}
            if after:
                params["after"] = after
            page = await self._call("GET", "/batches", params=params)
            data = page.get("data") or []
            for batch in data:
                if (batch.get("metadata") or {}).get(key) == value:
                    return dict(batch)
            if not data or not page.get("has_more"):
                return None
            if min(int(b.get("created_at") or 0) for b in data) < since:
                return None
            after = str(data[-1]["id"])
