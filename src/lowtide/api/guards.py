"""The front door, before any route runs: who is asking, and how much they may send.

A pure ASGI layer, so it sees the raw request: the API key is checked from the headers before a
single body byte is read (a request without a valid key costs a header parse), and a JSON body
is counted as it actually arrives — `Content-Length` or chunked — and refused with 413 the
moment it passes the limit, never buffered beyond it. Uploads (`POST /v1/files`) stream to the
blob store and are bounded there, by the upload limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from lowtide.api.anthropic.errors import error_body, is_anthropic_path
from lowtide.api.auth import bearer_token, project_for
from lowtide.api.responses import json_response
from lowtide.errors import ApiError, error_envelope

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_PATH = "/v1/files"
# Anthropic's create takes its requests inline, up to 256 MB: the face parses it as a stream
# and bounds it by [message_batches] max_bytes.
MESSAGE_BATCHES_PATH = "/v1/messages/batches"
STREAMED_PATHS = frozenset({UPLOAD_PATH, MESSAGE_BATCHES_PATH})
# The dashboard's pages (dashboard/) check their own session cookie; their POSTs are small
# HTML forms (bounded here like any body) rather than JSON.
DASHBOARD_PREFIX = "/ui/"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class FrontDoor:
    def __init__(
        self, app: App, api_keys: dict[str, str], admin_keys: set[str], max_json_body: int
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.admin_keys = admin_keys  # keys that see every project's usage and costs
        self.max_json_body = max_json_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        anthropic = is_anthropic_path(path)
        if path.startswith("/v1/") or path == "/v1":
            # Anthropic's SDK sends its key as x-api-key (or a bearer token); OpenAI's as bearer.
            api_key = headers.get(b"x-api-key") if anthropic else None
            authorization = b"Bearer " + api_key if api_key else headers.get(b"authorization", b"")
            try:
                project = project_for(self.api_keys, authorization)
            except ApiError as exc:
                message = exc.message
                if anthropic:
                    message = message.replace(
                        "the Authorization header as 'Bearer YOUR_KEY'", "the x-api-key header"
                    )
                body = error_body(exc.status, message) if anthropic else exc.envelope()
                return await _answer(scope, receive, send, exc.status, body, close=True)
            state = scope.setdefault("state", {})
            state["project"] = project
            state["admin"] = (
                bool(self.admin_keys) and bearer_token(authorization) in self.admin_keys
            )
        if scope["method"] in _BODY_METHODS and path not in STREAMED_PATHS:
            body = await self._bounded_body(headers.get(b"content-length"), receive)
            if body is None:
                message = f"The request body is larger than {self.max_json_body:,} bytes."
                envelope = (
                    error_body(413, message)
                    if anthropic
                    else error_envelope(message, "invalid_request_error", None, "body_too_large")
                )
                return await _answer(scope, receive, send, 413, envelope, close=True)
            problem = None if path.startswith(DASHBOARD_PREFIX) else _unstorable(body)
            if problem is not None:
                envelope = (
                    error_body(400, problem)
                    if anthropic
                    else error_envelope(problem, "invalid_request_error", None, "invalid_json")
                )
                return await _answer(scope, receive, send, 400, envelope)
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    async def _bounded_body(self, declared: bytes | None, receive: Receive) -> bytes | None:
        """The whole body if it fits the limit, else None (having read at most limit + 1 chunk)."""
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_json_body):
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_json_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _unstorable(body: bytes) -> str | None:
    """Why a JSON body cannot be taken, or None. The route's own parser is lenient where the
    databases are not: it takes lone surrogates ("\\ud800"), which no database can store."""
    if not body.strip():
        return None
    try:
        orjson.loads(body)  # strict: valid UTF-8, no lone surrogates
    except orjson.JSONDecodeError:
        return "We could not parse the JSON body of your request: it is not valid JSON in UTF-8."
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then whatever comes next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    envelope: dict[str, Any],
    *,
    close: bool = False,
) -> None:
    """Answer without reading the body; `close` ends the connection after the answer, so the
    server does not go on reading (and discarding) the rest of the body."""
    headers = {"connection": "close"} if close else None
    await json_response(envelope, status, headers)(scope, receive, send)
