"""Chat and text completions on a local GGUF model: the OpenAI request and response shapes.

Requests are parsed and tokenized here and decoded together by `BatchedDecoder`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

from lowtide.config import ModelRoute
from lowtide.engines.base import Engine, EngineResponse, error_response
from lowtide.engines.completions import completion_body
from lowtide.engines.llamacpp.decoder import BatchedDecoder, Finished, Sequence, TokenLogprob
from lowtide.engines.llamacpp.options import OptionError, read_options
from lowtide.engines.llamacpp.tokens import PromptTokens, load_vocab
from lowtide.engines.llamacpp.weights import prepare_weights
from lowtide.engines.model_files import smollm2_gguf
from lowtide.engines.params import unhonoured, unsupported_message
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
        # Parsed grammars by GBNF text: each sequence gets a clone of its own.
        self._grammars: OrderedDict[str, Any] = OrderedDict()

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
            prefix_cache=route.prefix_cache,
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
        name = unhonoured("llamacpp", endpoint, body)
        if name is not None:
            message = unsupported_message(self.name, "llamacpp", endpoint, name)
            return error_response(400, message, param=name, code="unsupported_parameter")
        try:
            prompt_text = tokens.text(body, chat)
            options = read_options(body, chat, decoder.context_per_slot)
        except OptionError as exc:
            return error_response(400, exc.message, param=exc.param)
        except ValueError as exc:
            message, param = exc.args if len(exc.args) == 2 else (str(exc), None)
            return error_response(400, message, param=param)
        params = options.sampling
        if any(token >= decoder.n_vocab for token in params.logit_bias):
            return error_response(
                400,
                f"'logit_bias' names a token id beyond this model's vocabulary ({decoder.n_vocab} tokens).",
                param="logit_bias",
            )
        template = None
        if options.grammar is not None:
            template = self._grammar(decoder, options.grammar)
            if template is None:
                return error_response(
                    400,
                    "llama.cpp could not build a grammar for this response_format.",
                    param="response_format",
                )
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
        for i in range(options.n):
            seed = None if params.seed is None else params.seed + i
            future: asyncio.Future[Finished] = loop.create_future()
            grammar = None
            if template is not None:
                grammar = decoder.llama.llama_sampler_clone(template)
                if not grammar:
                    raise RuntimeError("llama.cpp could not copy a grammar")
            decoder.submit(Sequence(prompt, replace(params, seed=seed), future, loop, grammar))
            futures.append(future)
        try:
            results = await asyncio.gather(*futures)
        finally:
            for future in futures:
                future.cancel()  # no-op when done; frees the slot when we were cancelled
        return EngineResponse(
            200, self._response(body, chat, len(prompt), results), new_request_id()
        )

    def _grammar(self, decoder: BatchedDecoder, gbnf: str) -> Any:
        """The parsed grammar for this GBNF text (None: llama.cpp refused it), kept for reuse."""
        template = self._grammars.get(gbnf)
        if template is not None:
            self._grammars.move_to_end(gbnf)
            return template
        llama = decoder.llama
        template = llama.llama_sampler_init_grammar(decoder.model.vocab, gbnf.encode(), b"root")
        if not template:
            return None
        self._grammars[gbnf] = template
        while len(self._grammars) > 64:  # clones are copies: freeing a template is safe
            llama.llama_sampler_free(self._grammars.popitem(last=False)[1])
        return template

    def _response(
        self,
        body: dict[str, Any],
        chat: bool,
        prompt_tokens: int,
        results: list[Finished],
    ) -> dict[str, Any]:
        model = body.get("model", self.name)
        completion_tokens = sum(r.completion_tokens for r in results)
        if not chat:
            prompt = body.get("prompt")
            prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
            offset = len(prompt) if isinstance(prompt, str) else 0
            choices = [
                {
                    "index": i,
                    "text": r.text,
                    "logprobs": _legacy_logprobs(r.logprobs, offset),
                    "finish_reason": r.finish_reason,
                }
                for i, r in enumerate(results)
            ]
            out = completion_body(False, model, choices, prompt_tokens, completion_tokens)
            out["usage"]["prompt_tokens_details"] = {"cached_tokens": results[0].cached_tokens}
            return out
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": _chat_logprobs(r.logprobs),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        out = completion_body(True, model, choices, prompt_tokens, completion_tokens)
        out["usage"]["prompt_tokens_details"] = {"cached_tokens": results[0].cached_tokens}
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
            for template in self._grammars.values():
                self._decoder.llama.llama_sampler_free(template)
            self._grammars.clear()
            self._decoder = None
        self._tokens = self._counting = None


def _token_text(piece: bytes) -> str:
    # A token may hold part of a UTF-8 character: shown as \\xNN, its bytes are in `bytes`.
    return piece.decode("utf-8", errors="backslashreplace")


def _chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's chat shape: choices[i].logprobs.content[], one entry per generated token."""
    if entries is None:
        return None
    content = [
        {
            "token": _token_text(e.piece),
            "logprob": e.logprob,
            "bytes": list(e.piece),
            "top_logprobs": [
                {"token": _token_text(piece), "logprob": lp, "bytes": list(piece)}
                for piece, lp in e.top
            ],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def _legacy_logprobs(entries: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    """The completions (legacy) shape: parallel lists, offsets counted from the prompt's start."""
    if entries is None:
        return None
    tokens, offsets, text = [], [], b""
    for e in entries:
        tokens.append(_token_text(e.piece))
        offsets.append(offset + len(text.decode("utf-8", errors="ignore")))
        text += e.piece
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(p): lp for p, lp in e.top} for e in entries],
        "text_offset": offsets,
    }
