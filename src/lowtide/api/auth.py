"""API keys map to projects; every object belongs to the project of the key that made it."""

from __future__ import annotations

from fastapi import Request

from lowtide.errors import ApiError
from lowtide.vocabulary import DEFAULT_PROJECT


def project_for(api_keys: dict[str, str], authorization: bytes) -> str:
    """The project of the bearer key in an Authorization header, or 401 in the OpenAI envelope.

    With no keys configured every caller is the default project."""
    if not api_keys:
        return DEFAULT_PROJECT
    token = bearer_token(authorization)
    if not token:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    project = api_keys.get(token)
    if project is None:
        shown = token[:3] + "*" * 4 + token[-4:] if len(token) > 8 else "****"
        raise ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
    return project


def bearer_token(authorization: bytes) -> str:
    scheme, _, raw = authorization.partition(b" ")
    return raw.strip().decode("latin-1") if scheme.lower() == b"bearer" else ""


def project_of(request: Request) -> str:
    """FastAPI dependency: the project the front door (api/guards.py) found for this request."""
    return request.scope["state"]["project"]
