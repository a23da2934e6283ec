"""JSON replies and OpenAI's error envelope."""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from lowtide_sim.config import SimConfig

__all__ = ["error_body", "error_response", "json_response"]


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _retry_after_headers(value: str) -> dict[str, str]:
    headers = {"Retry-After": value}
    try:
        seconds = float(value)
    except ValueError:
        return headers  # e.g. an HTTP date: send it as-is
    if math.isfinite(seconds):
        headers["retry-after-ms"] = f"{seconds * 1000:g}"
    return headers


def error_response(status: int, message: str, code: str | None, cfg: SimConfig) -> web.Response:
    """Build an OpenAI-style error response; 429s carry Retry-After."""
    if status == 429:
        return json_response(
            error_body(message, "rate_limit_exceeded", code or "rate_limit_exceeded"),
            429,
            _retry_after_headers(cfg.retry_after),
        )
    if status >= 500:
        return json_response(error_body(message, "server_error", code), status)
    type_ = {401: "authentication_error", 403: "permission_error"}.get(
        status, "invalid_request_error"
    )
    return json_response(error_body(message, type_, code), status)
