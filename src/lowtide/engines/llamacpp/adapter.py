"""Chat and text completions on a local GGUF model: the OpenAI request and response shapes.

Requests are parsed and tokenized here and decoded together by `BatchedDecoder`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from lowtide.config import ModelRoute
from lowtide.engines.base import Engine, EngineResponse, error_response
from lowtide.engines.completions import completion_body
from lowtide.engines.llamacpp.decoder import BatchedDecoder, SamplingParams, Sequence
from lowtide.engines.llamacpp.tokens import PromptTokens, load_vocab
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
        self._tokens: PromptTokens | None = None
        self._counting: PromptTokens | None = None  # vocab-only, for estimates
        self._counting_lock = threading.Lock()
        self._counting_failed = False
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

    def _source(self) -> Path:
        return Path(self._route.model_path) if self._route.model_path else smollm2_gguf()

    def _load(self) -> BatchedDecoder:
        route = self._route
        path = prepare_weights(self._source(), self._cache_dir, route.weights)
        started = time.monotonic()
        decoder = BatchedDecoder(
            path,
            slots=route.parallel,
            context_per_slot=route.context_size,
            threads=route.threads or os.cpu_count() or 1,
        )
        self._tokens = PromptTokens(decoder.model, self.name)
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
        decoder, tokens = self._decoder, self._tokens
        assert decoder is not None and tokens is not None
        chat = endpoint == "/v1/chat/completions"
        try:
            prompt_text = tokens.text(body, chat)
            params = _sampling_params(body, chat, decoder.context_per_slot)
            n = body.get("n") or 1
            if not isinstance(n, int) or not 1 <= n <= 16:
                raise ValueError("'n' must be an integer from 1 to 16.", "n")
        except ValueError as exc:
            message, param = exc.args if len(exc.args) == 2 else (str(exc), None)
            return error_response(400, message, param=param)
        prompt = tokens.tokenize(prompt_text, chat)
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

    def count_input_tokens(self, endpoint: str, bodies: list[dict[str, Any]]) -> list[int] | None:
        """`usage.prompt_tokens` of each request: the loaded model's tokenizer, or else the
        GGUF's vocabulary alone (loaded once, no weights)."""
        if endpoint not in ("/v1/chat/completions", "/v1/completions"):
            return None
        tokens = self._tokens or self._vocab_only()
        if tokens is None:
            return None
        chat = endpoint == "/v1/chat/completions"
        return [tokens.count(body, chat) for body in bodies]

    def default_max_output_tokens(self, endpoint: str) -> int | None:
        # As _sampling_params defaults it: the whole context for chat, 16 for completions.
        return self._route.context_size if endpoint == "/v1/chat/completions" else 16

    def _vocab_only(self) -> PromptTokens | None:
        with self._counting_lock:
            if self._counting is None and not self._counting_failed:
                try:
                    self._counting = PromptTokens(load_vocab(self._source()), self.name)
                except Exception as exc:  # no tokenizer: estimates approximate instead
                    self._counting_failed = True
                    log.warning(
                        "%s: cannot load the vocabulary to count tokens: %s", self.name, exc
                    )
            return self._counting

    async def close(self) -> None:
        if self._decoder is not None:
            await asyncio.to_thread(self._decoder.close)
            self._decoder = None
        self._tokens = self._counting = None


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
