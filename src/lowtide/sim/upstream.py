"""A simulated OpenAI-compatible upstream (stand-in for vLLM or a hosted provider).

Tests and benchmarks need a real HTTP server that answers like OpenAI, is fast,
deterministic, and can inject the failures a batch engine must survive (429s,
5xx, hung requests, dropped connections). It also counts how often each exact
request body arrived, so callers can check "at most N attempts per line".

Run it with ``python -m lowtide.sim.upstream --port 0``; once listening it prints
exactly one line ``READY http://HOST:PORT/v1`` on stdout.

Beyond fault injection it can behave like a real provider or a real engine:

Rate limits (``--rpm N``, ``--tpm N``; 0 = unlimited)
    Enforced per API key (the bearer token; requests without one share the key
    ``""``) with two continuously refilling token buckets per key, each holding
    one minute's worth (capacity ``rpm`` / ``tpm``, refilled at ``limit/60`` per
    second, starting full). A request costs 1 request and ``prompt + max_out``
    tokens: ``prompt`` is the simulator's word-count estimate of the input,
    ``max_out`` is ``max_completion_tokens`` / ``max_tokens`` (``max_output_tokens``
    for /v1/responses, 0 for embeddings), 16 when absent. The estimate is charged
    at admission and never refunded (like OpenAI). A request that does not fit
    gets 429 with the OpenAI envelope (``type`` "requests" or "tokens", code
    ``rate_limit_exceeded``) plus ``retry-after`` (whole seconds, rounded up) and
    ``retry-after-ms``: the time until the bucket holds enough. A request costing
    more tokens than ``tpm`` can never fit; it gets 429 "Request too large".
    Every /v1 POST response carries ``x-ratelimit-{limit,remaining,reset}-
    {requests,tokens}`` for each configured limit (``remaining`` rounded down,
    ``reset`` = time until the bucket is full again, in OpenAI's duration format
    such as ``20ms``, ``1s``, ``1m30.5s``, ``6m0s``) unless
    ``--no-ratelimit-headers``. Changing rpm/tpm at runtime or POST /sim/reset
    refills every bucket.

Engine capacity (``--capacity-tokens-per-s T``, ``--max-running N``)
    The engine model is on when either is > 0. Chat, completions and responses
    then produce exactly ``max_out`` completion tokens (``finish_reason``
    "length") and take time to decode them: the requests running share the
    decode rate, each generating at ``min(--max-tokens-per-s-per-request, T / n)``
    tokens per second (T = 0: no shared ceiling; per-request rate 0: no per-request
    ceiling). The model is processor sharing, computed exactly from event times
    (no polling). With ``--max-running N`` at most N requests decode at once; the
    rest wait in a queue ordered by the body's ``priority`` (vLLM's field: lower
    is more urgent, default 0), then arrival. Decoding happens after the latency
    delay and fault injection. Embeddings never enter the engine.

Latency (``--latency-dist fixed|uniform|lognormal``)
    fixed: ``latency_ms`` (+ uniform 0..jitter, the original behaviour);
    uniform: uniform in 0..2*``latency_ms`` (mean ``latency_ms``) + jitter;
    lognormal: median ``latency_ms``, shape ``--latency-sigma`` (default 0.5) + jitter.

``GET /metrics`` serves vLLM-style Prometheus metrics: gauges
``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` and counters
``vllm:request_success_total`` (label ``finished_reason``),
``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``, all labelled
``model_name`` (the first of ``--models``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import heapq
import itertools
import math
import random
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web

__all__ = ["RUNTIME_FIELDS", "SimConfig", "build_app", "format_duration", "main", "serve"]

LATENCY_DISTS = ("fixed", "uniform", "lognormal")


@dataclass
class SimConfig:
    """Every option of the simulator; CLI flags map 1:1 onto these fields."""

    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    seed: int | None = None
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_drop: float = 0.0
    hang_seconds: float = 30.0
    retry_after: str = "0"
    require_key: str | None = None
    embedding_dim: int = 8
    models: list[str] = field(default_factory=lambda: ["sim-model"])
    rpm: int = 0
    tpm: int = 0
    no_ratelimit_headers: bool = False
    capacity_tokens_per_s: float = 0.0
    max_tokens_per_s_per_request: float = 50.0
    max_running: int = 0
    latency_dist: str = "fixed"
    latency_sigma: float = 0.5


# Options that POST /sim/config may change while the server runs.
RUNTIME_FIELDS = frozenset(
    {
        "latency_ms",
        "latency_jitter_ms",
        "seed",
        "rate_429",
        "rate_500",
        "rate_timeout",
        "rate_drop",
        "hang_seconds",
        "retry_after",
        "rpm",
        "tpm",
        "no_ratelimit_headers",
        "capacity_tokens_per_s",
        "max_tokens_per_s_per_request",
        "max_running",
        "latency_dist",
        "latency_sigma",
    }
)
_RATE_FIELDS = ("rate_429", "rate_500", "rate_timeout", "rate_drop")
_INT_FIELDS = ("rpm", "tpm", "max_running")
_ENGINE_FIELDS = ("capacity_tokens_per_s", "max_tokens_per_s_per_request", "max_running")

# Thresholds reported as "bodies_over" in /sim/stats.
_OVER_THRESHOLDS = (1, 2, 3)

# Completion budget when a request names none (OpenAI's legacy default).
DEFAULT_MAX_TOKENS = 16


class _Stats:
    """Counters for /sim/stats; bodies are kept as hash -> count to stay small."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.body_counts: dict[int, int] = {}
        self.max_per_body = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rate_limited = 0
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0

    def note_body(self, raw: bytes) -> int:
        """Record one received body and return how often it has been seen so far."""
        self.requests += 1
        key = hash(raw)
        seen = self.body_counts.get(key, 0) + 1
        self.body_counts[key] = seen
        if seen > self.max_per_body:
            self.max_per_body = seen
        return seen

    def snapshot(self) -> dict[str, Any]:
        counts = self.body_counts.values()
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "distinct_bodies": len(self.body_counts),
            "max_per_body": self.max_per_body,
            "bodies_over": {str(k): sum(1 for c in counts if c > k) for k in _OVER_THRESHOLDS},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "rate_limited": self.rate_limited,
            "prompt_tokens_total": self.prompt_tokens_total,
            "completion_tokens_total": self.completion_tokens_total,
        }


