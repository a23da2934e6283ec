"""Chat and text completions on a local GGUF model: the OpenAI request and response shapes.

Requests are parsed and tokenized here and decoded together by `BatchedDecoder`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from lowtide.config import ModelRoute
from lowtide.engines.base import Engine, EngineResponse, error_response
from lowtide.engines.completions import completion_body
from lowtide.engines.llamacpp.decoder import BatchedDecoder, SamplingParams, Sequence
from lowtide.engines.llamacpp.weights import prepare_weights
from lowtide.engines.model_files import smollm2_gguf
from lowtide.ids import new_request_id

log = logging.getLogger("lowtide.llamacpp")


class LlamaCppEngine(Engine):
    def __init__(self, route: ModelRoute, cache_dir: Path) -> None:
        self.name = route.name
        self.max_concurrency = route.max_concurrency
        self._route = route
        self._cache_dir = cache_dir
        self._decoder: BatchedDecoder | None = None
        self._formatter: Any = None
        self._add_bos = False
        self._load_error: str | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._decoder is not None or self._load_error is not None:
                return
            try:
                self._decoder = await asyncio.to_thread(self._load)
            except Exception as exc:  # a broken model fails its lines, not the server
                self._load_error = f"The model '{self.name}' could not be loaded: {exc}"
                log.error(self._load_error)

    def _load(self) -> BatchedDecoder:
        route = self._route
        source = Path(route.model_path) if route.model_path else smollm2_gguf()
        path = prepare_weights(source, self._cache_dir, route.weights)
        started = time.monotonic()
        decoder = BatchedDecoder(
            path,
            slots=route.parallel,
            context_per_slot=route.context_size,
            threads=route.threads or os.cpu_count() or 1,
        )
        self._formatter = _chat_formatter(decoder)
        self._add_bos = decoder.model.add_bos_token()
        log.info(
            "loaded %s (%s, %d slots) in %.2fs",
            self.name,
            path.name,
            route.parallel,
            time.monotonic() - started,
        )
        return decoder

    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if endpoint not in ("/v1/chat/completions", "/v1/completions"):
            return error_response(
                400,
                f"Model '{self.name}' serves /v1/chat/completions and /v1/completions, not {endpoint}.",
                param="url",
            )
        await self.start()
        if self._load_error:
            raise RuntimeError(self._load_error)
        decoder = self._decoder
        assert decoder is not None
        chat = endpoint == "/v1/chat/completions"
        try:
            prompt_text = self._prompt(body, chat)
            params = _sampling_params(body, chat, decoder.context_per_slot)
            n = body.get("n") or 1
            if not isinstance(n, int) or not 1 <= n <= 16:
                raise ValueError("'n' must be an integer from 1 to 16.", "n")
        except ValueError as exc:
            message, param = exc.args if len(exc.args) == 2 else (str(exc), None)
            return error_response(400, message, param=param)
        prompt = decoder.tokenize(prompt_text, add_bos=self._add_bos and not chat)
        limit = decoder.context_per_slot
        if len(prompt) >= limit:
            return error_response(
                400,
                f"This model's context is {limit} tokens per request, but the prompt has {len(prompt)} tokens.",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        futures = []
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            seq_params = SamplingParams(
                params.max_tokens, params.temperature, params.top_p, seed, params.stop
            )
            future: asyncio.Future[tuple[str, str, int]] = loop.create_future()
            decoder.submit(Sequence(prompt, seq_params, future, loop))
            futures.append(future)
        try:
            results = await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()  # no-op when done; frees the slot when we were cancelled
        return EngineResponse(
            200, self._response(body, chat, len(prompt), results), new_request_id()
        )

    def _prompt(self, body: dict[str, Any], chat: bool) -> str:
        if not chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ValueError("'prompt' must be a string.", "prompt")
            return prompt
        if body.get("tools") or body.get("functions"):
            raise ValueError(f"Model '{self.name}' does not support tools.", "tools")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty array.", "messages")
        cleaned = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(
                    f"messages[{i}] must be an object with a 'role'.", f"messages[{i}]"
                )
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(
                    p.get("text", "")
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "text"
                )
            if not isinstance(content, str):
                raise ValueError(
                    f"messages[{i}].content must be a string or text parts.",
                    f"messages[{i}].content",
                )
            role = "system" if message["role"] == "developer" else message["role"]
            cleaned.append({"role": role, "content": content})
        return self._formatter(messages=cleaned).prompt

    def _response(
        self,
        body: dict[str, Any],
        chat: bool,
        prompt_tokens: int,
        results: list[tuple[str, str, int]],
    ) -> dict[str, Any]:
        model = body.get("model", self.name)
        completion_tokens = sum(r[2] for r in results)
        if not chat:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                for i, (text, reason, _) in enumerate(results)
            ]
            return completion_body(False, model, choices, prompt_tokens, completion_tokens)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason, _) in enumerate(results)
        ]
        out = completion_body(True, model, choices, prompt_tokens, completion_tokens)
        out["system_fingerprint"] = None
        return out

    async def close(self) -> None:
        if self._decoder is not None:
            await asyncio.to_thread(self._decoder.close)
            self._decoder = None


def _sampling_params(body: dict[str, Any], chat: bool, context: int) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = context if chat else 16
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("'max_tokens' must be a positive integer.", "max_tokens")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ValueError("'temperature' must be a number from 0 to 2.", "temperature")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError("'top_p' must be a number in (0, 1].", "top_p")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise ValueError("'seed' must be an integer.", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise ValueError("'stop' must be a string or up to 4 non-empty strings.", "stop")
    return SamplingParams(max_tokens, float(temperature), float(top_p), seed, stop)


def _chat_formatter(decoder: BatchedDecoder) -> Any:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    metadata = decoder.model.metadata()
    template = metadata.get("tokenizer.chat_template")
    if not template:  # a GGUF without a template: ChatML is the common default
        template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    model = decoder.model

    def piece(token: int) -> str:
        # _internals.token_to_piece returns its whole 32-byte buffer: drop the NUL padding.
        raw = model.token_to_piece(token, special=True).rstrip(b"\0") if token >= 0 else b""
        return raw.decode("utf-8", errors="ignore")

    return Jinja2ChatFormatter(
        template=template, eos_token=piece(model.token_eos()), bos_token=piece(model.token_bos())
    )
