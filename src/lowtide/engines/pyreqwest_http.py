"""The OpenAI-compatible engine on pyreqwest (Rust's reqwest and hyper) instead of aiohttp.

Against a fast upstream the HTTP client is most of a worker's CPU: aiohttp runs ~860 lines of
Python a request, pyreqwest parses and pools in Rust, off the event loop's thread, at about
half the CPU a request (`bench/bare_client.py --client`). What is sent, what a route changes
in it and how an answer is read are the aiohttp engine's (openai_http.py); only the exchange
differs. A route opts in with `http_client = "pyreqwest"`.
"""

from __future__ import annotations

import datetime
from typing import Any

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import RequestError

from lowtide.config import ModelRoute
from lowtide.engines.base import EngineResponse
from lowtide.engines.openai_http import (
    OpenAIHttpEngine,
    answer,
    read_header_items,
    timed_out,
    unreachable,
)


class PyreqwestEngine(OpenAIHttpEngine):
    def __init__(self, route: ModelRoute) -> None:
        super().__init__(route)
        self._client: Client | None = None
        self._str_urls: dict[str, str] = {}  # endpoint -> its URL as the client takes it

    async def start(self) -> None:
        if self._client is None:
            self._client = (
                ClientBuilder()
                .max_connections(self.max_concurrency)
                .pool_idle_timeout(datetime.timedelta(seconds=30))
                .timeout(datetime.timedelta(seconds=self._route.timeout))
                .default_headers(self._headers)
                .no_proxy()  # as aiohttp: the environment's proxy settings are not read
                .gzip(True)
                .build()
            )

    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if self._client is None:
            await self.start()
        assert self._client is not None
        url = self._str_urls.get(endpoint)
        if url is None:
            url = self._str_urls[endpoint] = str(self._url(endpoint))
        try:
            resp = await self._client.post(url).body_bytes(self._encode(body)).build().send()
            raw = bytes(await resp.bytes())
            status = resp.status
            limits, hints = read_header_items(resp.headers.items())
        except TimeoutError as exc:  # the request's timeout, connecting to the body's end
            raise timed_out(self._route) from exc
        except RequestError as exc:
            raise unreachable(exc) from exc
        return answer(status, raw, limits, hints)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
