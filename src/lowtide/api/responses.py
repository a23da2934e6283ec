"""JSON responses rendered with orjson, and the error envelope for every failure path."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from lowtide.errors import ApiError, error_envelope

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return OrjsonResponse(content, status_code=status_code, headers=headers)


async def api_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response(exc.envelope(), exc.status, exc.headers)


async def validation_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "missing" and param is None:
        message, code = (
            "The request body is missing: send a JSON object.",
            "missing_required_parameter",
        )
    elif kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    elif kind == "json_invalid":
        message, code = "We could not parse the JSON body of your request.", "invalid_json"
        param = None
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return json_response(error_envelope(message, "invalid_request_error", param, code), 400)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = allowed
    else:
        message = str(exc.detail)
    body = error_envelope(message, "invalid_request_error")
    return json_response(body, exc.status_code, headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this path. Starlette's own Allow names only the first
    route's (and /v1/files has two routes, GET and POST)."""
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    allowed = [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]
    return ", ".join(allowed)


async def unexpected_error_handler(_request: Request, exc: Exception) -> Response:
    import logging

    logging.getLogger("lowtide.api").exception("unhandled error", exc_info=exc)
    body = error_envelope("The server had an error while processing your request.", "server_error")
    return json_response(body, 500)
