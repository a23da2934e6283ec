"""The ASGI application: routes, error envelope, request ids, health, and the worker lifecycle."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowtide.api import batches, files, models, organization, webhooks
from lowtide.api.anthropic import install as install_anthropic
from lowtide.api.guards import FrontDoor
from lowtide.api.openapi import install_openapi
from lowtide.api.responses import (
    api_error_handler,
    http_error_handler,
    json_response,
    unexpected_error_handler,
    validation_error_handler,
)
from lowtide.dashboard import install as install_dashboard
from lowtide.errors import ApiError
from lowtide.ids import new_request_id
from lowtide.runtime import Runtime


class RequestIdMiddleware:
    """Every response carries its request id (both SDKs read it into errors)."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        self.app = app

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id  # for error bodies that carry it
        raw_id = request_id.encode()

        async def send_with_id(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                # x-request-id for the OpenAI SDK, request-id for Anthropic's.
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", raw_id),
                    (b"request-id", raw_id),
                ]
            await send(message)

        return await self.app(scope, receive, send_with_id)


def create_app(runtime: Runtime) -> FastAPI:
    ready = {"ok": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        await runtime.start()
        ready["ok"] = True
        try:
            yield
        finally:
            ready["ok"] = False
            await runtime.stop()

    app = FastAPI(
        title="Lowtide",
        version="0.1.0",
        summary="Self-hosted OpenAI-compatible Batch API",
        lifespan=lifespan,
        docs_url=None,  # api/docs.py serves /docs from local files
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.add_middleware(
        FrontDoor,
        api_keys={k.key: k.project for k in runtime.config.auth.api_keys},
        admin_keys={k.key for k in runtime.config.auth.api_keys if k.admin},
        max_json_body=runtime.config.server.max_json_body_bytes,
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(organization.router)
    app.include_router(webhooks.router)
    app.include_router(models.router)
    install_anthropic(app, runtime)  # Anthropic's Message Batches API at /v1/messages
    install_openapi(app)
    install_dashboard(app)  # the web dashboard at / and /ui/ (dashboard/)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():  # type: ignore[no-untyped-def]
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():  # type: ignore[no-untyped-def]
        if not ready["ok"]:
            return json_response({"status": "starting"}, 503)
        return json_response(runtime.health())

    return app