class _Metrics:
    """Prometheus counters; unlike _Stats they survive /sim/reset (counters only grow)."""

    def __init__(self) -> None:
        self.success: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0


# ---------------------------------------------------------------- rate limits


def format_duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format: ``20ms``, ``1s``, ``1m30.5s``, ``6m0s``, ``1h2m3s``.

    Rounded up to whole milliseconds, so a positive wait never reads as ``0s``.
    """
    ms = math.ceil(seconds * 1000 - 1e-6) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Limiter:
    """Per-key request and token buckets, each holding one minute's worth, refilling continuously."""

    def __init__(self) -> None:
        # key -> [request level, token level, last refill time]
        self.buckets: dict[str, list[float]] = {}

    def clear(self) -> None:
        self.buckets.clear()

    def _bucket(self, key: str, cfg: SimConfig, now: float) -> list[float]:
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = [float(cfg.rpm), float(cfg.tpm), now]
            return b
        dt = max(0.0, now - b[2])
        b[0] = min(float(cfg.rpm), b[0] + cfg.rpm / 60.0 * dt)
        b[1] = min(float(cfg.tpm), b[1] + cfg.tpm / 60.0 * dt)
        b[2] = now
        return b

    @staticmethod
    def _headers(b: list[float], cfg: SimConfig) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, limit, level in (("requests", cfg.rpm, b[0]), ("tokens", cfg.tpm, b[1])):
            if limit > 0:
                headers[f"x-ratelimit-limit-{name}"] = str(limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(level + 1e-9)))
                headers[f"x-ratelimit-reset-{name}"] = format_duration(
                    (limit - level) * 60.0 / limit
                )
        return headers

    def peek(self, key: str, cfg: SimConfig) -> dict[str, str]:
        """Current x-ratelimit-* headers for ``key`` without charging anything."""
        return self._headers(self._bucket(key, cfg, time.monotonic()), cfg)

    def admit(
        self, key: str, tokens: int, cfg: SimConfig, model: str
    ) -> tuple[dict[str, str], tuple[str, str, float] | None]:
        """Charge one request of ``tokens``; returns (headers, None) or (headers, refusal).

        A refusal is (type, message, seconds until it would fit).
        """
        b = self._bucket(key, cfg, time.monotonic())
        refusal: tuple[str, str, float] | None = None
        if cfg.rpm > 0 and b[0] < 1.0 - 1e-9:
            wait = (1.0 - b[0]) * 60.0 / cfg.rpm
            used = cfg.rpm - max(0, math.floor(b[0] + 1e-9))
            refusal = (
                "requests",
                f"Rate limit reached for {model} on requests per min (RPM): Limit {cfg.rpm}, "
                f"Used {used}, Requested 1. Please try again in {format_duration(wait)}.",
                wait,
            )
        elif cfg.tpm > 0 and tokens > cfg.tpm:
            refusal = (
                "tokens",
                f"Request too large for {model} on tokens per min (TPM): Limit {cfg.tpm}, "
                f"Requested {tokens}. The input or output tokens must be reduced in order "
                "to run successfully.",
                (cfg.tpm - b[1]) * 60.0 / cfg.tpm,
            )
        elif cfg.tpm > 0 and b[1] < tokens - 1e-9:
            wait = (tokens - b[1]) * 60.0 / cfg.tpm
            used = cfg.tpm - max(0, math.floor(b[1] + 1e-9))
            refusal = (
                "tokens",
                f"Rate limit reached for {model} on tokens per min (TPM): Limit {cfg.tpm}, "
                f"Used {used}, Requested {tokens}. Please try again in {format_duration(wait)}.",
                wait,
            )
        else:
            if cfg.rpm > 0:
                b[0] -= 1.0
            if cfg.tpm > 0:
                b[1] -= tokens
        return self._headers(b, cfg), refusal


