"""Chat and text completions on a local GGUF model, decoding many requests together.

One llama.cpp context holds `parallel` sequences, each with its own KV cells. A decoder thread
runs the continuous-batching loop: every step it puts the next token of every running sequence,
plus prompt tokens of newly admitted ones, into one `llama_decode` call, samples each sequence's
next token, and retires finished sequences so waiting requests can take their slots at once.
The event loop only tokenizes, queues and awaits; the C call releases the GIL.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowtide.config import ModelRoute
from lowtide.engines.base import Engine, EngineResponse
from lowtide.engines.model_files import smollm2_gguf
from lowtide.ids import new_request_id

log = logging.getLogger("lowtide.llamacpp")

_MAX_BATCH_TOKENS = 2048


def _bad_request(message: str, param: str | None = None, code: str | None = None) -> EngineResponse:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return EngineResponse(400, body, new_request_id())


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    future: asyncio.Future[tuple[str, str, int]]
    loop: asyncio.AbstractEventLoop
    rng: np.random.Generator | None = None
    slot: int = -1
    n_past: int = 0
    pending: list[int] = field(default_factory=list)
    generated: int = 0
    last: int = -1
    text: bytearray = field(default_factory=bytearray)

    def finish(self, reason: str) -> None:
        text = self.text.decode("utf-8", errors="replace")
        for stop in self.params.stop:
            at = text.find(stop)
            if at >= 0:
                text, reason = text[:at], "stop"
        result = (text, reason, self.generated)
        self.loop.call_soon_threadsafe(_resolve, self.future, result)

    def fail(self, exc: Exception) -> None:
        self.loop.call_soon_threadsafe(_reject, self.future, exc)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


class BatchedDecoder:
    """The continuous-batching loop over one llama.cpp context, on its own thread."""

    def __init__(
        self, model_path: Path, *, slots: int, context_per_slot: int, threads: int
    ) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        _quiet_llama()
        self._llama = llama_cpp
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = LlamaModel(path_model=str(model_path), params=model_params, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * context_per_slot
        params.n_batch = _MAX_BATCH_TOKENS
        params.n_ubatch = 512
        params.n_seq_max = slots
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {model_path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(_MAX_BATCH_TOKENS, 0, 1)
        self.slots = slots
        self.context_per_slot = context_per_slot
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self._pieces: dict[int, bytes] = {}
        self._queue: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llamacpp-decoder", daemon=True)
        self._thread.start()

    # -- tokens --------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (cached: the same few thousand tokens recur)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self._llama.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._llama.llama_token_to_piece(
                    self.model.vocab, token, buf, len(buf), 0, False
                )
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def is_end(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self.model.vocab, token))

    # -- the loop ------------------------------------------------------------------------
    def submit(self, seq: _Sequence) -> None:
        self._queue.put(seq)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._llama.llama_batch_free(self.batch)
        self._llama.llama_free(self.ctx)

    def _run(self) -> None:
        free = list(range(self.slots))  # a heap: the lowest free slot is taken first
        active: dict[int, _Sequence] = {}
        while True:
            if not self._admit(free, active):
                return
            for seq in [s for s in active.values() if s.future.done()]:
                self._release(seq, free, active)  # its caller gave up: free the slot now
            if not active:
                continue
            try:
                rows = self._step(active)
            except Exception as exc:  # fail the sequences in this step, keep serving others
                log.exception("llama_decode failed")
                for seq in list(active.values()):
                    seq.fail(exc)
                    self._release(seq, free, active)
                continue
            for seq, index in rows:
                self._advance(seq, index, free, active)

    def _admit(self, free: list[int], active: dict[int, _Sequence]) -> bool:
        """Move waiting requests into free slots; block only when nothing is running."""
        block = not active
        while free:
            try:
                seq = self._queue.get(block=block)
            except queue.Empty:
                return True
            block = False
            if seq is None:
                return False
            if seq.future.done():  # the caller gave up (cancel, shutdown)
                continue
            seq.slot = heapq.heappop(free)
            self._llama.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            seq.pending = list(seq.prompt)
            active[seq.slot] = seq
        return True

    def _step(self, active: dict[int, _Sequence]) -> list[tuple[_Sequence, int]]:
        batch = self.batch
        n = 0
        rows: list[tuple[_Sequence, int]] = []
        # Rows in slot order, slots lowest-first: the same requests always decode the same way.
        ordered = [active[slot] for slot in sorted(active)]
        for seq in ordered:  # one token for every sequence that is generating
            if not seq.pending:
                self._put(n, seq.last, seq.n_past, seq.slot, True)
                seq.n_past += 1
                rows.append((seq, n))
                n += 1
        budget = _MAX_BATCH_TOKENS - n
        for seq in ordered:  # prompt tokens, in chunks, for sequences still prefilling
            if not seq.pending or budget <= 0:
                continue
            chunk, seq.pending = seq.pending[:budget], seq.pending[budget:]
            for j, token in enumerate(chunk):
                last = not seq.pending and j == len(chunk) - 1
                self._put(n, token, seq.n_past, seq.slot, last)
                seq.n_past += 1
                if last:
                    rows.append((seq, n))
                n += 1
            budget -= len(chunk)
        batch.n_tokens = n
        rc = self._llama.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return rows

    def _put(self, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits

    def _advance(
        self, seq: _Sequence, index: int, free: list[int], active: dict[int, _Sequence]
    ) -> None:
        if seq.future.done():
            self._release(seq, free, active)
            return
        logits = np.ctypeslib.as_array(
            self._llama.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,)
        )
        token = _sample(logits, seq)
        if self.is_end(token):
            seq.finish("stop")
            self._release(seq, free, active)
            return
        seq.generated += 1
        seq.last = token
        seq.text += self.piece(token)
        if seq.params.stop and _hit_stop(seq):
            seq.finish("stop")
        elif seq.generated >= seq.params.max_tokens or seq.n_past >= self.context_per_slot:
            seq.finish("length")
        else:
            return
        self._release(seq, free, active)

    def _release(self, seq: _Sequence, free: list[int], active: dict[int, _Sequence]) -> None:
        if active.pop(seq.slot, None) is not None:
            heapq.heappush(free, seq.slot)


def _hit_stop(seq: _Sequence) -> bool:
    tail = seq.text[-(max(len(s.encode()) for s in seq.params.stop) + 8) :].decode(
        "utf-8", errors="ignore"
    )
    return any(stop in tail for stop in seq.params.stop)


def _sample(logits: np.ndarray, seq: _Sequence) -> int:
    params = seq.params
    if params.temperature <= 0:
        return int(np.argmax(logits))
    if seq.rng is None:
        seq.rng = np.random.default_rng(params.seed)
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_p < 1.0:
        order = np.argsort(-scaled)
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[seq.rng.choice(keep, p=probs)])
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(seq.rng.choice(len(probs), p=probs))


def _quiet_llama() -> None:
    """llama.cpp logs every tensor of a load or conversion; keep its errors only."""
    from llama_cpp._logger import set_verbose

    set_verbose(False)


def prepare_weights(source: Path, cache_dir: Path, weights: str) -> Path:
    """Convert the GGUF once (F16 decodes fastest in batches on AVX2 CPUs) and cache it."""
    if weights == "as-is":
        return source
    import llama_cpp

    target = cache_dir / f"{source.stem.split('.')[0]}.{weights.upper()}.gguf"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    _quiet_llama()
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = (
        llama_cpp.LLAMA_FTYPE_MOSTLY_F16 if weights == "f16" else llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    )
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    started = time.monotonic()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"converting {source} to {weights} failed (code {rc})")
    os.replace(tmp, target)
    log.info(
        "converted %s to %s in %.1fs -> %s",
        source.name,
        weights,
        time.monotonic() - started,
        target,
    )
    return target


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
            return _bad_request(
                f"Model '{self.name}' serves /v1/chat/completions and /v1/completions, not {endpoint}.",
                "url",
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
            return _bad_request(message, param)
        prompt = decoder.tokenize(prompt_text, add_bos=self._add_bos and not chat)
        limit = decoder.context_per_slot
        if len(prompt) >= limit:
            return _bad_request(
                f"This model's context is {limit} tokens per request, but the prompt has {len(prompt)} tokens.",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        futures = []
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            seq_params = SamplingParams(
                params.max_tokens, params.temperature, params.top_p, seed, params.stop
            )
            future: asyncio.Future[tuple[str, str, int]] = loop.create_future()
            decoder.submit(_Sequence(prompt, seq_params, future, loop))
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
        completion_tokens = sum(r[2] for r in results)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        rid = new_request_id()[4:]
        model = body.get("model", self.name)
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                for i, (text, reason, _) in enumerate(results)
            ]
            return {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                "usage": usage,
                "system_fingerprint": None,
            }
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason, _) in enumerate(results)
        ]
        return {
            "id": f"cmpl-{rid}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
        }

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
