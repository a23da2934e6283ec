"""Anthropic's Messages API, translated to and from OpenAI's Chat Completions.

Engines that speak Chat Completions (the embedded model, any OpenAI-compatible upstream) serve a
Messages request through these two functions; what has no faithful translation (images, tools,
documents, thinking) is refused with a message that says what, never dropped silently.
"""

from __future__ import annotations

import random
from typing import Any

from lowtide.engines.base import Engine, EngineResponse, error_response
from lowtide.vocabulary import MESSAGES_ENDPOINT

CHAT_ENDPOINT = "/v1/chat/completions"

# Messages params the translation carries over; anything else is refused by name.
_CARRIED = {
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}


class Untranslatable(ValueError):
    """The request uses something Chat Completions cannot express: fail the line, clearly."""


def to_chat(params: dict[str, Any]) -> dict[str, Any]:
    """A Messages create body as a Chat Completions body."""
    unknown = sorted(set(params) - _CARRIED - {"stream"})
    if unknown:
        raise Untranslatable(
            f"Parameter '{unknown[0]}' cannot be served by this model's engine "
            '(it speaks OpenAI\'s Chat Completions); route the model with api = "anthropic" '
            "to pass Messages requests through."
        )
    if params.get("stream"):
        raise Untranslatable("stream: streaming is not supported in a message batch.")
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise Untranslatable("max_tokens: Field required (a positive integer).")
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Untranslatable("messages: Field required (a non-empty list).")
    chat: list[dict[str, Any]] = []
    system = params.get("system")
    if system is not None:
        chat.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise Untranslatable(f"messages.{i}.role: must be 'user' or 'assistant'.")
        chat.append(
            {"role": message["role"], "content": _text(message.get("content"), f"messages.{i}")}
        )
    body: dict[str, Any] = {
        "model": params.get("model"),
        "messages": chat,
        "max_tokens": max_tokens,
    }
    for name in ("temperature", "top_p", "top_k"):
        if params.get(name) is not None:
            body[name] = params[name]
    stops = params.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise Untranslatable("stop_sequences: must be a list of strings.")
        body["stop"] = stops
    return body


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined; any other block type has no translation."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content: must be a string or a list of content blocks.")
    parts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text" or not isinstance(block.get("text"), str):
            raise Untranslatable(
                f"{where}.content.{j}: only text blocks can be served by this model's engine "
                f"(got {kind!r})."
            )
        parts.append(block["text"])
    return "".join(parts)


def from_chat(body: dict[str, Any], model: str, stops: list[str] | None = None) -> dict[str, Any]:
    """A Chat Completions answer as a Messages answer (the first choice)."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") or ""
    finish = choice.get("finish_reason")
    stop_reason = _STOP_REASONS.get(finish, "end_turn")
    stop_sequence = None
    matched = choice.get("stop_reason")  # vLLM and llama.cpp servers say which stop string hit
    if finish == "stop" and isinstance(matched, str) and matched in (stops or []):
        stop_reason, stop_sequence = "stop_sequence", matched
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    return {
        "id": "msg_" + "".join(random.choices("0123456789abcdefghijklmnopqrstuvwxyz", k=24)),
        "type": "message",
        "role": "assistant",
        "model": body.get("model") or model,
        "content": [{"type": "text", "text": text}] if text else [],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {
            "input_tokens": max(0, int(usage.get("prompt_tokens") or 0) - int(cached)),
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": int(cached),
        },
    }


class MessagesOverChat(Engine):
    """An engine that speaks Chat Completions, serving Messages lines too: each is translated
    to a chat request and its answer back; a request with no translation fails alone (400)."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_concurrency = inner.max_concurrency

    async def start(self) -> None:
        await self.inner.start()

    def for_endpoint(self, endpoint: str) -> Engine:
        """Only Messages lines need the translation: the others go to the inner engine."""
        return self if endpoint == MESSAGES_ENDPOINT else self.inner.for_endpoint(endpoint)

    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if endpoint != MESSAGES_ENDPOINT:
            return await self.inner.execute(endpoint, body)
        try:
            chat = to_chat(body)
        except Untranslatable as exc:
            return error_response(400, str(exc), type="invalid_request_error")
        response = await self.inner.execute(CHAT_ENDPOINT, chat)
        if not 200 <= response.status_code < 300 or not isinstance(response.body, dict):
            return response
        response.body = from_chat(response.body, str(body.get("model")), chat.get("stop"))
        response.body_json = None  # the upstream's bytes are the chat answer's
        return response

    def count_input_tokens(self, endpoint: str, bodies: list[dict[str, Any]]) -> list[int] | None:
        if endpoint != MESSAGES_ENDPOINT:
            return self.inner.count_input_tokens(endpoint, bodies)
        try:
            chats = [to_chat(body) for body in bodies]
        except Untranslatable:
            return None
        return self.inner.count_input_tokens(CHAT_ENDPOINT, chats)

    def default_max_output_tokens(self, endpoint: str) -> int | None:
        inner = CHAT_ENDPOINT if endpoint == MESSAGES_ENDPOINT else endpoint
        return self.inner.default_max_output_tokens(inner)

    async def close(self) -> None:
        await self.inner.close()
