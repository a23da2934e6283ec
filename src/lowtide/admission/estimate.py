"""Token cost of a request before it is sent, without a tokenizer: ~4 characters a token."""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4.0
DEFAULT_COMPLETION = {"/v1/completions": 16, "/v1/embeddings": 0}


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(
            _chars(v)
            for k, v in value.items()
            if k in ("content", "text", "input", "prompt", "messages")
        )
    return 0


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """The prompt's tokens, about: ~4 characters a token, plus a few for the message framing."""
    source = (
        body.get("messages")
        if endpoint == "/v1/chat/completions"
        else body.get("input", body.get("prompt"))
    )
    return int(_chars(source) / CHARS_PER_TOKEN) + 4


def estimate_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """Prompt estimate plus the completion budget (max_tokens, or a default), times n.

    The estimate is corrected with the response's real `usage`, so a rough number here only
    costs a little precision for one request, never a drift in the budget.
    """
    prompt = estimate_prompt_tokens(endpoint, body)
    completion = body.get(
        "max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens"))
    )
    if not isinstance(completion, int):
        completion = DEFAULT_COMPLETION.get(endpoint, 256)
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    return prompt + completion * max(1, n)