# ---------------------------------------------------------------- engine model


class _Seq:
    __slots__ = ("future", "order", "priority", "target")

    def __init__(self, target: float, priority: int, order: int, future: asyncio.Future) -> None:
        self.target = target
        self.priority = priority
        self.order = order
        self.future = future


_EPS = 1e-6


class _Engine:
    """Continuous batching as processor sharing, driven by one timer (no polling).

    ``v`` is the number of tokens every running request has generated since an
    arbitrary origin; all running requests advance ``v`` at the same rate, so a
    request admitted at ``v0`` with ``target`` tokens finishes when ``v`` reaches
    ``v0 + target``. Running requests sit in a heap by that finish point, waiting
    ones in a heap by (priority, arrival).
    """

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.v = 0.0
        self.t = 0.0
        self.running: list[tuple[float, int, _Seq]] = []
        self.waiting: list[tuple[int, int, _Seq]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def active(self) -> bool:
        return self.cfg.capacity_tokens_per_s > 0 or self.cfg.max_running > 0

    def _rate(self, n: int) -> float:
        rate = math.inf
        per = self.cfg.max_tokens_per_s_per_request
        if per > 0:
            rate = per
        cap = self.cfg.capacity_tokens_per_s
        if cap > 0:
            rate = min(rate, cap / n)
        return rate

    def step(self) -> None:
        """Advance to now: finish what is done, admit what fits, set the next timer."""
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        while True:
            if self.running:
                rate = self._rate(len(self.running))
                if math.isinf(rate):
                    self.v = max(self.v, max(e[0] for e in self.running))
                else:
                    self.v += rate * (now - self.t)
            self.t = now
            while self.running and self.running[0][0] <= self.v + _EPS:
                seq = heapq.heappop(self.running)[2]
                if not seq.future.done():
                    seq.future.set_result(None)
            limit = self.cfg.max_running
            admitted = False
            while self.waiting and (limit <= 0 or len(self.running) < limit):
                seq = heapq.heappop(self.waiting)[2]
                heapq.heappush(self.running, (self.v + seq.target, seq.order, seq))
                admitted = True
            if not admitted:
                break
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.running:
            dt = (self.running[0][0] - self.v) / self._rate(len(self.running))
            self._timer = loop.call_at(now + max(dt, 0.0), self.step)

    async def generate(self, tokens: int, priority: int) -> None:
        """Wait in the queue, then decode ``tokens`` at the shared rate."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        seq = _Seq(float(max(0, tokens)), priority, next(self._order), future)
        heapq.heappush(self.waiting, (priority, seq.order, seq))
        self.step()
        try:
            await future
        except asyncio.CancelledError:
            self.step()
            for queue in (self.waiting, self.running):
                for i, entry in enumerate(queue):
                    if entry[2] is seq:
                        queue.pop(i)
                        heapq.heapify(queue)
                        break
            self.step()
            raise


# ---------------------------------------------------------------- state


class _State:
    """Mutable per-app state: live config, seeded RNG for faults, stats, limits, engine."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats = _Stats()
        self.metrics = _Metrics()
        self.limiter = _Limiter()
        self.engine = _Engine(config)


STATE = web.AppKey("lowtide_sim_state", _State)

# build(body, rid, cfg, n_out): n_out is the exact completion length (engine on) or None.
Builder = Callable[[dict[str, Any], str, SimConfig, int | None], dict[str, Any]]


# ---------------------------------------------------------------- helpers


def _new_hex() -> str:
    # Module-level RNG on purpose: ids must not disturb the seeded fault sequence.
    return f"{random.getrandbits(96):024x}"


def _tokens(text: str) -> int:
    """Cheap deterministic token estimate: whitespace-separated words, min 1."""
    return max(1, len(text.split()))


def _text(content: Any) -> str:
    """Flatten OpenAI message content (string or list of parts) to plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet")


def _fit(text: str, n_out: int | None) -> tuple[str, str]:
    """(answer, finish_reason): the echo as-is, or cut / padded to exactly ``n_out`` words."""
    if n_out is None:
        return text, "stop"
    words = text.split()[:n_out]
    if len(words) < n_out:
        words.extend(itertools.islice(itertools.cycle(_FILLER), n_out - len(words)))
    return " ".join(words), "length"


def _int_field(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None):
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _retry_after_headers(value: str) -> dict[str, str]:
    headers = {"Retry-After": value}
    try:
        seconds = float(value)
    except ValueError:
        return headers  # e.g. an HTTP date: send it as-is
    if math.isfinite(seconds):
        headers["retry-after-ms"] = f"{seconds * 1000:g}"
    return headers


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# ---------------------------------------------------------------- endpoint bodies


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def _chat_prompt(body: dict[str, Any]) -> int:
    return max(1, sum(len(_text(m.get("content")).split()) for m in _chat_messages(body)))


def _chat(body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None) -> dict[str, Any]:
    messages = _chat_messages(body)
    user = [m for m in messages if m.get("role") == "user"] or messages
    answer, finish = _fit("echo: " + (_text(user[-1].get("content")) if user else ""), n_out)
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", cfg.models[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": _usage(_chat_prompt(body), _tokens(answer) if n_out is None else n_out),
        "system_fingerprint": "fp_lowtide_sim",
    }


def _completion_prompts(body: dict[str, Any]) -> list[Any]:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return prompt
    return [prompt]


def _completion_prompt(body: dict[str, Any]) -> int:
    return sum(_tokens(p) if isinstance(p, str) else 1 for p in _completion_prompts(body))


def _completion(
    body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None
) -> dict[str, Any]:
    prompts = _completion_prompts(body)
    texts = ["echo: " + (p if isinstance(p, str) else orjson.dumps(p).decode()) for p in prompts]
    fitted = [_fit(t, n_out) for t in texts]
    completion = sum(_tokens(t) for t in texts) if n_out is None else n_out * len(texts)
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", cfg.models[0]),
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": finish}
            for i, (t, finish) in enumerate(fitted)
        ],
        "usage": _usage(
            sum(_tokens(t) - 1 for t in texts) or 1,  # minus the "echo:" word
            completion,
        ),
    }


def _vector(item: Any, dim: int) -> list[float]:
    """Unit vector seeded by a stable hash of the input (same input, same vector)."""
    data = item.encode() if isinstance(item, str) else orjson.dumps(item)
    seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    rng = random.Random(seed)
    vec = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _embedding_inputs(body: dict[str, Any]) -> list[Any]:
    raw = body.get("input", "")
    if isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
        return [raw]  # a single pre-tokenized input
    if isinstance(raw, list):
        return raw
    return [raw]


def _embedding_tokens(item: Any) -> int:
    if isinstance(item, str):
        return _tokens(item)
    return max(1, len(item)) if isinstance(item, list) else 1


def _embedding_prompt(body: dict[str, Any]) -> int:
    return sum(_embedding_tokens(item) for item in _embedding_inputs(body))


def _embedding(body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None) -> dict[str, Any]:
    inputs = _embedding_inputs(body)
    dim = body.get("dimensions")
    if not isinstance(dim, int) or dim < 1:
        dim = cfg.embedding_dim
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    prompt = 0
    for i, item in enumerate(inputs):
        vec = _vector(item, dim)
        prompt += _tokens(item) if isinstance(item, str) else max(1, len(item))
        embedding: Any = vec
        if as_base64:  # what the openai SDK asks for by default
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model", cfg.models[0]),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def _response_input(body: dict[str, Any]) -> tuple[str, str]:
    """(last user text, everything the model saw) of a /v1/responses body."""
    raw = body.get("input", "")
    if isinstance(raw, list):
        items = [m for m in raw if isinstance(m, dict)]
        user = [m for m in items if m.get("role") == "user"] or items
        last = _text(user[-1].get("content")) if user else ""
        seen = " ".join(_text(m.get("content")) for m in items)
    else:
        last = seen = _text(raw)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        seen = instructions + " " + seen
    return last, seen


def _response_prompt(body: dict[str, Any]) -> int:
    return _tokens(_response_input(body)[1])


def _response(body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None) -> dict[str, Any]:
    last, seen = _response_input(body)
    answer, _ = _fit("echo: " + last, n_out)
    input_tokens = _tokens(seen)
    output_tokens = _tokens(answer) if n_out is None else n_out
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "model": body.get("model", cfg.models[0]),
        "output": [
            {
                "type": "message",
                "id": f"msg_{rid}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


@dataclass(frozen=True)
class _Endpoint:
    """One POST /v1 endpoint: body builder, prompt estimate, completion-budget fields."""

    build: Builder
    prompt: Callable[[dict[str, Any]], int]
    out_fields: tuple[str, ...]  # empty: no generation (embeddings)
    sequences: Callable[[dict[str, Any]], int] = lambda body: 1

    def max_out(self, body: dict[str, Any]) -> int:
        if not self.out_fields:
            return 0
        value = _int_field(body, *self.out_fields)
        return DEFAULT_MAX_TOKENS if value is None else value


CHAT = _Endpoint(_chat, _chat_prompt, ("max_completion_tokens", "max_tokens"))
COMPLETIONS = _Endpoint(
    _completion,
    _completion_prompt,
    ("max_tokens",),
    lambda body: len(_completion_prompts(body)),
)
EMBEDDINGS = _Endpoint(_embedding, _embedding_prompt, ())
RESPONSES = _Endpoint(_response, _response_prompt, ("max_output_tokens",))


# ---------------------------------------------------------------- request handling


def _unauthorized(request: web.Request, cfg: SimConfig) -> bool:
    key = cfg.require_key
    return bool(key) and request.headers.get("Authorization") != f"Bearer {key}"


def _api_key(request: web.Request) -> str:
    """The bearer token rate limits are kept under; "" for requests without one."""
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _error_for_status(status: int, message: str, code: str | None, cfg: SimConfig):
    """Build an OpenAI-style error response; 429s carry Retry-After."""
    if status == 429:
        return _json(
            _error_body(message, "rate_limit_exceeded", code or "rate_limit_exceeded"),
            429,
            _retry_after_headers(cfg.retry_after),
        )
    if status >= 500:
        return _json(_error_body(message, "server_error", code), status)
    type_ = {401: "authentication_error", 403: "permission_error"}.get(
        status, "invalid_request_error"
    )
    return _json(_error_body(message, type_, code), status)


def _limits_on(cfg: SimConfig) -> bool:
    return cfg.rpm > 0 or cfg.tpm > 0


async def _handle_v1(request: web.Request, endpoint: _Endpoint) -> web.StreamResponse:
    """Shared path for every POST /v1/* endpoint: count, limit, fault-inject, answer."""
    state = request.app[STATE]
    stats = state.stats
    raw = await request.read()
    seen = stats.note_body(raw)
    request["rid"] = rid = _new_hex()
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        label, response = await _answer(request, state, raw, seen, rid, endpoint)
    finally:
        stats.in_flight -= 1
    if label is not None:
        stats.by_status[label] += 1
    cfg = state.config
    if _limits_on(cfg) and not cfg.no_ratelimit_headers:
        headers = request.get("ratelimit")
        if headers is None:  # refused before admission (401): report without charging
            headers = state.limiter.peek(_api_key(request), cfg)
        response.headers.update(headers)
    return response


def _delay_ms(state: _State) -> float:
    cfg = state.config
    rng = state.rng
    if cfg.latency_dist == "uniform":
        delay = rng.uniform(0.0, 2.0 * cfg.latency_ms) if cfg.latency_ms > 0 else 0.0
    elif cfg.latency_dist == "lognormal":
        delay = (
            rng.lognormvariate(math.log(cfg.latency_ms), cfg.latency_sigma)
            if cfg.latency_ms > 0
            else 0.0
        )
    else:
        delay = cfg.latency_ms
    if cfg.latency_jitter_ms:
        delay += rng.uniform(0.0, cfg.latency_jitter_ms)
    return delay


def _rate_limited(
    request: web.Request, state: _State, body: Any, endpoint: _Endpoint
) -> web.Response | None:
    """Charge the request against its key's buckets; a 429 response when it does not fit."""
    cfg = state.config
    if isinstance(body, dict):
        try:
            cost = endpoint.prompt(body) + endpoint.max_out(body)
        except (TypeError, ValueError, AttributeError):
            cost = 1
        model = body.get("model")
    else:
        cost, model = 1, None
    if not isinstance(model, str):
        model = cfg.models[0]
    headers, refusal = state.limiter.admit(_api_key(request), cost, cfg, model)
    request["ratelimit"] = headers
    if refusal is None:
        return None
    kind, message, wait = refusal
    state.stats.rate_limited += 1
    retry = {
        "retry-after": str(max(1, math.ceil(wait - 1e-9))),
        "retry-after-ms": str(max(1, math.ceil(wait * 1000 - 1e-6))),
    }
    return _json(_error_body(message, kind, "rate_limit_exceeded"), 429, retry)


async def _answer(
    request: web.Request,
    state: _State,
    raw: bytes,
    seen: int,
    rid: str,
    endpoint: _Endpoint,
) -> tuple[str | None, web.StreamResponse]:
    """Decide the outcome of one request; returns (stats label, response).

    The label is None when the outcome was already counted (a hang is counted
    as "timeout" when it starts, so stats show it while the client waits).
    """
    cfg = state.config
    if _unauthorized(request, cfg):
        return "401", _error_for_status(401, "Incorrect API key provided.", "invalid_api_key", cfg)

    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None

    if _limits_on(cfg):
        refused = _rate_limited(request, state, body, endpoint)
        if refused is not None:
            return "429", refused

    delay_ms = _delay_ms(state)
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)

    if not isinstance(body, dict):
        msg = "We could not parse the JSON body of your request."
        return "400", _error_for_status(400, msg, None, cfg)

    # Deterministic faults first, so they happen every time regardless of rates.
    if body.get("model") == "sim-missing":
        msg = "The model `sim-missing` does not exist or you do not have access to it."
        return "404", _error_for_status(404, msg, "model_not_found", cfg)
    fault = body.get("sim_fault")
    fail_first = body.get("sim_fail_first")
    if isinstance(fail_first, int):
        # Fail only the first N receipts of this exact body (default 500), so
        # retry paths can be tested without randomness.
        fault = (fault if isinstance(fault, int) else 500) if seen <= fail_first else None
    if isinstance(fault, int) and 400 <= fault <= 599:
        msg = f"Simulated failure with status {fault}."
        return str(fault), _error_for_status(fault, msg, "sim_fault", cfg)
    if body.get("stream"):
        msg = "Streaming is not supported by the simulator."
        return "400", _error_for_status(400, msg, None, cfg)

    # Random faults: one draw, mutually exclusive bands of width rate_*.
    label: str | None = "200"
    r = state.rng.random()
    if r < cfg.rate_drop:
        if request.transport is not None:
            request.transport.close()  # real FIN, no HTTP response at all
        # aiohttp tries to write this, sees the closed transport and gives up quietly.
        return "drop", web.Response(status=499)
    r -= cfg.rate_drop
    if r < cfg.rate_timeout:
        label = None
        state.stats.by_status["timeout"] += 1
        await asyncio.sleep(cfg.hang_seconds)
    else:
        r -= cfg.rate_timeout
        if r < cfg.rate_429:
            msg = "Rate limit reached for requests (simulated)."
            return "429", _error_for_status(429, msg, "rate_limit_exceeded", cfg)
        r -= cfg.rate_429
        if r < cfg.rate_500:
            status = state.rng.choice((500, 502, 503))
            msg = "The server had an error while processing your request (simulated)."
            return str(status), _error_for_status(status, msg, None, cfg)

    n_out: int | None = None
    engine = state.engine
    if endpoint.out_fields and engine.active:
        n_out = endpoint.max_out(body)
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            priority = 0
        n_seq = max(1, endpoint.sequences(body))
        if n_seq == 1:
            await engine.generate(n_out, priority)
        else:
            await asyncio.gather(*(engine.generate(n_out, priority) for _ in range(n_seq)))

    try:
        payload = endpoint.build(body, rid, cfg, n_out)
    except (TypeError, ValueError, AttributeError, struct.error) as exc:
        msg = f"Invalid request body: {exc}"
        return "400", _error_for_status(400, msg, None, cfg)
    _count_success(state, payload)
    return label, _json(payload)


def _count_success(state: _State, payload: dict[str, Any]) -> None:
    usage = payload.get("usage") or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    state.stats.prompt_tokens_total += prompt
    state.stats.completion_tokens_total += completion
    metrics = state.metrics
    metrics.prompt_tokens += prompt
    metrics.generation_tokens += completion
    choices = payload.get("choices")
    finish = choices[0].get("finish_reason", "stop") if choices else "stop"
    metrics.success[finish or "stop"] += 1


def _v1_route(endpoint: _Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _handle_v1(request, endpoint)

    return handler


async def _models(request: web.Request) -> web.Response:
    cfg = request.app[STATE].config
    if _unauthorized(request, cfg):
        return _error_for_status(401, "Incorrect API key provided.", "invalid_api_key", cfg)
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "lowtide-sim"} for m in cfg.models
    ]
    return _json({"object": "list", "data": data})


async def _unknown_v1(request: web.Request) -> web.Response:
    msg = f"Invalid URL ({request.method} {request.path})"
    return _error_for_status(404, msg, "unknown_url", request.app[STATE].config)


# ---------------------------------------------------------------- admin


async def _stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snapshot = state.stats.snapshot()
    snapshot["running"] = len(state.engine.running)
    snapshot["waiting"] = len(state.engine.waiting)
    return _json(snapshot)


async def _reset(request: web.Request) -> web.Response:
    """Clear stats and rate-limit buckets, and reseed the RNG so a seeded run can be repeated."""
    state = request.app[STATE]
    state.stats = _Stats()
    state.limiter.clear()
    state.rng.seed(state.config.seed)
    return _json({"ok": True})


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number")
    if not math.isfinite(value) or value < 0 or (name in _RATE_FIELDS and value > 1):
        raise ValueError(f"{name} out of range: {value}")
    return value


def _apply_config(cfg: SimConfig, updates: dict[str, Any]) -> None:
    """Validate and apply runtime updates; raises ValueError on bad input."""
    unknown = set(updates) - RUNTIME_FIELDS
    if unknown:
        raise ValueError(f"not changeable at runtime: {sorted(unknown)}")
    checked: dict[str, Any] = {}
    for name, value in updates.items():
        if name == "retry_after":
            checked[name] = str(value)
        elif name == "seed":
            checked[name] = None if value is None else int(value)
        elif name == "latency_dist":
            if value not in LATENCY_DISTS:
                raise ValueError(f"latency_dist must be one of {list(LATENCY_DISTS)}")
            checked[name] = value
        elif name == "no_ratelimit_headers":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            checked[name] = value
        elif name in _INT_FIELDS:
            number = _check_number(name, value)
            if number != int(number):
                raise ValueError(f"{name} must be a whole number")
            checked[name] = int(number)
        else:
            checked[name] = float(_check_number(name, value))
    for name, value in checked.items():
        setattr(cfg, name, value)


async def _config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        updates = orjson.loads(await request.read())
        if not isinstance(updates, dict):
            raise ValueError("body must be a JSON object")
        state.engine.step()  # account decode progress at the old rates first
        _apply_config(state.config, updates)
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        return _json(_error_body(str(exc), "invalid_request_error", None), 400)
    if "seed" in updates:
        state.rng.seed(state.config.seed)
    if "rpm" in updates or "tpm" in updates:
        state.limiter.clear()
    if any(name in updates for name in _ENGINE_FIELDS):
        state.engine.step()
    return _json(asdict(state.config))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def _metrics(request: web.Request) -> web.Response:
    """vLLM-style Prometheus text exposition of the engine model."""
    state = request.app[STATE]
    engine = state.engine
    engine.step()
    model = f'model_name="{_label(state.config.models[0])}"'
    metrics = state.metrics
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{model}}} {float(len(engine.running))}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{model}}} {float(len(engine.waiting))}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for reason in sorted({"stop", "length", *metrics.success}):
        lines.append(
            f'vllm:request_success_total{{finished_reason="{_label(reason)}",{model}}} '
            f"{float(metrics.success[reason])}"
        )
    lines += [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{model}}} {float(metrics.prompt_tokens)}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{model}}} {float(metrics.generation_tokens)}",
    ]
    return web.Response(
        body=("\n".join(lines) + "\n").encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get("rid") or _new_hex()
    response.headers.setdefault("x-request-id", f"req_{rid}")


def build_app(config: SimConfig | None = None) -> web.Application:
    """Create the aiohttp app; state lives on the app so several can coexist."""
    app = web.Application(client_max_size=64 * 1024**2)
    app[STATE] = _State(config or SimConfig())
    app.on_response_prepare.append(_add_request_id)
    app.router.add_post("/v1/chat/completions", _v1_route(CHAT))
    app.router.add_post("/v1/completions", _v1_route(COMPLETIONS))
    app.router.add_post("/v1/embeddings", _v1_route(EMBEDDINGS))
    app.router.add_post("/v1/responses", _v1_route(RESPONSES))
    app.router.add_get("/v1/models", _models)
    app.router.add_route("*", "/v1/{tail:.*}", _unknown_v1)
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_post("/sim/config", _config)
    app.router.add_get("/metrics", _metrics)
    return app


async def serve(config: SimConfig, stop: asyncio.Event | None = None) -> None:
    """Listen, print the READY line, and run until ``stop`` is set or cancelled."""
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        await site.start()
        host, port = runner.addresses[0][:2]
        if ":" in host:
            host = f"[{host}]"
        sys.stdout.write(f"READY http://{host}:{port}/v1\n")
        sys.stdout.flush()
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- CLI


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"rate must be within 0..1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> SimConfig:
    defaults = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m lowtide.sim.upstream",
        description="Simulated OpenAI-compatible upstream with fault injection.",
    )
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    p.add_argument("--latency-jitter-ms", type=float, default=defaults.latency_jitter_ms)
    p.add_argument(
        "--latency-dist",
        choices=LATENCY_DISTS,
        default=defaults.latency_dist,
        help="fixed: latency-ms; uniform: 0..2*latency-ms; lognormal: median latency-ms",
    )
    p.add_argument(
        "--latency-sigma",
        type=_non_negative,
        default=defaults.latency_sigma,
        help="shape of the lognormal latency",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--rate-429", type=_rate, default=0.0)
    p.add_argument("--rate-500", type=_rate, default=0.0, help="500/502/503 at random")
    p.add_argument("--rate-timeout", type=_rate, default=0.0, help="hang, then answer")
    p.add_argument("--rate-drop", type=_rate, default=0.0, help="close the TCP connection")
    p.add_argument("--hang-seconds", type=float, default=defaults.hang_seconds)
    p.add_argument("--retry-after", default=defaults.retry_after, help="seconds, may be fractional")
    p.add_argument("--require-key", default=None, help="demand 'Authorization: Bearer KEY'")
    p.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    p.add_argument(
        "--models", default=",".join(defaults.models), help="comma-separated ids for /v1/models"
    )
    p.add_argument(
        "--rpm", type=_non_negative_int, default=0, help="requests per minute per key (0: off)"
    )
    p.add_argument(
        "--tpm", type=_non_negative_int, default=0, help="tokens per minute per key (0: off)"
    )
    p.add_argument(
        "--no-ratelimit-headers",
        action="store_true",
        help="omit x-ratelimit-* headers (429s still carry retry-after)",
    )
    p.add_argument(
        "--capacity-tokens-per-s",
        type=_non_negative,
        default=0.0,
        help="decode tokens/s shared by all running requests (0: no ceiling)",
    )
    p.add_argument(
        "--max-tokens-per-s-per-request",
        type=_non_negative,
        default=defaults.max_tokens_per_s_per_request,
        help="decode speed of one request when the server is idle",
    )
    p.add_argument(
        "--max-running",
        type=_non_negative_int,
        default=0,
        help="requests decoding at once; the rest queue by priority (0: unlimited)",
    )
    args = p.parse_args(argv)
    values = vars(args)
    values["models"] = [m for m in args.models.split(",") if m] or defaults.models
    known = {f.name for f in fields(SimConfig)}
    return SimConfig(**{k: v for k, v in values.items() if k in known})


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        import uvloop  # optional: roughly doubles throughput
    except ImportError:
        uvloop = None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    if uvloop is not None:
        uvloop.run(run())
    else:
        asyncio.run(run())


if __name__ == "__main__":
    main()
