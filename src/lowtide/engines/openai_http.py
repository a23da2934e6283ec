"""Any OpenAI-compatible server over HTTP: vLLM, SGLang, llama.cpp, Ollama, hosted providers."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import aiohttp
import orjson
from yarl import URL

from lowtide.config import ModelRoute
from lowtide.engines.base import (
    Engine,
    EngineResponse,
    TransientEngineError,
    error_response,
)
from lowtide.engines.deadlines import Deadlines
from lowtide.engines.usage import read_tokens


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_JSON_CONTAINERS = (dict, list)
ANTHROPIC_VERSION = "2023-06-01"  # the Messages API version a route with api = "anthropic" asks for
_LIMIT_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")
_HINTS = frozenset((b"retry-after", b"retry-after-ms", b"x-request-id", b"request-id"))
_HINT_NAMES = {name: name.decode() for name in _HINTS}
# The first byte of every name above, either case: the others are skipped unread.
_FIRST_BYTES = frozenset(b"xXaArR")


# The rate-limit headers (and retry hints) of an answer are read on the first answer, every
# 8th one after it, and every answer that is not a success: upstreams repeat them on every
# answer, and admission keeps its own count in between. The other answers' headers are not
# walked at all: a dozen Python steps a header, on every answer's path.
LIMITS_EVERY_MASK = 7


def read_answer_headers(raw: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(rate-limit headers, retry and request-id headers) of an answer, names lowercased, the
    first of repeated names kept: one pass over the raw header bytes, on every answer's path
    (callgrind: ~6k instructions for a local server's five headers, ~32k for a hosted API's
    fifteen with six rate-limit ones; 9.7k and 38.6k when every name was lowered)."""
    limits: dict[str, str] = {}
    hints: dict[str, str] = {}
    for name, value in raw:
        # date, server, content-*: no call spent on them (a name is never empty: aiohttp refuses
        # an answer with one)
        if name[0] not in _FIRST_BYTES:
            continue
        # Most servers send names in lowercase: lowered only when not found as they are.
        hint = _HINT_NAMES.get(name)
        if hint is None and not name.startswith(_LIMIT_PREFIXES):
            name = name.lower()
            hint = _HINT_NAMES.get(name)
            if hint is None and not name.startswith(_LIMIT_PREFIXES):
                continue
        if hint is not None:
            if hint not in hints:
                hints[hint] = value.decode("latin-1")
        else:
            limits.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return limits, hints


_LIMIT_PREFIXES_STR = tuple(prefix.decode() for prefix in _LIMIT_PREFIXES)
_HINTS_STR = frozenset(_HINT_NAMES.values())


def read_header_items(items: Any) -> tuple[dict[str, str], dict[str, str]]:
    """read_answer_headers for a client that gives (name, value) strings, names lowercased."""
    limits: dict[str, str] = {}
    hints: dict[str, str] = {}
    for name, value in items:
        if name.startswith(_LIMIT_PREFIXES_STR):
            limits.setdefault(name, value)
        elif name in _HINTS_STR:
            hints.setdefault(name, value)
    return limits, hints


def one_line(raw: bytes) -> bytes | None:
    """JSON that parsed, as one line for a JSONL file: without the newline many servers end it
    with; None when it spans lines (pretty-printed), to be encoded again."""
    raw = raw.strip(b" \t\r\n")
    # find, not `in`: on bytes, `in` first tries its operand as an integer and builds and drops
    # a TypeError (twice the cost, on every answer's path).
    return raw if raw.find(b"\n") < 0 and raw.find(b"\r") < 0 else None


def timed_out(route: ModelRoute) -> TransientEngineError:
    return TransientEngineError(
        "request_timeout", f"The upstream did not answer within {route.timeout:g}s."
    )


def unreachable(exc: Exception) -> TransientEngineError:
    return TransientEngineError(
        "connection_error", f"Connection to the upstream failed: {exc.__class__.__name__}: {exc}"
    )


def answer(
    status: int, raw: bytes, limits: dict[str, str] | None, hints: dict[str, str]
) -> EngineResponse:
    """What the upstream answered, whichever HTTP client read it: the body and its token
    counts, a non-JSON body turned into an error, the retry hints."""
    retry_after = (
        parse_retry_after(hints) if "retry-after" in hints or "retry-after-ms" in hints else None
    )
    request_id = hints.get("x-request-id") or hints.get("request-id")
    return answer_body(status, raw, request_id, retry_after, limits)


