"""Anthropic's side of ``POST /v1/messages``: auth, the version header, params, error envelope.

The request is answered by the same path as OpenAI's endpoints (server.py: limits, latency,
faults, the decode engine); this module holds what differs on Anthropic's wire:

- auth: ``x-api-key: KEY`` (or ``Authorization: Bearer KEY``) when ``--require-key`` is set,
  else 401 ``authentication_error``; rate limits are kept per that key;
- ``anthropic-version`` is required (400 ``invalid_request_error`` without it);
  ``anthropic-beta`` and ``?beta=true`` are accepted and ignored;
- the create params are checked (model, max_tokens, messages with string or block content,
  system, stop_sequences, temperature, top_p, top_k, metadata); unknown fields other than the
  simulator's own ``sim_*`` are refused as Anthropic does ("Extra inputs are not permitted");
- errors use ``{"type": "error", "error": {"type", "message"}, "request_id"}``; a random 503
  fault becomes Anthropic's 529 ``overloaded_error``; 429s carry ``retry-after`` (seconds).
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from lowtide_sim.config import SimConfig
from lowtide_sim.errors import json_response

__all__ = [
    "api_key",
    "error_response",
    "error_type",
    "fault_status",
    "missing_version",
    "rate_limited",
    "unauthorized",
    "validate",
]

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

# Create params the simulator understands (the first nine) or accepts and ignores.
_PARAMS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        # accepted and ignored: newer create params of the official SDK
        "cache_control",
        "container",
        "context_management",
        "diagnostics",
        "inference_geo",
        "mcp_servers",
        "output_config",
        "speed",
    }
)
_BLOCKS = frozenset(
    {
        "text",
        "image",
        "document",
        "tool_use",
        "tool_result",
        "thinking",
        "redacted_thinking",
    }
)


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_response(
    status: int, message: str, rid: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": error_type(status), "message": message},
        "request_id": f"req_{rid}",
    }
    return json_response(body, status, headers)


def fault_status(status: int) -> int:
    """A random 5xx fault as Anthropic would send it: an overloaded 503 is its 529."""
    return 529 if status == 503 else status


def rate_limited(kind: str, model: str, wait: float, cfg: SimConfig, rid: str) -> web.Response:
    """The limiter's refusal (kind "requests" or "tokens") as Anthropic's 429."""
    if kind == "requests":
        what = f"your rate limit of {cfg.rpm} requests per minute"
    else:
        what = f"your rate limit of {cfg.tpm} tokens per minute (input plus max_tokens)"
    message = (
        f"This request would exceed {what} for {model}. Please try again in "
        f"{max(0.0, wait):.1f} s (simulated)."
    )
    retry = {"retry-after": str(max(1, math.ceil(wait - 1e-9)))}
    return error_response(429, message, rid, retry)


def api_key(request: web.Request) -> str:
    """The key rate limits are kept under: ``x-api-key``, else the bearer token, else ""."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def unauthorized(request: web.Request, cfg: SimConfig) -> bool:
    key = cfg.require_key
    if not key:
        return False
    return (
        request.headers.get("x-api-key") != key
        and request.headers.get("Authorization") != f"Bearer {key}"
    )


def missing_version(request: web.Request) -> bool:
    return not request.headers.get("anthropic-version", "").strip()


# ---------------------------------------------------------------- params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_blocks(blocks: list[Any], where: str, text_only: bool) -> str | None:
    for i, block in enumerate(blocks):
        at = f"{where}.{i}"
        if not isinstance(block, dict):
            return f"{at}: Input should be a valid dictionary"
        kind = block.get("type")
        if text_only and kind != "text":
            return f"{at}.type: Input should be 'text'"
        if kind not in _BLOCKS:
            return f"{at}.type: Input tag {kind!r} does not match any of the expected tags"
        if kind == "text" and not isinstance(block.get("text"), str):
            return f"{at}.text: Field required"
    return None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return (
            "messages: Field required"
            if messages is None
            else "messages: Input should be a valid list"
        )
    if not messages:
        return "messages: at least one message is required"
    for i, message in enumerate(messages):
        at = f"messages.{i}"
        if not isinstance(message, dict):
            return f"{at}: Input should be a valid dictionary"
        if message.get("role") not in ("user", "assistant"):
            return f"{at}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if isinstance(content, list):
            problem = _check_blocks(content, f"{at}.content", text_only=False)
            if problem:
                return problem
        elif not isinstance(content, str):
            return f"{at}.content: Field required"
    return None


def validate(body: dict[str, Any]) -> str | None:
    """The first problem with these create params, in Anthropic's words; None when valid."""
    extra = sorted(k for k in body if k not in _PARAMS and not k.startswith("sim_"))
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return "max_tokens: Field required"
    if not _is_int(max_tokens) or max_tokens < 1:
        return "max_tokens: Input should be an integer greater than or equal to 1"
    problem = _check_messages(body.get("messages"))
    if problem:
        return problem
    system = body.get("system")
    if isinstance(system, list):
        problem = _check_blocks(system, "system", text_only=True)
        if problem:
            return problem
    elif system is not None and not isinstance(system, str):
        return "system: Input should be a valid string or a list of text blocks"
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        return "stop_sequences: Input should be a valid list of strings"
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or not 0 <= value <= 1):
            return f"{name}: Input should be a number between 0 and 1"
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        return "top_k: Input should be an integer greater than or equal to 0"
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            return "metadata: Input should be a valid dictionary"
        extra = sorted(k for k in metadata if k != "user_id")
        if extra:
            return f"metadata.{extra[0]}: Extra inputs are not permitted"
        user_id = metadata.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            return "metadata.user_id: Input should be a valid string"
    return None
