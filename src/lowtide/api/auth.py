"""API keys map to projects; every object belongs to the project of the key that made it."""

from __future__ import annotations

from fastapi import Request

from lowtide.errors import ApiError
from lowtide.vocabulary import DEFAULT_PROJECT


def project_of(request: Request) -> str:
    """FastAPI dependency: the caller's project, or 401 in the OpenAI envelope."""
    keys: dict[str, str] = request.app.state.api_keys
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if not keys:
        return DEFAULT_PROJECT
    if not token:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    project = keys.get(token)
    if project is None:
        shown = token[:3] + "*" * 4 + token[-4:] if len(token) > 8 else "****"
        raise ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
    return project