def answer_body(
    status: int,
    raw: bytes,
    request_id: str | None,
    retry_after: float | None = None,
    limits: dict[str, str] | None = None,
) -> EngineResponse:
    """The answer's body, parsed (orjson decides what is JSON, as every reader of the result
    files does) and kept as sent where it is one line of JSON, for the result line; a small
    success's token counts read from its bytes (engines/usage.py)."""
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    if parsed is None and status // 100 == 2:
        status = 502
    tokens = None
    if isinstance(parsed, _JSON_CONTAINERS):
        body_json = one_line(raw)
        if type(parsed) is dict and len(raw) <= READ_TOKENS_MAX_BYTES:
            tokens = read_tokens(raw)
    else:
        text = raw[:2000].decode("utf-8", "replace")
        message = f"Upstream answered HTTP {status} with a non-JSON body: {text}"
        parsed = error_response(status, message, type="upstream_error").body
        body_json = None
    return EngineResponse(status, parsed, request_id, retry_after, limits, body_json, tokens)


# Past this, reading the counts from the bytes costs more than reading them from the parsed
# body (msgspec skips an embedding's floats more slowly than the dict lookups take).
READ_TOKENS_MAX_BYTES = 4096


class OpenAIHttpEngine(Engine):
    def __init__(self, route: ModelRoute) -> None:
        if not route.base_url:
            raise ValueError(f"model route {route.name!r}: engine 'openai' needs base_url")
        self.name = route.name
        self.max_concurrency = route.max_concurrency
        self._route = route
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/json", **route.headers}
        key = route.resolved_api_key()
        if route.api == "anthropic":  # Messages requests pass through as they are
            self._headers = {"anthropic-version": ANTHROPIC_VERSION, **self._headers}
            if key:
                self._headers["x-api-key"] = key
        elif key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._urls: dict[str, URL] = {}  # endpoint -> its URL, parsed once
        # Bodies go out as the lines hold them unless the route changes them (_encode).
        self._as_sent = not route.upstream_model and route.batch_priority is None
        self._deadlines = Deadlines(route.timeout)
        self._answers = 0  # answers read: every 8th one's rate-limit headers are read too

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_concurrency, limit_per_host=0, keepalive_timeout=30
            )
            # The headers are the session's: sent with every request, merged once, not per call.
            # No aiohttp timeout: the route's timeout is kept by self._deadlines.
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
            self._deadlines.start()

    def _url(self, endpoint: str) -> URL:
        url = self._urls.get(endpoint)
        if url is None:
            path = endpoint[3:] if endpoint.startswith("/v1/") else endpoint
            url = self._urls[endpoint] = URL(f"{self._route.base_url}{path}")
        return url

    def _encode(self, body: dict[str, Any]) -> bytes:
        """The request's bytes, with what the route changes in it."""
        if self._route.upstream_model:
            body = {**body, "model": self._route.upstream_model}
        if self._route.batch_priority is not None:
            body = {**body, "priority": self._route.batch_priority}
        return orjson.dumps(body)

    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if self._session is None:
            await self.start()
        assert self._session is not None
        url = self._urls.get(endpoint)  # (not `or`: a URL's truth is a Python call)
        if url is None:
            url = self._url(endpoint)
        deadlines = self._deadlines
        task = deadlines.enter()
        try:
            # Awaited, not `async with`: one coroutine less on every request's path; release()
            # is what leaving the context would do (and closes a connection left mid-answer).
            resp = await self._session.post(
                url, data=orjson.dumps(body) if self._as_sent else self._encode(body)
            )
            try:
                raw = await resp.read()
            finally:
                resp.release()
            status = resp.status
            answers = self._answers
            self._answers = answers + 1
            if answers & LIMITS_EVERY_MASK and 200 <= status < 300:
                # The usual answer: its request id is all that is read of its headers.
                headers = resp.headers
                request_id = headers.get("x-request-id") or headers.get("request-id")
                if request_id is not None and not request_id.isascii():
                    # aiohttp decodes values as UTF-8 (undecodable bytes as surrogates);
                    # the header walk reads every value as Latin-1, as HTTP does.
                    request_id = request_id.encode("utf-8", "surrogateescape").decode("latin-1")
                return answer_body(status, raw, request_id)
            limits, hints = read_answer_headers(resp.raw_headers)
        except asyncio.CancelledError:
            if deadlines.timed_out(task):
                raise timed_out(self._route) from None
            raise
        except TimeoutError as exc:
            raise timed_out(self._route) from exc
        except aiohttp.ClientError as exc:
            raise unreachable(exc) from exc
        finally:
            deadlines.leave(task)
        return answer(status, raw, limits, hints)

    async def close(self) -> None:
        try:
            if self._session is not None:
                await self._session.close()
                self._session = None
        finally:
            await self._deadlines.close()
