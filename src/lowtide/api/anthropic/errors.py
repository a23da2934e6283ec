"""Anthropic's error envelope, and the error type each HTTP status has in it."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowtide.api.responses import json_response
from lowtide.errors import ApiError

# The paths this face answers; the front door gives them Anthropic's auth and envelope too.
PREFIX = "/v1/messages"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int, message: str, request_id: str | None = None, type: str | None = None
) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": type or error_type(status), "message": message},
        "request_id": request_id,
    }


def is_anthropic_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def _respond(
    request: Request,
    status: int,
    message: str,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return json_response(error_body(status, message, _request_id(request), type), status, headers)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    # The core's errors carry OpenAI's types and map by status; a type only Anthropic has
    # (request_too_large, ...) was chosen for this face and passes through.
    own = exc.type if exc.type in _TYPES.values() and exc.type != _TYPES[400] else None
    return _respond(request, exc.status, exc.message, own, exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    message = f"{loc}: {first.get('msg', 'invalid')}" if loc else str(first.get("msg", "invalid"))
    return _respond(request, 400, message)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Not found: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = str(exc.detail)
    return _respond(request, exc.status_code, message, headers=dict(exc.headers or {}))


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    import logging

    logging.getLogger("lowtide.api").exception("unhandled error", exc_info=exc)
    return _respond(request, 500, "The server had an error while processing your request.")
