"""An in-process engine that answers at once: for trying Lowtide out and measuring its overhead."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from typing import Any

from lowtide.engines.base import Engine, EngineResponse
from lowtide.ids import new_request_id


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return _text_of(value.get("text") or value.get("content") or "")
    return ""


class EchoEngine(Engine):
    """Echoes the prompt back in the endpoint's response shape, with word-count usage."""

    def __init__(self, name: str, max_concurrency: int = 1024, latency_ms: float = 0.0) -> None:
        self.name = name
        self.max_concurrency = max_concurrency
        self._latency = latency_ms / 1000.0

    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if self._latency:
            await asyncio.sleep(self._latency)
        model = body.get("model", self.name)
        created = int(time.time())
        if endpoint == "/v1/chat/completions":
            prompt = _text_of((body.get("messages") or [{}])[-1])
            answer = "echo: " + prompt
            p, c = _words(_text_of(body.get("messages"))), _words(answer)
            out: dict[str, Any] = {
                "id": "chatcmpl-" + new_request_id()[4:],
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            }
        elif endpoint == "/v1/completions":
            prompt = _text_of(body.get("prompt"))
            p, c = _words(prompt), _words(prompt)
            out = {
                "id": "cmpl-" + new_request_id()[4:],
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": prompt, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            }
        elif endpoint == "/v1/embeddings":
            inputs = body.get("input")
            items = inputs if isinstance(inputs, list) else [inputs]
            data = [
                {"object": "embedding", "index": i, "embedding": _vector(_text_of(item))}
                for i, item in enumerate(items)
            ]
            p = sum(_words(_text_of(item)) for item in items)
            out = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": p, "total_tokens": p},
            }
        elif endpoint == "/v1/responses":
            prompt = _text_of(body.get("input"))
            answer = "echo: " + prompt
            p, c = _words(prompt), _words(answer)
            out = {
                "id": "resp_" + new_request_id()[4:],
                "object": "response",
                "created_at": created,
                "model": model,
                "status": "completed",
                "output": [
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": answer, "annotations": []}],
                    }
                ],
                "usage": {"input_tokens": p, "output_tokens": c, "total_tokens": p + c},
            }
        else:
            return EngineResponse(
                404,
                {
                    "error": {
                        "message": f"Unsupported endpoint {endpoint}",
                        "type": "invalid_request_error",
                    }
                },
            )
        return EngineResponse(200, out, new_request_id())


def _vector(text: str, dim: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = struct.unpack(f"<{dim}h", digest[: 2 * dim])
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]
