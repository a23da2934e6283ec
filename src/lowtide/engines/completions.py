"""The chat.completion and text_completion bodies the local engines answer with."""

from __future__ import annotations

import time
from typing import Any

from lowtide.ids import new_request_id


def completion_body(
    chat: bool,
    model: str,
    choices: list[dict[str, Any]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + new_request_id()[4:],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
