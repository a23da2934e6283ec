"""An in-process engine that answers at once: for trying Lowtide out and measuring its overhead."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from typing import Any

from lowtide.engines.base import Engine, EngineResponse, error_response
from lowtide.engines.completions import completion_body
from lowtide.engines.params import unhonoured, unsupported_message
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
        refused = unhonoured("echo", endpoint, body)
        if refused is not None:
            message = unsupported_message(self.name, "echo", endpoint, refused)
            return error_response(400, message, param=refused, code="unsupported_parameter")
        if self._latency:
            await asyncio.sleep(self._latency)
        model = body.get("model", self.name)
        if endpoint == "/v1/chat/completions":
            prompt = _text_of((body.get("messages") or [{}])[-1])
            answer = "echo: " + prompt
            message = {"role": "assistant", "content": answer}
            choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
            p, c = _words(_text_of(body.get("messages"))), _words(answer)
            out = completion_body(True, model, choices, p, c)
        elif endpoint == "/v1/completions":
            prompt = _text_of(body.get("prompt"))
            choices = [{"index": 0, "text": prompt, "finish_reason": "stop"}]
            out = completion_body(False, model, choices, _words(prompt), _words(prompt))
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
                "created_at": int(time.time()),
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
            return error_response(404, f"Unsupported endpoint {endpoint}")
        return EngineResponse(200, out, new_request_id())


def _vector(text: str, dim: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = struct.unpack(f"<{dim}h", digest[: 2 * dim])
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]
