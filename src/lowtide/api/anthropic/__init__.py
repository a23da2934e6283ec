"""Anthropic's Message Batches API, a face of its own over the same core: mounted at
/v1/messages with Anthropic's error envelope (the front door gives it Anthropic's auth)."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowtide.api.anthropic import batches, errors
from lowtide.api.responses import json_response
from lowtide.errors import ApiError
from lowtide.runtime import Runtime


def install(app: FastAPI, runtime: Runtime) -> None:
    face = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    face.state.runtime = runtime
    face.add_exception_handler(ApiError, errors.api_error_handler)
    face.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    face.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    face.add_exception_handler(Exception, errors.unexpected_error_handler)
    face.include_router(batches.router)
    app.mount(errors.PREFIX, face)

    async def messages_not_served(request: Request) -> Response:
        message = (
            "Lowtide serves Anthropic's Message Batches API (/v1/messages/batches); the "
            f"synchronous Messages API is not served here ({request.method} {request.url.path})."
        )
        state = request.scope.get("state", {})
        return json_response(errors.error_body(404, message, state.get("request_id")), 404)

    app.add_api_route(
        errors.PREFIX,
        messages_not_served,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
