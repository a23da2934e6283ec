"""Token cost of a request before it is sent, without a tokenizer: ~4 characters a token."""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4.0
DEFAULT_COMPLETION = {"/v1/completions": 16, "/v1/embeddings": 0}


_TEXT_KEYS = frozenset(("content", "text", "input", "prompt", "messages"))


def _chars(value: Any) -> int:
    """Characters of text in a prompt: strings, in lists, under a dict's text-bearing keys."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for item in value:  # on every line's path: no generator, strings counted in place
            if type(item) is str:
                total += len(item)
            elif (
                type(item) is dict
                and len(item) == 2
                and type(content := item.get("content")) is str
                and "role" in item
            ):
                total += len(content)  # the usual message, its role and its text
            else:
                total += _chars(item)
        return total
    if isinstance(value, dict):
        total = 0
        for key, item in value.items():  # a message has 2-3 keys: fewer steps than 5 lookups
            if key in _TEXT_KEYS and item is not None:
                total += len(item) if type(item) is str else _chars(item)
        return total
    return 0


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """The prompt's tokens, about: ~4 characters a token, plus a few for the message framing."""
    if endpoint == "/v1/chat/completions":
        source = body.get("messages")
    elif endpoint == "/v1/messages":  # Anthropic's: the system prompt is a field of its own
        source = [body.get("system"), body.get("messages")]
    else:
        source = body.get("input", body.get("prompt"))
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
